//! The denoising step on the device (shaders/denoise.wgsl, and shaders/embed.wgsl's embed_device_ids): a block's
//! canvas in one GPU buffer, the commit kernel that turns a step's statistics into the next pass's
//! input ids, the embedding gather that reads them, and the LM-head statistics left on the device
//! for it. With these a block's steps record back to back in one submission (decode/block.rs);
//! the host reads back only the canvas.

use std::ops::Range;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use super::super::kernels::{Entry, Slot::*};
use super::super::pool::Pooled;
use super::super::recorder::Grid;
use super::super::{GpuAct, GpuBackend, GpuError, GpuWeight};
use super::embed::{EmbedParams, EMBED_DEVICE_IDS};
use super::{matmul, stats};
use crate::backend::shapes::{self, shape_err};
use crate::backend::TOP_K;
use crate::backend::{BackendError, CanvasState, CommitParams, CommitRule, PositionStats, Result};

/// Cells of a canvas at most: one workgroup of the commit kernel, one invocation a cell.
pub const MAX_CELLS: usize = 256;
/// Header words before the cells (see the layout in shaders/denoise.wgsl).
const HEAD: usize = 4;
const NONE: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct CommitGpuParams {
    pub n: u32,
    pub stats_from: u32,
    pub rule: u32,
    pub steps: u32,
    pub param: f32,
    pub eos: u32,
    pub output_from: u32,
    pub mask: u32,
    /// The stats buffer's row that is the step's row 0 ([`GpuStats`] of a batched pass's rows).
    pub stats_row0: u32,
    pub _pad: [u32; 3],
}

pub static COMMIT: Entry = Entry {
    file: "denoise.wgsl",
    name: "commit_step",
    bindings: &[(0, Params), (1, Read), (2, ReadWrite)],
    params: "CommitParams",
};

/// A block being denoised, in one GPU buffer: header, cells, input ids, each step's cells.
pub struct GpuCanvas {
    n: usize,
    /// The first masked cell when the canvas was made.
    first_masked: usize,
    /// Commit steps recorded so far, those on a finished canvas included ([`CommitParams::check`]).
    recorded: usize,
    buf: Pooled,
}

/// Per-position statistics (20 words a row, ops/stats.rs) left on the device: rows
/// `row0..row0 + rows` of `buf` (a batched pass's LM head writes every sequence's rows into one
/// buffer, and each sequence's commit reads its own, [`stats_rows`]).
pub struct GpuStats {
    rows: usize,
    row0: usize,
    buf: Arc<Pooled>,
}

fn words(n: usize) -> usize {
    HEAD + 2 * n + n * n
}

pub fn new_canvas(b: &GpuBackend, cells: &[Option<u32>], mask: u32) -> Result<GpuCanvas> {
    let n = cells.len();
    if n == 0 || n > MAX_CELLS {
        return Err(GpuError::Unsupported(format!(
            "a denoising canvas of {n} cells (1 to {MAX_CELLS})"
        ))
        .into());
    }
    let first_masked = cells.iter().position(Option::is_none).unwrap_or(n);
    let masked = cells.iter().filter(|c| c.is_none()).count() as u32;
    let mut init = vec![0, masked, 0, 0];
    init.extend(cells.iter().map(|c| c.unwrap_or(NONE)));
    init.extend(cells.iter().map(|c| c.unwrap_or(mask)));
    b.with(|ctx| {
        // The history stays as the pool left it (NaN-poisoned in tests) until a step writes it.
        let buf = ctx.output((words(n) * 4) as u64)?;
        ctx.upload(bytemuck::cast_slice(&init), &buf)?;
        Ok(GpuCanvas {
            n,
            first_masked,
            recorded: 0,
            buf,
        })
    })
}

