//! Self-speculative decoding, TiDAR-style (as in ZAYA1-8B-Diffusion; REFERENCES.md
//! "Self-speculative"): one forward pass both verifies the previous draft with causal logits and
//! drafts the next block with masks.
//!
//! A pass runs `[c | d₁ … d_m | M … M]` with mask `CausalThenBidirectional { draft_start }`:
//! `c` is the last committed token (K/V not yet written), `d` the previous draft, verified
//! causally — row i predicts position i + 1, so rows `c, d₁ … d_m` give the AR distribution at
//! every draft position plus one bonus position — and the masks, bidirectional among themselves
//! and seeing everything before them, draft the next `k` tokens (mask at q predicts q + 1; for a
//! hybrid model, whose masks predict in place, one more mask sits on the bonus position and its
//! row is dropped).
//!
//! Acceptance walks the draft left to right against the target distribution, `β·AR + (1−β)·
//! diffusion` ([`sampling::mix`]; β = 1 is the AR distribution):
//! - greedy: keep dᵢ while it is the target's argmax; the first mismatch takes the target's
//!   argmax. With β = 1 the output is AR greedy decoding, token for token: the prompt runs as
//!   AR's first pass, and the verification rows are computed as AR's one-row passes
//!   ([`crate::model::ForwardRequest::rows_as`]), so on a GPU whose multi-row kernels sum
//!   differently (8-bit activation codes) the rows still equal AR's up to attention's summation
//!   order.
//! - sampling: keep dᵢ with probability min(1, p(dᵢ)/q(dᵢ)), else draw from norm(max(0, p − q)).
//!   Both p and q are the top-8 candidates of their rows after temperature/top-k/top-p
//!   ([`sampling`]): exact speculative sampling of the top-8-truncated distributions.
//!
//! Every pass commits the accepted prefix plus one token (a correction, or the bonus after a
//! fully accepted draft). The K/V of `c` and the accepted drafts are exact (they were causal
//! inputs). TiDAR drafts the next block for every possible acceptance length in one pass; this
//! decoder drafts only for full acceptance, which the one-region mask expresses: after a
//! rejection the next pass verifies nothing and drafts afresh from the correction.

use crate::backend::{AttnMask, Backend, PositionStats};
use crate::model::Window;

use super::sampling::{self, accept_draft, Candidates};
use super::{
    Cell, DecodeError, DecoderDetails, PassBlocks, Prediction, Session, SpeculativeOptions,
};

struct Draft {
    token: u32,
    /// The diffusion row that proposed it.
    stats: PositionStats,
    /// The distribution it was drawn from.
    proposal: Candidates,
}

