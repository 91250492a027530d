//! The reference backend's `y = x · Wᵀ`, bit for bit the plain loop it replaces: every output is
//! `Σ_k w[o, k] · x[t, k]` summed in k order from −0.0, as `iter().map(..).sum::<f32>()` sums
//! (a product, then an add: no fused multiply-add). What changes is only how many such sums run
//! side by side. A sequential sum is one add every few cycles, its latency; blocks of weight rows
//! × tokens keep many independent sums in flight (the tokens of a block contiguous, so they are
//! SIMD lanes, 8 wide where the CPU has AVX), and blocks of weight rows go to the threads of
//! rayon's pool. The reference stays the reference: the same bits, sooner.

use rayon::prelude::*;

/// Weight rows of a block, and tokens of a block (SIMD lanes of the token-blocked kernel): 8, or
/// 4 for passes of at most 4 tokens (an expert's few tokens), which would leave most of 8 idle.
const ROWS: usize = 4;
const TOKS: usize = 8;
const TOKS_FEW: usize = 4;
/// Weight rows of the one-token kernel (independent scalar sums).
const ROWS1: usize = 8;
/// Multiply-adds below which a matmul runs on the calling thread: a task costs microseconds.
const PARALLEL_MIN: usize = 1 << 22;
/// Weight rows a thread's task takes at least.
const TASK_ROWS: usize = 32;

/// `out[t · n + o] = Σ_k w[o · k_len + k] · x[t · k_len + k]` for `n` weight rows and `t` tokens.
pub fn matmul(w: &[f32], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    matmul_on(has_avx(), w, n, k, x, t, out);
}

/// [`matmul`] with the AVX kernels where `avx` asks for them and the CPU has them, else the
/// baseline's (the tests run both).
fn matmul_on(avx: bool, w: &[f32], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let avx = avx && has_avx();
    debug_assert_eq!(w.len(), n * k);
    debug_assert_eq!(x.len(), t * k);
    debug_assert_eq!(out.len(), t * n);
    if n == 0 || t == 0 {
        return;
    }
    let tb = if t <= TOKS_FEW { TOKS_FEW } else { TOKS };
    let xt = if t > 1 {
        transposed(x, k, t, tb)
    } else {
        Vec::new()
    };
    // Each task writes its rows for every token into its own [rows × t] block (rows-major), then
    // the blocks are scattered to the [t × n] output.
    let rows_of = |o0: usize, o1: usize, dst: &mut [f32]| {
        let w = &w[o0 * k..o1 * k];
        if avx {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `avx` is true only where `has_avx` found the instructions these copies use.
            unsafe {
                rows_avx(w, k, x, &xt, t, tb, dst)
            };
            return;
        }
        rows_any(w, k, x, &xt, t, tb, dst);
    };
    let mut tr = vec![0.0f32; n * t];
    if n * k * t < PARALLEL_MIN || rayon::current_num_threads() == 1 {
        rows_of(0, n, &mut tr);
    } else {
        let per = n
            .div_ceil(rayon::current_num_threads())
            .max(TASK_ROWS)
            .next_multiple_of(ROWS1);
        tr.par_chunks_mut(per * t).enumerate().for_each(|(i, dst)| {
            let o0 = i * per;
            rows_of(o0, o0 + dst.len() / t, dst);
        });
    }
    for o in 0..n {
        for tok in 0..t {
            out[tok * n + o] = tr[o * t + tok];
        }
    }
}

/// The kernel for this pass's shape.
#[inline(always)]
fn rows_any(w: &[f32], k: usize, x: &[f32], xt: &[f32], t: usize, tb: usize, dst: &mut [f32]) {
    match (t, tb) {
        (1, _) => rows_one(w, k, x, dst),
        (_, TOKS_FEW) => rows_blocked::<TOKS_FEW>(w, k, xt, t, dst),
        _ => rows_blocked::<TOKS>(w, k, xt, t, dst),
    }
}

/// [`rows_any`] compiled for AVX: 8-lane vectors where the baseline x86-64 has 4. The same
/// multiplies and adds in the same order (Rust never fuses them), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn rows_avx(
    w: &[f32],
    k: usize,
    x: &[f32],
    xt: &[f32],
    t: usize,
    tb: usize,
    dst: &mut [f32],
) {
    rows_any(w, k, x, xt, t, tb, dst)
}

fn has_avx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The tokens transposed in blocks of `tb`: xt[b][k][j] = x[b · tb + j, k] (zeros past t).
fn transposed(x: &[f32], k: usize, t: usize, tb: usize) -> Vec<f32> {
    let mut xt = vec![0.0f32; t.div_ceil(tb) * k * tb];
    for tok in 0..t {
        let (b, j) = (tok / tb, tok % tb);
        let dst = &mut xt[b * k * tb..(b + 1) * k * tb];
        for (kk, &v) in x[tok * k..(tok + 1) * k].iter().enumerate() {
            dst[kk * tb + j] = v;
        }
    }
    xt
}