pub fn commit_step(
    b: &GpuBackend,
    canvas: &mut GpuCanvas,
    st: &GpuStats,
    p: &CommitParams,
) -> Result<()> {
    p.check(canvas.n, canvas.first_masked, canvas.recorded, st.rows)?;
    let (rule, param, steps) = match p.rule {
        CommitRule::Threshold { threshold } => (0, threshold, 0),
        CommitRule::FixedSteps { steps } => (1, 0.0, steps.min(u32::MAX as usize) as u32),
        CommitRule::EntropyBound { gamma } => (2, gamma, 0),
        CommitRule::Margin { margin } => (3, margin, 0),
        CommitRule::Next => (4, 0.0, 0),
    };
    let params = CommitGpuParams {
        n: canvas.n as u32,
        stats_from: p.stats_from as u32,
        rule,
        steps,
        param,
        // NONE never matches a cell: the rule is off.
        eos: p.eos.unwrap_or(NONE),
        output_from: p.output_from.min(canvas.n) as u32,
        mask: p.mask,
        stats_row0: st.row0 as u32,
        _pad: [0; 3],
    };
    b.with(|ctx| {
        Ok(ctx.dispatch(
            &COMMIT,
            0,
            &params,
            None,
            &[&st.buf, &canvas.buf],
            Grid::Groups(1, 1, 1),
        )?)
    })?;
    canvas.recorded += 1;
    Ok(())
}

pub fn read_canvas(b: &GpuBackend, canvas: &GpuCanvas, steps: Range<usize>) -> Result<CanvasState> {
    let mut states = read_canvases(b, &[canvas], &[steps])?;
    Ok(states.pop().expect("one canvas, one state"))
}

/// `steps` within a canvas of `n` cells (its history holds at most `n` steps).
fn clamp_steps(n: usize, steps: &Range<usize>) -> Range<usize> {
    steps.start.min(n)..steps.end.min(n).max(steps.start.min(n))
}

/// A pruned expert was routed to (the flag lm_head_stats reads after a pass).
fn unavailable(flag: u32) -> Result<()> {
    if flag & 0x8000_0000 != 0 {
        return Err(BackendError::ExpertUnavailable {
            layer: ((flag >> 16) & 0x7fff) as usize,
            expert: (flag & 0xffff) as usize,
        });
    }
    Ok(())
}

/// A canvas of `n` cells from its header and cells (`head`) and the history words of `steps`.
fn canvas_state(n: usize, steps: &Range<usize>, head: &[u32], hist_words: &[u32]) -> CanvasState {
    let cells =
        |w: &[u32]| -> Vec<Option<u32>> { w.iter().map(|&t| (t != NONE).then_some(t)).collect() };
    let taken = head[0] as usize;
    let history = hist_words
        .chunks(n)
        .take(taken.saturating_sub(steps.start))
        .map(cells)
        .collect();
    CanvasState {
        steps: taken,
        cells: cells(&head[HEAD..HEAD + n]),
        history,
    }
}

/// Rows `rows` of `st` as statistics of their own, sharing its buffer.
pub fn stats_rows(st: &GpuStats, rows: Range<usize>) -> Result<GpuStats> {
    shapes::rows_within("stats_rows", &rows, st.rows)?;
    Ok(GpuStats {
        rows: rows.len(),
        row0: st.row0 + rows.start,
        buf: st.buf.clone(),
    })
}

/// [`read_canvas`] of several canvases in one read-back.
pub fn read_canvases(
    b: &GpuBackend,
    canvases: &[&GpuCanvas],
    steps: &[Range<usize>],
) -> Result<Vec<CanvasState>> {
    if canvases.len() != steps.len() {
        return Err(shape_err(
            "read_canvases",
            format!("{} canvases, {} step ranges", canvases.len(), steps.len()),
        ));
    }
    let steps: Vec<Range<usize>> = canvases
        .iter()
        .zip(steps)
        .map(|(c, s)| clamp_steps(c.n, s))
        .collect();
    let status = b.sh.status.clone();
    let (words, flag) = b.with(|ctx| {
        let mut srcs = Vec::with_capacity(2 * canvases.len() + 1);
        for (c, s) in canvases.iter().zip(&steps) {
            let hist = ((HEAD + 2 * c.n + s.start * c.n) * 4) as u64;
            srcs.push((&*c.buf, 0, ((HEAD + c.n) * 4) as u64));
            srcs.push((&*c.buf, hist, (s.len() * c.n * 4) as u64));
        }
        srcs.push((&status, 0, 4));
        let r = ctx.read(&srcs)?;
        let last = &r[r.len() - 1];
        let flag = u32::from_le_bytes([last[0], last[1], last[2], last[3]]);
        if flag != 0 {
            ctx.clear(&status);
        }
        let words: Vec<Vec<u32>> = r[..r.len() - 1]
            .iter()
            .map(|w| bytemuck::pod_collect_to_vec::<u8, u32>(w))
            .collect();
        Ok((words, flag))
    })?;
    unavailable(flag)?;
    Ok(canvases
        .iter()
        .zip(&steps)
        .zip(words.chunks(2))
        .map(|((c, s), w)| canvas_state(c.n, s, &w[0], &w[1]))
        .collect())
}