pub(super) fn run<B: Backend>(
    s: &mut Session<'_, B>,
    prompt: &[u32],
    o: &SpeculativeOptions,
) -> Result<DecoderDetails, DecodeError> {
    if s.prediction().causal() != Prediction::NextToken {
        return Err(DecodeError::Unsupported(
            "speculative decoding verifies with causal next-token logits; this model predicts \
             in place (use --prediction next-token if its causal logits are AR)"
                .into(),
        ));
    }
    let mask = s.mask_id("speculative")?;
    // In place, the first mask sits on the bonus position the verification rows already predict:
    // one mask more, and its row is not a draft.
    let skip = usize::from(s.prediction().masked() == Prediction::InPlace);
    let sampling = s.params.sampling;
    let end = s.end;
    let mut seq = prompt.to_vec();
    let mut clean_upto = 0;
    let mut draft: Vec<Draft> = Vec::new();
    let (mut passes, mut drafted, mut accepted_total) = (0, 0, 0);
    // Lossless (β = 1): the target is AR's distribution, so the rows that verify are computed as
    // AR computes them. The prompt goes through AR's own first pass (its K/V and first token are
    // then AR's), and every later pass computes its rows as one-row passes do
    // (`ForwardRequest::rows_as`): on a GPU whose multi-row kernels take 8-bit activation codes,
    // verification rows summed as a 17-row pass would sum them break AR's near ties differently,
    // and the output would not be AR's. Logit mixing (β < 1) is not AR's distribution anyway and
    // keeps the faster multi-row kernels.
    let exact = o.beta >= 1.0;
    let rows_as = exact.then_some(1);
    if exact && s.running() && seq.len() < end {
        let len = seq.len();
        let window = Window::block(0, len, AttnMask::Causal);
        let rows = s.forward(&seq, window, len - 1..len, PassBlocks::Exact)?;
        passes += 1;
        let first = target(o.beta, &sampling, &rows[0], None);
        let token = sampling::draw(&first, &mut s.rng).unwrap_or(rows[0].argmax);
        seq.push(token);
        clean_upto = len;
        s.emit_canvas(seq.len(), Vec::new());
        if !s.deliver(&[token]) || seq.len() >= end {
            return Ok(DecoderDetails::Speculative {
                passes,
                drafted,
                accepted: accepted_total,
            });
        }
    }
    while s.running() {
        let n = seq.len() - 1; // position of c
        let m = draft.len();
        let draft_start = n + m + 1;
        // A mask at q predicts q + 1 (q in place), which must stay below `end`.
        let masks = (end - 1 + skip)
            .saturating_sub(draft_start)
            .min(o.draft_len + skip);
        let mut tokens = seq[clean_upto..].to_vec();
        tokens.extend(draft.iter().map(|d| d.token));
        tokens.extend(std::iter::repeat_n(mask, masks));
        let len = tokens.len();
        let window = Window::block(
            clean_upto,
            len,
            AttnMask::CausalThenBidirectional { draft_start },
        );
        let blocks = PassBlocks::Tail {
            first_row: draft_start - clean_upto,
        };
        let rows = s.forward_as(&tokens, window, n - clean_upto..len, blocks, rows_as)?;
        passes += 1;
        // rows[i] is position n + i: rows 0..=m verify, rows m+1.. draft.
        let mut committed = Vec::with_capacity(m + 1);
        let mut correction = None;
        for (i, d) in draft.iter().enumerate() {
            let target = target(o.beta, &sampling, &rows[i], Some(&d.stats));
            match accept_draft(&target, &d.proposal, d.token, &mut s.rng) {
                Ok(()) => committed.push(d.token),
                Err(t) => {
                    correction = Some(t);
                    break;
                }
            }
        }
        let accepted = committed.len();
        let next = match correction {
            Some(t) => t,
            None => {
                let bonus = target(o.beta, &sampling, &rows[m], None);
                sampling::draw(&bonus, &mut s.rng).unwrap_or(rows[m].argmax)
            }
        };
        committed.push(next);
        drafted += m;
        accepted_total += accepted;
        clean_upto = n + accepted + 1;
        draft = if accepted == m {
            rows[(m + 1 + skip).min(rows.len())..]
                .iter()
                .map(|st| {
                    let proposal = sampling.shape(&st.top);
                    let token = sampling::draw(&proposal, &mut s.rng).unwrap_or(st.argmax);
                    Draft {
                        token,
                        stats: st.clone(),
                        proposal,
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        seq.extend_from_slice(&committed);
        let cells = draft.iter().map(|d| Cell::Draft(d.token)).collect();
        s.emit_canvas(seq.len(), cells);
        if !s.deliver(&committed) || seq.len() >= end {
            break;
        }
    }
    Ok(DecoderDetails::Speculative {
        passes,
        drafted,
        accepted: accepted_total,
    })
}

/// The distribution a position's token is accepted against or drawn from.
fn target(
    beta: f32,
    sampling: &sampling::Sampling,
    ar: &PositionStats,
    diffusion: Option<&PositionStats>,
) -> Candidates {
    match diffusion {
        Some(d) if beta < 1.0 => sampling.shape(&sampling::mix(beta, ar, d)),
        _ => sampling.shape(&ar.top),
    }
}
