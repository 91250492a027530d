//! Yardsticks of the device, for `bench` to set a pass's times against: the copy bandwidth (what
//! moving bytes can cost at best), the dispatch floor (what a kernel costs before it does
//! anything, untimed and as the kernel timing measures it) and the latency of a dependent load
//! (what each round of loads inside a kernel waits). Each is a short, self-contained run through
//! the backend's own recorder, so it measures the path the forward pass takes.

use super::pool::GpuBuffer;
use super::{ops, recorder, GpuBackend, Result};

/// Wall-clock µs per trivial dispatch ([`dispatch_floor`]).
#[derive(Clone, Copy, Debug)]
pub struct DispatchFloor {
    /// Each behind a barrier (it writes what the previous one wrote).
    pub dependent: f64,
    /// The same, alternating between two pipelines.
    pub switching: f64,
    /// None waiting for another.
    pub independent: f64,
    /// The dependent chain's mean GPU time a dispatch as the kernel timing measures it (each
    /// dispatch in a compute pass of its own between two timestamps); `None` without timestamps.
    /// Against `dependent`, what the timing adds to every kernel in `bench` tables.
    pub timed: Option<f64>,
    /// Host µs a dispatch of the dependent chain: recording it (the recorder and wgpu's pass
    /// encoding), and its share of finishing and submitting the command buffer.
    pub host_record: f64,
    pub host_submit: f64,
}

/// The device's copy bandwidth (read + written bytes per second) two ways ([`copy_bandwidth`]).
#[derive(Clone, Copy, Debug)]
pub struct CopyBandwidth {
    /// `copy_buffer_to_buffer`.
    pub buffer_copy: f64,
    /// A compute-shader copy (`None` where the buffers exceed what one dispatch can cover).
    pub shader_copy: Option<f64>,
}

impl CopyBandwidth {
    /// The larger of the two: the device's copy bandwidth.
    pub fn best(&self) -> f64 {
        self.shader_copy
            .map_or(self.buffer_copy, |s| s.max(self.buffer_copy))
    }
}

/// Seconds of one [`one_submission`].
struct SubmissionTimes {
    /// Recording it.
    record: f64,
    /// Finishing and submitting the command buffer.
    submit: f64,
    /// From the start of the submission to the GPU's completion.
    run: f64,
}

/// Records `f` into one submission, submits it and waits for the GPU. Nothing is submitted
/// part-way (GpuOptions::submit_every is off while `f` records), so no part of the work runs
/// before the clock of `run` starts.
fn one_submission(
    b: &GpuBackend,
    f: impl FnOnce(&mut recorder::Ctx) -> Result<()>,
) -> Result<SubmissionTimes> {
    let t_rec = std::time::Instant::now();
    b.with(|ctx| {
        let every = std::mem::replace(&mut ctx.st.submit_every, 0);
        let r = f(ctx);
        ctx.st.submit_every = every;
        r
    })?;
    let record = t_rec.elapsed().as_secs_f64();
    let t0 = std::time::Instant::now();
    b.with(|ctx| Ok(ctx.flush()?))?;
    let submit = t0.elapsed().as_secs_f64();
    b.sh.dev.wait()?;
    Ok(SubmissionTimes {
        record,
        submit,
        run: t0.elapsed().as_secs_f64(),
    })
}

/// [`load_latency`]'s chain over `words` words (a multiple of 32, at least 64): word
/// 32·s links slot s to the next slot of one shuffled cycle through all of them (as a word index);
/// the other words are 0. Also the cycle's order (slot k of the walk from slot `order[0]`). A walk
/// from any slot's link visits every slot once a cycle.
pub(super) fn latency_chain(words: usize) -> (Vec<u32>, Vec<u32>) {
    let slots = words / 32;
    // A shuffled cycle through the slots (xorshift; any fixed order does).
    let mut order: Vec<u32> = (0..slots as u32).collect();
    let mut r = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..slots).rev() {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        order.swap(i, (r % (i as u64 + 1)) as usize);
    }
    let mut chain = vec![0u32; words];
    for (i, &s) in order.iter().enumerate() {
        chain[s as usize * 32] = order[(i + 1) % slots] * 32;
    }
    (chain, order)
}