pub fn embed_canvas(
    b: &GpuBackend,
    table: &GpuWeight,
    canvas: &GpuCanvas,
    from: usize,
    t: usize,
) -> Result<GpuAct> {
    shapes::canvas_cells(from, t, canvas.n)?;
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, t, table.cols)?;
        for c in &table.chunks {
            let p = EmbedParams {
                t: t as u32,
                cols: table.cols as u32,
                row0: c.row0,
                rows: c.rows,
                scales: c.scales,
                // The input ids start after the header and the n cells.
                ids_at: (HEAD + canvas.n + from) as u32,
                _pad: [0; 2],
            };
            ctx.dispatch(
                &EMBED_DEVICE_IDS,
                table.wtype(),
                &p,
                None,
                &[&c.buf, &canvas.buf, &out.buf],
                Grid::Linear(((t * table.cols) as u64).div_ceil(64)),
            )?;
        }
        Ok(out)
    })
}

/// The LM head over `rows` of `x` reduced to statistics, recorded but not read: as
/// `lm_head_stats` computes them (same chunks of rows, same kernels), so the commit kernel sees the
/// bits the host would have read.
pub fn lm_head_stats_kept(
    b: &GpuBackend,
    x: &GpuAct,
    head: &GpuWeight,
    rows: Range<usize>,
) -> Result<GpuStats> {
    shapes::rows_within("lm_head_stats", &rows, x.rows)?;
    shapes::head("lm_head_stats", (head.rows, head.cols), x.cols)?;
    let (n, vocab) = (rows.len(), head.rows);
    let per = b.head_rows(vocab);
    b.with(|ctx| {
        let out = ctx.output((n.max(1) * stats::WORDS * 4) as u64)?;
        let logits = ctx.output((per.min(n).max(1) * vocab * 4) as u64)?;
        let mut r0 = 0;
        while r0 < n {
            let m = per.min(n - r0);
            matmul::matmul_into(ctx, head, &x.buf, rows.start + r0, m, &logits, vocab)?;
            stats::stats(ctx, &logits, m, vocab, &out, r0)?;
            r0 += m;
        }
        Ok(GpuStats {
            rows: n,
            row0: 0,
            buf: Arc::new(out),
        })
    })
}

/// Host statistics in the 20-word layout stats.wgsl writes ([`stats::decode`] reads it back).
pub fn encode(s: &PositionStats) -> [u32; stats::WORDS] {
    let mut w = [0u32; stats::WORDS];
    w[0] = s.argmax;
    w[1] = s.p_max.to_bits();
    w[2] = s.entropy.to_bits();
    w[3] = s.margin.to_bits();
    for k in 0..TOP_K {
        let (id, p) = s.top.get(k).copied().unwrap_or((NONE, 0.0));
        w[4 + k] = id;
        w[12 + k] = p.to_bits();
    }
    w
}

