//! The end of a trace carried into the next round: its last τ tokens, cut back to a paragraph
//! boundary so an aggregation prompt does not start mid-sentence (Delethink's carry-over, arXiv
//! 2510.06557, with RSA's candidates, arXiv 2509.26626). Works on token ids, so the tail in the next
//! prompt is exactly the tokens the trace produced — no re-tokenisation.

use crate::tokenizer::{Tokenizer, TokenizerError};

/// Where the tail of `tokens` starts: `tokens.len() - tail` when the trace is longer than `tail`
/// tokens, moved forward to just after the first token inside that window whose text ends a blank
/// line (two newlines in a row, counted across tokens); the window's start when it holds no such
/// boundary (or only at its very end). A trace of at most `tail` tokens is carried whole.
pub fn tail_start(
    tokenizer: &Tokenizer,
    tokens: &[u32],
    tail: usize,
) -> Result<usize, TokenizerError> {
    if tokens.len() <= tail {
        return Ok(0);
    }
    let start = tokens.len() - tail;
    let mut newlines = 0usize;
    for (i, &id) in tokens[start..].iter().enumerate() {
        let text = tokenizer.decode(&[id], false)?;
        for c in text.chars() {
            newlines = if c == '\n' { newlines + 1 } else { 0 };
        }
        let next = start + i + 1;
        if newlines >= 2 && !text.is_empty() && next < tokens.len() {
            return Ok(next);
        }
    }
    Ok(start)
}

/// The tail itself ([`tail_start`]).
pub fn paragraph_tail<'t>(
    tokenizer: &Tokenizer,
    tokens: &'t [u32],
    tail: usize,
) -> Result<&'t [u32], TokenizerError> {
    Ok(&tokens[tail_start(tokenizer, tokens, tail)?..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::train::{train_bpe, SpecialTokens};

    fn tokenizer() -> Tokenizer {
        let corpus = "one two three four.\n\nfive six seven.\nEight nine ten.\n\n";
        let json = train_bpe(corpus, 300, &SpecialTokens::default()).unwrap();
        Tokenizer::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn a_tail_is_cut_back_to_the_first_blank_line_in_its_window() {
        let tok = tokenizer();
        let head = tok.encode("one two three four.\n\n", false).unwrap();
        let para = tok.encode("five six seven.\nEight nine", false).unwrap();
        let ids: Vec<u32> = head.iter().chain(&para).copied().collect();
        // A window reaching back into the first paragraph starts at the second one.
        for extra in 1..=head.len() - 1 {
            let t = paragraph_tail(&tok, &ids, para.len() + extra).unwrap();
            assert_eq!(t, &para[..], "window of {} tokens", para.len() + extra);
        }
        // A window inside the last paragraph has no boundary: the last τ tokens as they are.
        assert_eq!(
            paragraph_tail(&tok, &ids, 3).unwrap(),
            &ids[ids.len() - 3..]
        );
        // A short trace is carried whole.
        assert_eq!(paragraph_tail(&tok, &ids, ids.len()).unwrap(), &ids[..]);
        assert_eq!(paragraph_tail(&tok, &ids, 1000).unwrap(), &ids[..]);
    }

    #[test]
    fn a_blank_line_at_the_very_end_does_not_empty_the_tail() {
        let tok = tokenizer();
        let ids = tok.encode("five six seven.\n\n", false).unwrap();
        let t = paragraph_tail(&tok, &ids, ids.len() - 1).unwrap();
        assert_eq!(t, &ids[1..]);
    }
}
