//! One block being denoised: its cells, and the step both diffusion decoders share — sample a
//! token for every masked position, let the commit policy pick, apply the EOS rule, report.

use crate::backend::{Backend, PositionStats};

use super::policy::{Candidate, CommitPolicy, CreditLedger};
use super::{Cell, Session};

pub(super) struct BlockCanvas {
    /// Absolute position of `cells[0]`.
    start: usize,
    /// `None` = still masked.
    cells: Vec<Option<u32>>,
    /// Next absolute position to hand to the output (positions before the prompt's end are
    /// prompt, never output).
    deliver_from: usize,
    steps: usize,
    credit: Option<CreditLedger>,
}

impl BlockCanvas {
    /// The block `start..end` whose leading cells are already known (`known`: the prompt's tail
    /// when the prompt ends inside the block); output starts at `output_start`.
    pub fn new(
        start: usize,
        end: usize,
        known: &[u32],
        output_start: usize,
        policy: &CommitPolicy,
    ) -> Self {
        let mut cells = vec![None; end - start];
        for (c, &t) in cells.iter_mut().zip(known) {
            *c = Some(t);
        }
        BlockCanvas {
            start,
            cells,
            deliver_from: output_start.max(start),
            steps: 0,
            credit: matches!(policy, CommitPolicy::Credit { .. }).then(CreditLedger::new),
        }
    }

    pub fn end(&self) -> usize {
        self.start + self.cells.len()
    }

    /// Absolute positions still masked, ascending.
    pub fn masked(&self) -> Vec<usize> {
        (0..self.cells.len())
            .filter(|&i| self.cells[i].is_none())
            .map(|i| self.start + i)
            .collect()
    }

    /// The token at an absolute position of the block, the mask id where still masked.
    pub fn input(&self, pos: usize, mask: u32) -> u32 {
        self.cells[pos - self.start].unwrap_or(mask)
    }

    /// The block's tokens once no cell is masked.
    pub fn tokens(&self, mask: u32) -> Vec<u32> {
        self.cells.iter().map(|c| c.unwrap_or(mask)).collect()
    }

    /// One denoising step from the predictions of the masked positions: returns whether the
    /// generation goes on.
    pub fn commit_step<B: Backend>(
        &mut self,
        s: &mut Session<'_, B>,
        preds: Vec<(usize, PositionStats)>,
    ) -> bool {
        let preds = match &mut self.credit {
            Some(ledger) => ledger.step(&preds),
            None => preds,
        };
        let sampling = s.params.sampling;
        let candidates: Vec<Candidate> = preds
            .iter()
            .map(|(pos, st)| {
                let (token, confidence) = sampling.choose(st, &mut s.rng);
                Candidate {
                    pos: *pos,
                    token,
                    confidence,
                    entropy: st.entropy,
                    margin: st.margin,
                }
            })
            .collect();
        for i in s.params.policy.select(&candidates, self.steps) {
            let c = &candidates[i];
            self.cells[c.pos - self.start] = Some(c.token);
        }
        self.steps += 1;
        self.apply_eos_rule(s);
        let cells = self
            .cells
            .iter()
            .map(|c| c.map_or(Cell::Masked, Cell::Known))
            .collect();
        s.emit_canvas(self.start, cells);
        self.deliver(s)
    }

    /// dInfer: once a block holds EOS, every later position of it is EOS.
    fn apply_eos_rule<B: Backend>(&mut self, s: &Session<'_, B>) {
        let Some(eos) = s.special.eos.filter(|_| !s.params.ignore_eos) else {
            return;
        };
        let from = self.deliver_from - self.start;
        if let Some(i) = (from..self.cells.len()).find(|&i| self.cells[i] == Some(eos)) {
            for c in &mut self.cells[i + 1..] {
                *c = Some(eos);
            }
        }
    }

    /// Hands the newly contiguous committed prefix to the output.
    fn deliver<B: Backend>(&mut self, s: &mut Session<'_, B>) -> bool {
        let from = self.deliver_from - self.start;
        let ready: Vec<u32> = self.cells[from..].iter().map_while(|c| *c).collect();
        if ready.is_empty() {
            return s.running();
        }
        self.deliver_from += ready.len();
        s.deliver(&ready)
    }
}