/// One token: `dst[o] = Σ_k w[o, k] · x[k]` over the rows of `w`, ROWS1 sums at a time.
#[inline(always)]
fn rows_one(w: &[f32], k: usize, x: &[f32], dst: &mut [f32]) {
    let n = dst.len();
    let mut o = 0;
    while o + ROWS1 <= n {
        let r: [&[f32]; ROWS1] = std::array::from_fn(|i| &w[(o + i) * k..(o + i + 1) * k]);
        let mut acc = [-0.0f32; ROWS1];
        for kk in 0..k {
            let xv = x[kk];
            for i in 0..ROWS1 {
                acc[i] += r[i][kk] * xv;
            }
        }
        dst[o..o + ROWS1].copy_from_slice(&acc);
        o += ROWS1;
    }
    for (i, d) in dst.iter_mut().enumerate().skip(o) {
        *d = w[i * k..(i + 1) * k]
            .iter()
            .zip(x)
            .map(|(a, b)| a * b)
            .sum();
    }
}

/// Several tokens (`xt`: blocks of TB, transposed): `dst[o · t + tok]` over the rows of `w`,
/// ROWS rows × TB tokens of sums at a time.
#[inline(always)]
fn rows_blocked<const TB: usize>(w: &[f32], k: usize, xt: &[f32], t: usize, dst: &mut [f32]) {
    let n = dst.len() / t;
    for (b, xb) in xt.chunks_exact(k * TB).enumerate() {
        let toks = (t - b * TB).min(TB);
        let mut o = 0;
        while o < n {
            let rows = (n - o).min(ROWS);
            let mut acc = [[-0.0f32; TB]; ROWS];
            if rows == ROWS {
                let r: [&[f32]; ROWS] = std::array::from_fn(|i| &w[(o + i) * k..(o + i + 1) * k]);
                for (kk, xk) in xb.chunks_exact(TB).enumerate() {
                    for i in 0..ROWS {
                        let wv = r[i][kk];
                        for j in 0..TB {
                            acc[i][j] += wv * xk[j];
                        }
                    }
                }
            } else {
                for (i, a) in acc.iter_mut().enumerate().take(rows) {
                    let r = &w[(o + i) * k..(o + i + 1) * k];
                    for (kk, xk) in xb.chunks_exact(TB).enumerate() {
                        let wv = r[kk];
                        for j in 0..TB {
                            a[j] += wv * xk[j];
                        }
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(rows) {
                for (j, &v) in a.iter().enumerate().take(toks) {
                    dst[(o + i) * t + b * TB + j] = v;
                }
            }
            o += rows;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain loop this module replaces.
    fn plain(w: &[f32], n: usize, k: usize, x: &[f32], t: usize) -> Vec<f32> {
        let mut out = vec![0.0; t * n];
        for o in 0..n {
            for tok in 0..t {
                out[tok * n + o] = w[o * k..(o + 1) * k]
                    .iter()
                    .zip(&x[tok * k..(tok + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum();
            }
        }
        out
    }

    fn values(seed: u64, len: usize) -> Vec<f32> {
        let mut rng = crate::decode::Rng::new(seed);
        (0..len)
            .map(|i| {
                let v = (rng.next_f32() - 0.5) * 3.0;
                // Zeros of both signs now and then: the sums' start (−0.0) shows in them.
                match i % 97 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => v,
                }
            })
            .collect()
    }

    /// Bit for bit the plain loop, with the baseline and the AVX kernels: one token and blocks of tokens, ragged row and token blocks,
    /// shapes small enough for the calling thread and large enough for the pool, and a row of
    /// −0.0 products (the sums start at −0.0, as `sum` does).
    #[test]
    fn blocked_and_threaded_sums_are_the_plain_loops_bits() {
        for (n, k, t) in [
            (1, 1, 1),
            (7, 13, 1),
            (9, 33, 3),
            (19, 40, 9),
            (300, 96, 1),
            (301, 257, 17),
            (2048, 256, 2),
            (513, 512, 8),
        ] {
            let mut w = values(n as u64 * 31 + k as u64, n * k);
            let mut x = values(t as u64 * 7 + 1, t * k);
            // Token 0 against row 0: every product −0.0, whose sum from −0.0 stays −0.0 (from
            // +0.0 it would be +0.0).
            for v in &mut w[..k] {
                *v = v.abs();
            }
            for v in &mut x[..k] {
                *v = -0.0;
            }
            let want = plain(&w, n, k, &x, t);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            // The baseline kernels, and the AVX copies where this machine has AVX.
            for avx in [false, has_avx()] {
                let mut got = vec![f32::NAN; t * n];
                matmul_on(avx, &w, n, k, &x, t, &mut got);
                assert!(bits(&got) == bits(&want), "n{n} k{k} t{t} avx {avx}");
            }
        }
    }
}
