//! Trace prompts as token ids. Round 0 is the query as one user turn through the model's chat
//! template. An aggregation prompt is the same turn holding the query, K candidate tails and the
//! instruction: the template is rendered once with a placeholder per candidate, the text between
//! placeholders is encoded piece by piece and each candidate's tail ids are spliced in where its
//! placeholder was, so the tail reaches the model token for token as its trace produced it.

use crate::backend::Backend;
use crate::engine::{Engine, Prompt};
use crate::tokenizer::ChatMessage;

use super::ReasonError;

/// What an aggregation prompt asks for (after RSA's aggregation prompt, arXiv 2509.26626 §3).
pub const AGGREGATION_INSTRUCTION: &str = "Above are candidate solutions to the problem, each \
     possibly only its end. Some may be wrong. Check their reasoning, keep what is right, fix what \
     is wrong, and produce an improved solution. End with the final answer in \\boxed{}.";

/// Stands for a candidate's tail while the template renders (a private-use character: no
/// query, instruction or template contains it).
const PLACEHOLDER: char = '\u{F8FF}';

/// An aggregation prompt's fixed parts, encoded once per run: `pieces[0]`, tail 1, `pieces[1]`,
/// tail 2, …, tail K, `pieces[K]`.
pub(crate) struct AggregationPrompt {
    pieces: Vec<Vec<u32>>,
}

impl AggregationPrompt {
    pub(crate) fn new<B: Backend>(
        engine: &Engine<B>,
        query: &str,
        k: usize,
    ) -> Result<Self, ReasonError> {
        let mut content = format!("{query}\n\n");
        for i in 1..=k {
            content.push_str(&format!("Candidate solution {i}:\n{PLACEHOLDER}\n\n"));
        }
        content.push_str(AGGREGATION_INSTRUCTION);
        let text = render(engine, &content)?;
        let parts: Vec<&str> = text.split(PLACEHOLDER).collect();
        if parts.len() != k + 1 {
            return Err(ReasonError::Template);
        }
        let tok = engine.tokenizer();
        let pieces = parts
            .iter()
            .map(|p| tok.encode(p, false))
            .collect::<Result<_, _>>()?;
        Ok(AggregationPrompt { pieces })
    }

    /// Tokens of the prompt without its tails.
    pub(crate) fn fixed_len(&self) -> usize {
        self.pieces.iter().map(Vec::len).sum()
    }

    /// The prompt for these tails (one per placeholder).
    pub(crate) fn assemble(&self, tails: &[&[u32]]) -> Vec<u32> {
        debug_assert_eq!(tails.len() + 1, self.pieces.len());
        let mut ids = self.pieces[0].clone();
        for (tail, piece) in tails.iter().zip(&self.pieces[1..]) {
            ids.extend_from_slice(tail);
            ids.extend_from_slice(piece);
        }
        ids
    }
}

/// The query as one user turn (round 0).
pub(crate) fn query_prompt<B: Backend>(
    engine: &Engine<B>,
    query: &str,
) -> Result<Vec<u32>, ReasonError> {
    Ok(engine.encode_prompt(&Prompt::Chat(vec![ChatMessage::user(query)]))?)
}

/// The chat template's text for one user turn plus the generation prompt, as
/// [`Engine::encode_prompt`] renders it.
fn render<B: Backend>(engine: &Engine<B>, content: &str) -> Result<String, ReasonError> {
    let special = engine.metadata().special_tokens;
    let tok = engine.tokenizer();
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    Ok(engine.chat_template().render(
        &[ChatMessage::user(content)],
        true,
        &name(special.bos),
        &name(special.eos),
    )?)
}