/// The device's memory bandwidth as copies see it: bytes moved (read + written, STREAM's
/// convention) per second, over `iters` copies of `bytes` in one submission after a warm-up
/// copy, once by `copy_buffer_to_buffer` and once by a compute shader (16 bytes per invocation;
/// some drivers run buffer copies on a copy engine well below the memory's bandwidth). Wall-clock
/// timed (timestamps inside encoders are a further feature); with copies of hundreds of MiB the
/// submission overhead is far below the copy time.
pub fn copy_bandwidth(b: &GpuBackend, bytes: u64, iters: usize) -> Result<CopyBandwidth> {
    let dev = &b.sh.dev;
    let bytes = bytes.min(dev.limits.max_buffer_size) & !255;
    let iters = iters.max(1);
    let usage =
        wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::STORAGE;
    let src = GpuBuffer::new(&dev.device, bytes, usage, "copy source");
    let dst = GpuBuffer::new(&dev.device, bytes, usage, "copy target");
    let run = |n: usize| -> Result<f64> {
        let mut enc = dev
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("copy bandwidth"),
            });
        for _ in 0..n {
            enc.copy_buffer_to_buffer(&src.raw, 0, &dst.raw, 0, bytes);
        }
        let t0 = std::time::Instant::now();
        dev.queue.submit([enc.finish()]);
        dev.wait()?;
        Ok(t0.elapsed().as_secs_f64())
    };
    // The warm-up also makes the source resident (a fresh buffer may be lazily backed).
    b.sh.dev
        .queue
        .write_buffer(&src.raw, 0, &vec![1u8; bytes.min(1 << 20) as usize]);
    run(1)?;
    let buffer_copy = 2.0 * bytes as f64 * iters as f64 / run(iters)?;
    // The shader copy binds whole buffers: at most one binding's worth.
    let sbytes = bytes.min(b.sh.dev.max_binding) & !255;
    let units = sbytes / 16;
    let shader = |n: usize| -> Result<f64> {
        let p = ops::elementwise::EwParams {
            n: units as u32,
            cols: 0,
            pattern: 0,
            _pad: 0,
        };
        let t = one_submission(b, |ctx| {
            for _ in 0..n {
                ctx.dispatch(
                    &ops::elementwise::COPY16,
                    0,
                    &p,
                    None,
                    &[&src, &dst],
                    recorder::Grid::Linear(units.div_ceil(64)),
                )?;
            }
            Ok(())
        })?;
        Ok(t.run)
    };
    let shader_copy = if units > 0 && units <= u32::MAX as u64 {
        shader(1)?;
        Some(2.0 * sbytes as f64 * iters as f64 / shader(iters)?)
    } else {
        None
    };
    Ok(CopyBandwidth {
        buffer_copy,
        shader_copy,
    })
}

