//! The denoising canvas on the CPU: the block's cells in host memory, and a commit op that is the
//! decoder's own host step (`decode::denoise::commit_greedy`), so the GPU kernel
//! (shaders/denoise.wgsl) is tested against the code the host loop runs, not against a copy of it.

use std::ops::Range;

use super::{CpuAct, CpuBackend, CpuWeight};
use crate::backend::shapes;
use crate::backend::{Backend, CanvasState, CommitParams, PositionStats, Result};

/// A block being denoised, in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuCanvas {
    cells: Vec<Option<u32>>,
    mask: u32,
    steps: usize,
    /// The first masked cell when the canvas was made (cells only ever go from masked to known).
    first_masked: usize,
    /// Commit steps asked for so far, a finished canvas's included ([`CommitParams::check`]).
    recorded: usize,
    /// `history[s]`: the cells after step `s + 1`.
    history: Vec<Vec<Option<u32>>>,
}

pub fn new_canvas(cells: &[Option<u32>], mask: u32) -> CpuCanvas {
    CpuCanvas {
        cells: cells.to_vec(),
        mask,
        steps: 0,
        first_masked: cells
            .iter()
            .position(Option::is_none)
            .unwrap_or(cells.len()),
        recorded: 0,
        history: Vec::new(),
    }
}

pub fn commit_step(c: &mut CpuCanvas, stats: &[PositionStats], p: &CommitParams) -> Result<()> {
    p.check(c.cells.len(), c.first_masked, c.recorded, stats.len())?;
    c.recorded += 1;
    if c.cells.iter().all(Option::is_some) {
        return Ok(());
    }
    crate::decode::denoise::commit_greedy(&mut c.cells, c.steps, stats, p);
    c.steps += 1;
    c.history.push(c.cells.clone());
    Ok(())
}

pub fn read_canvas(c: &CpuCanvas, steps: Range<usize>) -> CanvasState {
    let end = steps.end.min(c.steps);
    CanvasState {
        steps: c.steps,
        cells: c.cells.clone(),
        history: c.history[steps.start.min(end)..end].to_vec(),
    }
}

pub fn embed_canvas(
    b: &CpuBackend,
    table: &CpuWeight,
    c: &CpuCanvas,
    from: usize,
    t: usize,
) -> Result<CpuAct> {
    shapes::canvas_cells(from, t, c.cells.len())?;
    let ids: Vec<u32> = c.cells[from..from + t]
        .iter()
        .map(|t| t.unwrap_or(c.mask))
        .collect();
    b.embed(table, &ids)
}
