//! The reference backend's `y = x · Wᵀ`, bit for bit the plain loop it replaces: every output is
//! `Σ_k w[o, k] · x[t, k]` summed in k order from −0.0, as `iter().map(..).sum::<f32>()` sums
//! (a product, then an add: no fused multiply-add). What changes is only how many such sums run
//! side by side. A sequential sum is one add every few cycles, its latency; blocks of weight rows
//! × tokens keep many independent sums in flight (the tokens of a block contiguous, so they are
//! SIMD lanes), and blocks of weight rows go to the threads of rayon's pool. The reference stays
//! the reference: the same bits, sooner.

use rayon::prelude::*;

/// Weight rows of a block, and tokens of a block (SIMD lanes of the token-blocked kernel).
const ROWS: usize = 4;
const TOKS: usize = 8;
/// Weight rows of the one-token kernel (independent scalar sums).
const ROWS1: usize = 8;
/// Multiply-adds below which a matmul runs on the calling thread: a task costs microseconds.
const PARALLEL_MIN: usize = 1 << 22;
/// Weight rows a thread's task takes at least.
const TASK_ROWS: usize = 32;

/// `out[t · n + o] = Σ_k w[o · k_len + k] · x[t · k_len + k]` for `n` weight rows and `t` tokens.
pub fn matmul(w: &[f32], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    debug_assert_eq!(w.len(), n * k);
    debug_assert_eq!(x.len(), t * k);
    debug_assert_eq!(out.len(), t * n);
    if n == 0 || t == 0 {
        return;
    }
    // The tokens transposed in blocks of TOKS: xt[b][k][j] = x[b · TOKS + j, k] (zeros past t).
    let blocks = t.div_ceil(TOKS);
    let xt = if t > 1 {
        let mut xt = vec![0.0f32; blocks * k * TOKS];
        for tok in 0..t {
            let (b, j) = (tok / TOKS, tok % TOKS);
            let dst = &mut xt[b * k * TOKS..(b + 1) * k * TOKS];
            for (kk, &v) in x[tok * k..(tok + 1) * k].iter().enumerate() {
                dst[kk * TOKS + j] = v;
            }
        }
        xt
    } else {
        Vec::new()
    };
    // Each task writes its rows for every token into its own [rows × t] block (rows-major), then
    // the blocks are scattered to the [t × n] output.
    let rows_of = |o0: usize, o1: usize, dst: &mut [f32]| {
        if t == 1 {
            rows_one(&w[o0 * k..o1 * k], k, x, dst);
        } else {
            rows_blocked(&w[o0 * k..o1 * k], k, &xt, t, dst);
        }
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

/// One token: `dst[o] = Σ_k w[o, k] · x[k]` over the rows of `w`, ROWS1 sums at a time.
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

/// Several tokens (`xt`: blocks of TOKS, transposed): `dst[o · t + tok]` over the rows of `w`,
/// ROWS rows × TOKS tokens of sums at a time.
fn rows_blocked(w: &[f32], k: usize, xt: &[f32], t: usize, dst: &mut [f32]) {
    let n = dst.len() / t;
    for (b, xb) in xt.chunks_exact(k * TOKS).enumerate() {
        let toks = (t - b * TOKS).min(TOKS);
        let mut o = 0;
        while o < n {
            let rows = (n - o).min(ROWS);
            let mut acc = [[-0.0f32; TOKS]; ROWS];
            if rows == ROWS {
                let r: [&[f32]; ROWS] = std::array::from_fn(|i| &w[(o + i) * k..(o + i + 1) * k]);
                for (kk, xk) in xb.chunks_exact(TOKS).enumerate() {
                    for i in 0..ROWS {
                        let wv = r[i][kk];
                        for j in 0..TOKS {
                            acc[i][j] += wv * xk[j];
                        }
                    }
                }
            } else {
                for (i, a) in acc.iter_mut().enumerate().take(rows) {
                    let r = &w[(o + i) * k..(o + i + 1) * k];
                    for (kk, xk) in xb.chunks_exact(TOKS).enumerate() {
                        let wv = r[kk];
                        for j in 0..TOKS {
                            a[j] += wv * xk[j];
                        }
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(rows) {
                for (j, &v) in a.iter().enumerate().take(toks) {
                    dst[(o + i) * t + b * TOKS + j] = v;
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
        let mut s = seed;
        (0..len)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0;
                // Zeros of both signs now and then: the sums' start (−0.0) shows in them.
                match i % 97 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => v,
                }
            })
            .collect()
    }

    /// Bit for bit the plain loop: one token and blocks of tokens, ragged row and token blocks,
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
            let mut got = vec![f32::NAN; t * n];
            matmul(&w, n, k, &x, t, &mut got);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert!(bits(&got) == bits(&want), "n{n} k{k} t{t}");
        }
    }
}