/// The cost of a dispatch that does (almost) nothing, from `n` of them in one submission,
/// wall-clock µs each after a warm-up: `dependent` — each writes the buffer the previous one
/// wrote, so a barrier separates them, as the kernels of a forward pass are separated;
/// `switching` — the same chain alternating between two kernels, as a pass switches
/// pipelines at every dispatch; and `independent` — each writes its own buffer, so none waits
/// for another. The first two are the floor under every kernel of a pass; the gap to the last
/// is what the barriers cost.
pub fn dispatch_floor(b: &GpuBackend, n: usize) -> Result<DispatchFloor> {
    let dev = &b.sh.dev;
    let n = n.max(1);
    let usage = wgpu::BufferUsages::STORAGE;
    let src = GpuBuffer::new(&dev.device, 256, usage, "dispatch floor source");
    let dsts: Vec<_> = (0..n)
        .map(|_| GpuBuffer::new(&dev.device, 256, usage, "dispatch floor target"))
        .collect();
    let p = ops::elementwise::EwParams {
        n: 1,
        cols: 0,
        pattern: 0,
        _pad: 0,
    };
    // own: each its own target; switch: every other dispatch adds the source to the target
    // (a += b over its first 4 values) instead of copying it.
    let record = |ctx: &mut recorder::Ctx, own: bool, switch: bool| -> Result<()> {
        for (i, d) in dsts
            .iter()
            .take(if own { n } else { 1 })
            .cycle()
            .take(n)
            .enumerate()
        {
            if switch && i % 2 == 1 {
                ops::elementwise::record_add(ctx, d, &src, 4)?;
                continue;
            }
            ctx.dispatch(
                &ops::elementwise::COPY16,
                0,
                &p,
                None,
                &[&src, d],
                recorder::Grid::Linear(1),
            )?;
        }
        Ok(())
    };
    // (GPU µs a dispatch: submission to completion; host µs a dispatch recording; submitting.)
    let run = |own: bool, switch: bool| -> Result<(f64, f64, f64)> {
        let t = one_submission(b, |ctx| record(ctx, own, switch))?;
        let us = |s: f64| s * 1e6 / n as f64;
        Ok((us(t.run), us(t.record), us(t.submit)))
    };
    // The best of two runs after a warm-up, each figure on its own.
    let best = |own, switch| -> Result<(f64, f64, f64)> {
        run(own, switch)?;
        let (a, b) = (run(own, switch)?, run(own, switch)?);
        Ok((a.0.min(b.0), a.1.min(b.1), a.2.min(b.2)))
    };
    let (dependent, host_record, host_submit) = best(false, false)?;
    let switching = best(false, true)?.0;
    let independent = best(true, false)?.0;
    let timed = if b.start_timing(n as u32) {
        run(false, false)?;
        let spans = b.finish_timing()?;
        (!spans.is_empty())
            .then(|| spans.iter().map(|s| s.1).sum::<f64>() / 1e3 / spans.len() as f64)
    } else {
        None
    };
    Ok(DispatchFloor {
        dependent,
        switching,
        independent,
        timed,
        host_record,
        host_submit,
    })
}

/// The latency of a dependent load, ns: one invocation follows a chain of links spread over
/// `bytes` of a buffer (one link every 128 bytes, in a shuffled order, so neighbouring links
/// share no cache line), timed over `steps` and `2 · steps` links, the difference over `steps`
/// (the launch cancels out). `warm`: after a walk of the whole cycle, so every link is in
/// whatever cache holds the buffer (an L2 hit where it fits); else two walks from far-apart
/// points of a cycle much longer than both, each link read once (device memory, where the
/// buffer is far over the caches). Returns the latency and the bytes the chain spans (`bytes`,
/// or less where the device's binding limit is lower).
pub fn load_latency(b: &GpuBackend, bytes: u64, steps: u32, warm: bool) -> Result<(f64, u64)> {
    let dev = &b.sh.dev;
    let words = (bytes.min(dev.max_binding) / 128).max(2) as usize * 32;
    let (chain, order) = latency_chain(words);
    let slots = words / 32;
    let buf = GpuBuffer::new(
        &dev.device,
        (words * 4) as u64,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        "load latency chain",
    );
    dev.queue
        .write_buffer(&buf.raw, 0, bytemuck::cast_slice(&chain));
    // A walk of n links from cycle position k.
    let walk = |k: usize, n: u32| -> Result<f64> {
        let p = ops::elementwise::EwParams {
            n,
            // The end of the walk lands in a word no link uses.
            cols: (words - 1) as u32,
            pattern: order[k % slots] * 32,
            _pad: 0,
        };
        let t = one_submission(b, |ctx| {
            ctx.dispatch(
                &ops::elementwise::CHASE,
                0,
                &p,
                None,
                &[&buf],
                recorder::Grid::Linear(1),
            )?;
            Ok(())
        })?;
        Ok(t.run)
    };
    let (steps, one, two) = if warm {
        let steps = steps.max(1);
        walk(0, slots as u32)?;
        (steps, walk(0, steps)?, walk(0, steps.saturating_mul(2))?)
    } else {
        // Cold: the walks must not meet (3 · steps links in all, from opposite points).
        let steps = steps.clamp(1, (slots / 8).max(1) as u32);
        // One link first, elsewhere on the cycle: the first walk over a buffer pays one-time
        // costs the timed ones must not.
        walk(slots / 4, 1)?;
        (steps, walk(0, steps)?, walk(slots / 2, 2 * steps)?)
    };
    Ok((
        ((two - one) * 1e9 / f64::from(steps)).max(0.0),
        (words * 4) as u64,
    ))
}
