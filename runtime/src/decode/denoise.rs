//! One block being denoised: its cells, and the step both diffusion decoders share — sample a
//! token for every masked position, let the commit policy pick, apply the EOS rule, report.

use crate::backend::{Backend, CommitParams, PositionStats};

use super::policy::{Candidate, CommitPolicy, CreditLedger};
use super::sampling::{Rng, Sampling};
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
        let eos = s.special.eos.filter(|_| !s.params.ignore_eos);
        decide(
            &mut self.cells,
            self.start,
            self.steps,
            &candidates,
            &s.params.policy,
            eos,
            self.deliver_from,
        );
        self.finish_step(s)
    }

    /// A step decided elsewhere — the backend's commit op on a canvas chained on the device
    /// (`decode::chain`): its cells become the block's, then as after a host step.
    pub fn replay_step<B: Backend>(
        &mut self,
        s: &mut Session<'_, B>,
        cells: &[Option<u32>],
    ) -> bool {
        self.cells.copy_from_slice(cells);
        self.finish_step(s)
    }

    /// The block's cells (`None`: masked).
    pub fn cells(&self) -> &[Option<u32>] {
        &self.cells
    }

    /// The first cell the EOS rule looks at (the first not yet handed to the output).
    pub fn eos_from(&self) -> usize {
        self.deliver_from - self.start
    }

    /// Counts the step, reports the block, hands over what is ready; whether generation goes on.
    fn finish_step<B: Backend>(&mut self, s: &mut Session<'_, B>) -> bool {
        self.steps += 1;
        let cells = self
            .cells
            .iter()
            .map(|c| c.map_or(Cell::Masked, Cell::Known))
            .collect();
        s.emit_canvas(self.start, cells);
        self.deliver(s)
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

/// The decisions of one step, given the candidates: the policy's choice among them commits, then
/// dInfer's EOS rule — once a cell at or after `eos_from` (absolute) holds EOS, every later cell
/// of the block becomes EOS. `cells[0]` sits at absolute position `start`; `steps_done` earlier
/// steps of this block. The host step above and the CPU backend's commit op
/// (`Backend::commit_step`) both run exactly this, so the GPU kernel has one reference.
pub(crate) fn decide(
    cells: &mut [Option<u32>],
    start: usize,
    steps_done: usize,
    candidates: &[Candidate],
    policy: &CommitPolicy,
    eos: Option<u32>,
    eos_from: usize,
) {
    for i in policy.select(candidates, steps_done) {
        let c = &candidates[i];
        cells[c.pos - start] = Some(c.token);
    }
    eos_rule(cells, eos, eos_from - start);
}

/// dInfer's EOS rule: once a cell at or after index `from` holds `eos`, every later cell becomes
/// it (`None`: the rule is off).
fn eos_rule(cells: &mut [Option<u32>], eos: Option<u32>, from: usize) {
    let Some(eos) = eos else {
        return;
    };
    if let Some(i) = (from..cells.len()).find(|&i| cells[i] == Some(eos)) {
        for c in &mut cells[i + 1..] {
            *c = Some(eos);
        }
    }
}

/// The CPU backend's commit op (`Backend::commit_step`): the host step above with greedy choice,
/// on cells that start at index 0 (cell `i` reads `stats[i − p.stats_from]`); for
/// [`crate::backend::CommitRule::Next`], AR's step: the host AR loop's greedy choice for its one
/// cell, then the same EOS rule.
pub(crate) fn commit_greedy(
    cells: &mut [Option<u32>],
    steps_done: usize,
    stats: &[PositionStats],
    p: &CommitParams,
) {
    // Greedy choice draws nothing: the generator is never advanced.
    let mut rng = Rng::new(0);
    let Some(policy) = CommitPolicy::for_rule(p.rule) else {
        // `CommitParams::check` put the cell inside the canvas and row 0 in the statistics.
        let cell = &mut cells[p.stats_from];
        if cell.is_none() {
            *cell = Some(Sampling::greedy().choose(&stats[0], &mut rng).0);
        }
        eos_rule(cells, p.eos, p.output_from);
        return;
    };
    let candidates: Vec<Candidate> = (0..cells.len())
        .filter(|&i| cells[i].is_none())
        .map(|i| {
            let st = &stats[i - p.stats_from];
            let (token, confidence) = Sampling::greedy().choose(st, &mut rng);
            Candidate {
                pos: i,
                token,
                confidence,
                entropy: st.entropy,
                margin: st.margin,
            }
        })
        .collect();
    decide(
        cells,
        0,
        steps_done,
        &candidates,
        &policy,
        p.eos,
        p.output_from,
    );
}