pub fn upload_stats(b: &GpuBackend, st: &[PositionStats]) -> Result<GpuStats> {
    if st.is_empty() {
        return Err(shape_err("upload_stats", "no rows".into()));
    }
    let words: Vec<u32> = st.iter().flat_map(encode).collect();
    b.with(|ctx| {
        let buf = ctx.output((words.len() * 4) as u64)?;
        ctx.upload(bytemuck::cast_slice(&words), &buf)?;
        Ok(GpuStats {
            rows: st.len(),
            row0: 0,
            buf: Arc::new(buf),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::testing::backends;
    use super::super::super::GpuBackend;
    use super::GpuCanvas;
    use crate::backend::cpu::{CpuBackend, CpuCanvas};
    use crate::backend::{Backend, CanvasState, CommitParams, CommitRule, PositionStats};

    /// SplitMix64, for seeded test inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn pick<T: Copy>(&mut self, v: &[T]) -> T {
            v[(self.next() % v.len() as u64) as usize]
        }
    }

    const EOS: u32 = 3;
    const MASK: u32 = 9;

    /// Statistics drawn from few values, so ties are common; signed zeros and exact 1s included
    /// (no NaN: the statistics kernel never writes one).
    /// One commit step of `p` on the statistics `st`, on the CPU canvas and on the GPU one: the
    /// CPU canvas after it (the reference the GPU's is compared with).
    fn step_both(
        gpu: &GpuBackend,
        (c_cpu, c_gpu): (&mut CpuCanvas, &mut GpuCanvas),
        st: &<CpuBackend as Backend>::Stats,
        p: &CommitParams,
        step: usize,
    ) -> CanvasState {
        let cpu = CpuBackend;
        cpu.commit_step(c_cpu, st, p).unwrap();
        let sg = gpu.upload_stats(st).unwrap();
        gpu.commit_step(c_gpu, &sg, p).unwrap();
        cpu.read_canvas(c_cpu, step..step + 1).unwrap()
    }

    fn random_stats(rng: &mut Rng, rows: usize) -> Vec<PositionStats> {
        (0..rows)
            .map(|_| {
                let p_max = rng.pick(&[0.0, 0.1, 0.3, 0.5, 0.5, 0.9, 0.9, 0.95, 1.0]);
                let entropy = rng.pick(&[-0.0, 0.0, 1e-3, 0.125, 0.25, 0.25, 0.5, 1.0, 2.0]);
                let margin = rng.pick(&[-0.0, 0.0, 0.05, 0.2, 0.2, 0.6, 1.0]);
                let argmax = rng.pick(&[0, 1, 2, EOS, EOS, 5, MASK, 200_000]);
                PositionStats {
                    argmax,
                    p_max,
                    entropy,
                    margin,
                    top: vec![(argmax, p_max), (argmax + 1, p_max - margin)],
                }
            })
            .collect()
    }

    /// The commit kernel against the CPU op (the decoder's host step) on random statistics: every
    /// rule, canvases of awkward sizes up to the largest, prompt cells and the EOS rule, steps
    /// until done and past it; cells, step count and history equal after every step.
    #[test]
    fn commit_kernel_matches_the_host_step() {
        let rules = [
            CommitRule::Threshold { threshold: 0.9 },
            CommitRule::Threshold { threshold: 0.3 },
            CommitRule::FixedSteps { steps: 1 },
            CommitRule::FixedSteps { steps: 3 },
            CommitRule::FixedSteps { steps: 7 },
            CommitRule::EntropyBound { gamma: 0.0 },
            CommitRule::EntropyBound { gamma: 0.3 },
            CommitRule::EntropyBound { gamma: 2.0 },
            CommitRule::Margin { margin: 0.2 },
            CommitRule::Margin { margin: 1.0 },
        ];
        let cpu = CpuBackend;
        let mut ties = 0;
        for (name, gpu) in backends(None) {
            let mut rng = Rng(7);
            for (ri, &rule) in rules.iter().enumerate() {
                for &n in &[1usize, 5, 16, 32, 33, 256] {
                    let known = (rng.next() % 3) as usize * n / 4;
                    let cells: Vec<Option<u32>> = (0..n)
                        .map(|i| (i < known).then(|| rng.pick(&[1, 2, EOS])))
                        .collect();
                    let p = CommitParams {
                        rule,
                        mask: MASK,
                        eos: (ri % 2 == 0 || n == 33).then_some(EOS),
                        output_from: known.min(n).saturating_sub((rng.next() % 2) as usize),
                        stats_from: known.saturating_sub((rng.next() % 2) as usize),
                    };
                    let mut c_cpu = cpu.new_canvas(&cells, MASK).unwrap();
                    let mut c_gpu = gpu.new_canvas(&cells, MASK).unwrap();
                    let mut step = 0;
                    loop {
                        let st = random_stats(&mut rng, n - p.stats_from);
                        let conf: Vec<u32> = st.iter().map(|s| s.p_max.to_bits()).collect();
                        ties += conf.len() - {
                            let mut u = conf.clone();
                            u.sort();
                            u.dedup();
                            u.len()
                        };
                        let want = step_both(&gpu, (&mut c_cpu, &mut c_gpu), &st, &p, step);
                        let got = gpu.read_canvas(&c_gpu, step..step + 1).unwrap();
                        assert_eq!(got, want, "{name}: {rule:?} n {n} step {step} {p:?}");
                        step += 1;
                        // Two steps past the end: a finished canvas stays as it is.
                        if want.cells.iter().all(Option::is_some) && step > want.steps + 1 {
                            break;
                        }
                    }
                    let all = gpu.read_canvas(&c_gpu, 0..n).unwrap();
                    assert_eq!(
                        all,
                        cpu.read_canvas(&c_cpu, 0..n).unwrap(),
                        "{name} history"
                    );
                }
            }
        }
        assert!(ties > 100, "the inputs must tie often ({ties} ties)");
    }

    /// AR's rule (`CommitRule::Next`) on the GPU against the CPU op, on random statistics: canvases
    /// of awkward sizes up to the largest with random known prefixes (EOS among them), the EOS
    /// rule on and off, one step per cell as decode/ar.rs records them (`stats_from` the step's
    /// cell) and past the end; cells, step count and history equal after every step. The CPU op
    /// is checked against the rule itself: the step's cell takes row 0's argmax and nothing else
    /// changes, unless the EOS rule fills the rest.
    #[test]
    fn next_rule_matches_the_host_step() {
        let cpu = CpuBackend;
        let (mut eos_ends, mut eos_off_kept) = (0, 0);
        for (name, gpu) in backends(None) {
            let mut rng = Rng(11);
            for &n in &[1usize, 2, 5, 33, 65, 256] {
                for eos_on in [true, false] {
                    // Mostly AR's canvas (cell 0 known), sometimes none or all known.
                    let known = (rng.next() as usize) % (n.min(4) + 1);
                    let cells: Vec<Option<u32>> = (0..n)
                        .map(|i| (i < known).then(|| rng.pick(&[1, 2, 2, EOS])))
                        .collect();
                    let output_from = known.min(1 + (rng.next() % 2) as usize);
                    let mut c_cpu = cpu.new_canvas(&cells, MASK).unwrap();
                    let mut c_gpu = gpu.new_canvas(&cells, MASK).unwrap();
                    let mut before = cells.clone();
                    // Two steps past the last cell: a finished canvas stays as it is.
                    for step in 0..n - known + 2 {
                        let p = CommitParams {
                            rule: CommitRule::Next,
                            mask: MASK,
                            eos: eos_on.then_some(EOS),
                            output_from,
                            stats_from: (known + step).min(n - 1),
                        };
                        // Only row 0 is read; the rows after it must not matter.
                        let rows = 1 + (rng.next() % 3) as usize;
                        let st = random_stats(&mut rng, rows);
                        let want = step_both(&gpu, (&mut c_cpu, &mut c_gpu), &st, &p, step);
                        let got = gpu.read_canvas(&c_gpu, step..step + 1).unwrap();
                        assert_eq!(got, want, "{name}: n {n} step {step} {p:?}");
                        // The rule itself, on the CPU op (the GPU's reference).
                        let mut rule = before.clone();
                        if rule.iter().any(Option::is_none) {
                            if rule[p.stats_from].is_none() {
                                rule[p.stats_from] = Some(st[0].argmax);
                            }
                            let first = (output_from..n).find(|&i| rule[i] == Some(EOS));
                            if let (true, Some(i)) = (eos_on, first) {
                                rule[i + 1..].fill(Some(EOS));
                                eos_ends += usize::from(i + 1 < n);
                            }
                        }
                        if !eos_on && rule.contains(&Some(EOS)) {
                            eos_off_kept += 1;
                        }
                        assert_eq!(want.cells, rule, "cpu: n {n} step {step} {p:?}");
                        before = rule;
                    }
                    let all = gpu.read_canvas(&c_gpu, 0..n).unwrap();
                    assert_eq!(
                        all,
                        cpu.read_canvas(&c_cpu, 0..n).unwrap(),
                        "{name} history"
                    );
                }
            }
        }
        assert!(eos_ends > 5, "the EOS rule must end canvases ({eos_ends})");
        assert!(
            eos_off_kept > 5,
            "EOS off must go on past it ({eos_off_kept})"
        );
    }

    /// AR's rule fits its step or is a typed error: at least one row, a cell inside the canvas,
    /// no cell beyond the first one that can still be masked.
    #[test]
    fn next_rule_checks_its_shape() {
        let cpu = CpuBackend;
        let cells = [Some(1), None, None, None];
        let p = |stats_from| CommitParams {
            rule: CommitRule::Next,
            mask: MASK,
            eos: Some(EOS),
            output_from: 1,
            stats_from,
        };
        let st = vec![PositionStats {
            argmax: 2,
            p_max: 0.5,
            entropy: 1.0,
            margin: 0.1,
            top: vec![(2, 0.5)],
        }];
        let mut cc = cpu.new_canvas(&cells, MASK).unwrap();
        // Cell 2 while cell 1 is still masked, cell 4 outside, no statistics.
        assert!(cpu.commit_step(&mut cc, &st, &p(2)).is_err());
        assert!(cpu.commit_step(&mut cc, &st, &p(4)).is_err());
        assert!(cpu.commit_step(&mut cc, &Vec::new(), &p(1)).is_err());
        cpu.commit_step(&mut cc, &st, &p(1)).unwrap();
        assert!(cpu.commit_step(&mut cc, &st, &p(3)).is_err());
        cpu.commit_step(&mut cc, &st, &p(2)).unwrap();
        let want = cpu.read_canvas(&cc, 0..4).unwrap();
        assert_eq!(want.cells, [Some(1), Some(2), Some(2), None]);
        for (name, gpu) in backends(None) {
            let mut c = gpu.new_canvas(&cells, MASK).unwrap();
            let sg = gpu.upload_stats(&st).unwrap();
            assert!(gpu.commit_step(&mut c, &sg, &p(2)).is_err(), "{name}");
            assert!(gpu.commit_step(&mut c, &sg, &p(4)).is_err(), "{name}");
            gpu.commit_step(&mut c, &sg, &p(1)).unwrap();
            assert!(gpu.commit_step(&mut c, &sg, &p(3)).is_err(), "{name}");
            gpu.commit_step(&mut c, &sg, &p(2)).unwrap();
            assert_eq!(gpu.read_canvas(&c, 0..4).unwrap(), want, "{name}");
        }
    }

    /// Tokens the commit kernel writes are what the next pass embeds.
    #[test]
    fn embedding_a_canvas_reads_its_input_ids() {
        use crate::format::{DType, TensorView};
        let (vocab, cols) = (37usize, 20usize);
        let table: Vec<f32> = (0..vocab * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
        let view = TensorView {
            name: "embed",
            dtype: DType::F32,
            shape: &[vocab, cols],
            bytes: bytemuck::cast_slice(&table),
        };
        let cells: Vec<Option<u32>> = vec![Some(4), None, Some(36), None, Some(0)];
        let ids = [4, 7, 36, 7, 0];
        let cpu = CpuBackend;
        let table_cpu = cpu.load_weight(view).unwrap();
        let canvas_cpu = cpu.new_canvas(&cells, 7).unwrap();
        let configs = backends(Some(1024));
        let gpus: Vec<_> = configs
            .iter()
            .map(|(name, gpu)| {
                let w = gpu.load_weight(view).unwrap();
                (name, gpu, w, gpu.new_canvas(&cells, 7).unwrap())
            })
            .collect();
        // Every run of cells (AR's steps embed one or two from an offset, a block's all of them),
        // against the plain gather of the ids expected there.
        for from in 0..5 {
            for t in 1..=5 - from {
                let want = cpu.embed(&table_cpu, &ids[from..from + t]).unwrap();
                let got = cpu.embed_canvas(&table_cpu, &canvas_cpu, from, t).unwrap();
                assert_eq!(got.data, want.data, "cpu: cells {from}..{}", from + t);
                for (name, gpu, w, canvas) in &gpus {
                    let got = gpu
                        .read_act(&gpu.embed_canvas(w, canvas, from, t).unwrap())
                        .unwrap();
                    assert_eq!(got, want.data, "{name}: cells {from}..{}", from + t);
                }
            }
        }
        // Outside the canvas, or no cell: typed errors.
        for (from, t) in [(0, 0), (0, 6), (5, 1), (4, 2), (usize::MAX, 2)] {
            assert!(cpu.embed_canvas(&table_cpu, &canvas_cpu, from, t).is_err());
            for (name, gpu, w, canvas) in &gpus {
                let r = gpu.embed_canvas(w, canvas, from, t);
                assert!(r.is_err(), "{name}: cells {from} + {t}");
            }
        }
    }
}
