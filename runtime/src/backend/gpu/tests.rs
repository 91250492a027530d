//! Every GPU op against the CPU reference: one test body, generic over the backend, runs on the CPU
//! and on each GPU configuration (features on and off, outputs poisoned with NaN), on fresh seeded
//! random inputs with sizes that are not tile multiples. Both backends load the same file bytes, so
//! quantized weights dequantize to the same values on both and the f32 bound (relative L2 ≤ 1e-4)
//! holds for every weight type.

use std::sync::Arc;

use super::testing::{backends, rel_l2};
use super::{kernels, ops, GpuAct, GpuBackend, GpuExperts, GpuRouting, GpuWeight};
use crate::arch::{names, Architecture, Gating, ModelConfig, QkNorm, SlidingAttention};
use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::{
    AttnMask, Backend, BlockRouting, CcaParams, CcaWeights, MlpRouterParams, MlpRouterWeights,
    PositionStats,
};
use crate::format::{dtype, DType, EdmFile, TensorView};
use crate::synth::{self, SynthSpec};

const TOL: f32 = 1e-4;

/// Host access to activations, for tests.
trait HostIo: Backend {
    fn put(&self, rows: usize, cols: usize, data: &[f32]) -> Self::Act;
    fn get(&self, x: &Self::Act) -> Vec<f32>;
    /// Writes whole K and V rows from row 0 of `layer`'s cache (a long cache without the
    /// quadratic pass that would fill it).
    fn put_kv(&self, kv: &mut Self::Kv, layer: usize, k: &[f32], v: &[f32]);
}

impl HostIo for CpuBackend {
    fn put(&self, rows: usize, cols: usize, data: &[f32]) -> CpuAct {
        CpuAct::new(rows, cols, data.to_vec())
    }
    fn get(&self, x: &CpuAct) -> Vec<f32> {
        x.data.clone()
    }
    fn put_kv(&self, kv: &mut crate::backend::cpu::CpuKv, layer: usize, k: &[f32], v: &[f32]) {
        kv.write_rows(layer, k, v);
    }
}

impl HostIo for GpuBackend {
    fn put(&self, rows: usize, cols: usize, data: &[f32]) -> super::GpuAct {
        self.upload_act(rows, cols, data).unwrap()
    }
    fn get(&self, x: &super::GpuAct) -> Vec<f32> {
        self.read_act(x).unwrap()
    }
    fn put_kv(&self, kv: &mut super::kv::GpuKv, layer: usize, k: &[f32], v: &[f32]) {
        assert_eq!(kv.base, 0, "a cache of its own");
        self.with(|ctx| {
            ctx.upload(bytemuck::cast_slice(k), &kv.k[layer])?;
            Ok(ctx.upload(bytemuck::cast_slice(v), &kv.v[layer])?)
        })
        .unwrap();
    }
}

/// Seeded uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// A weight of `dtype` loaded from the bytes a model file would hold.
/// Options with outputs poisoned before kernels write them and `kernels` chosen (the rest from
/// the environment).
fn poisoned(kernels: super::choice::KernelChoice) -> super::GpuOptions {
    super::GpuOptions {
        poison: true,
        kernels,
        ..super::GpuOptions::from_env()
    }
}

fn weight<B: Backend>(b: &B, dtype: DType, shape: &[usize], values: &[f32]) -> B::Weight {
    let bytes = dtype::encode(dtype, values, *shape.last().unwrap());
    b.load_weight(TensorView {
        name: "w",
        dtype,
        shape,
        bytes: &bytes,
    })
    .unwrap()
}

/// Runs `body` on the CPU and on every GPU configuration and compares each named output.
fn check_backends<F, G>(name: &str, tol: f32, max_binding: Option<u64>, cpu: F, gpu: G)
where
    F: Fn(&CpuBackend) -> Vec<(String, Vec<f32>)>,
    G: Fn(&GpuBackend) -> Vec<(String, Vec<f32>)>,
{
    let want = cpu(&CpuBackend);
    // Float activations, as the CPU's: the wide q4 kernels' 8-bit ones (the default) are held to
    // the CPU's codes by tests of their own (wide_gemv_with_8_bit_activations_...).
    let float = super::GpuOptions {
        poison: true,
        max_binding,
        kernels: super::KernelChoice {
            wide_q8_act: false,
            ..super::KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    for (label, g) in super::testing::backends_with(float) {
        let got = gpu(&g);
        assert_eq!(want.len(), got.len());
        for ((what, w), (_, v)) in want.iter().zip(&got) {
            let err = rel_l2(v, w);
            assert!(
                err <= tol,
                "{name}: {what} on {label}: relative L2 {err:e} > {tol:e}"
            );
        }
    }
}

/// `test_backends!(name, tol, |b| body)`: the body is generic over the backend (`B: HostIo`) and
/// returns named outputs; it runs on the CPU and every GPU configuration.
macro_rules! test_backends {
    ($name:ident, $tol:expr, $max_binding:expr, |$b:ident| $body:block) => {
        #[test]
        fn $name() {
            fn body<B: HostIo>($b: &B) -> Vec<(String, Vec<f32>)> $body
            check_backends(stringify!($name), $tol, $max_binding, body::<CpuBackend>, body::<GpuBackend>);
        }
    };
    ($name:ident, $tol:expr, |$b:ident| $body:block) => {
        test_backends!($name, $tol, None, |$b| $body);
    };
}

const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::Q8, DType::Q4];

#[test]
fn params_structs_match_their_wgsl_layout() {
    for (entry, size) in ops::all_entries() {
        let wgsl = kernels::PARAMS_SIZES
            .iter()
            .find(|(f, n, _)| *f == entry.file && *n == entry.params)
            .unwrap_or_else(|| panic!("{} has no struct {}", entry.file, entry.params));
        assert_eq!(
            wgsl.2 as usize, size,
            "{}::{} params: WGSL {} bytes, host {size}",
            entry.file, entry.name, wgsl.2
        );
        assert_eq!(
            size % 16,
            0,
            "{} params are not a multiple of 16 bytes",
            entry.params
        );
    }
}

test_backends!(
    matmul_matches_cpu_for_every_weight_type_and_odd_shape,
    TOL,
    |b| {
        let mut out = Vec::new();
        let mut rng = Rng(1);
        // (rows T, out N, in K): T covers gemv (≤ 4, and token blocks of 4 up to 16) and gemm
        // (> 16); K = 70 is no multiple of 8 or 32; K = 1056 and 1088 take the gemv through its
        // four-octets-ahead loop and its remainder, and the wide q4/q8 gemv through 16 lanes a
        // row (q4: 33, 34 chunks) or 64 (q8), blocks of 3 tokens; K = 2048 (blocks of 2, 64
        // lanes) and 4096 (one token a block) its other staging sizes.
        for &(t, n, k) in &[
            (1, 37, 96),
            (2, 21, 1056),
            (9, 45, 1088),
            (7, 70, 2048),
            (3, 9, 4096),
            (3, 130, 160),
            (5, 67, 96),
            (17, 100, 224),
            (37, 9, 32),
            (70, 67, 96),
        ] {
            for dtype in DTYPES {
                let w = weight(b, dtype, &[n, k], &rng.vec(n * k, 0.5));
                let x = b.put(t, k, &rng.vec(t * k, 1.0));
                out.push((
                    format!("{dtype} t{t} n{n} k{k}"),
                    b.get(&b.matmul(&w, &x).unwrap()),
                ));
            }
            for dtype in [DType::F32, DType::F16] {
                let k = k - 26;
                let w = weight(b, dtype, &[n, k], &rng.vec(n * k, 0.5));
                let x = b.put(t, k, &rng.vec(t * k, 1.0));
                out.push((
                    format!("{dtype} t{t} n{n} k{k}"),
                    b.get(&b.matmul(&w, &x).unwrap()),
                ));
            }
        }
        out
    }
);

/// (T, N, K) of the token blocks the tensor-core matmul serves (T ≥ choice::COOP_MIN_T): one exact 64 × 128
/// tile, then partial tiles along every axis, K past a step of 32 and no multiple of 8, several
/// workgroups along T and N.
const COOP_SHAPES: [(usize, usize, usize); 5] = [
    (64, 128, 64),
    (70, 67, 96),
    (65, 129, 33),
    (130, 200, 70),
    (200, 300, 160),
];

/// The large-block matmuls for each of `dtypes`: f16, q8 and q4 weights run on the tensor-core kernel
/// where the device lends cooperative matrices, f32 weights (and all, elsewhere) on the tiled one.
fn large_block_matmuls<B: HostIo>(b: &B, dtypes: &[DType]) -> Vec<(String, Vec<f32>)> {
    block_matmuls(b, dtypes, &COOP_SHAPES, 11)
}

/// `x · Wᵀ` for each (T, N, K) of `shapes` and each of `dtypes`, on fresh random inputs from `seed`.
fn block_matmuls<B: HostIo>(
    b: &B,
    dtypes: &[DType],
    shapes: &[(usize, usize, usize)],
    seed: u64,
) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    let mut rng = Rng(seed);
    for &(t, n, k) in shapes {
        for &dtype in dtypes {
            // Quantized rows hold whole groups of 32.
            let k = if dtype.is_quantized() {
                k.div_ceil(32) * 32
            } else {
                k
            };
            let w = weight(b, dtype, &[n, k], &rng.vec(n * k, 0.5));
            // Activations of mixed magnitude, as hidden states are: their f16 rounding shows.
            let x: Vec<f32> = rng
                .vec(t * k, 1.0)
                .iter()
                .enumerate()
                .map(|(i, v)| if i % 7 == 0 { v * 300.0 } else { *v })
                .collect();
            let x = b.put(t, k, &x);
            out.push((
                format!("{dtype} t{t} n{n} k{k}"),
                b.get(&b.matmul(&w, &x).unwrap()),
            ));
        }
    }
    out
}

test_backends!(
    large_block_matmuls_match_cpu_for_every_weight_type,
    TOL,
    |b| { large_block_matmuls(b, &DTYPES) }
);

/// The measurement probes reach the kernels (`EDGEDIFF_PROBE`, shaders/lib/probe.wgsl): leaving
/// the q4 decode or the activation loads out changes a q4 matmul's values, through the
/// word-a-lane gemv (one row) and the wide one (5 rows), and probe 0 changes nothing.
#[test]
fn probes_reach_the_kernels() {
    let opts = |probe| super::GpuOptions {
        kernels: super::KernelChoice {
            probe,
            ..super::KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    let mut rng = Rng(41);
    let (n, k) = (40, 256);
    let wv = rng.vec(n * k, 0.5);
    let xv = rng.vec(5 * k, 1.0);
    let run = |probe: u32, t: usize| {
        let b = GpuBackend::new(&opts(probe)).unwrap();
        let w = weight(&b, DType::Q4, &[n, k], &wv);
        let x = b.put(t, k, &xv[..t * k]);
        b.get(&b.matmul(&w, &x).unwrap())
    };
    for t in [1, 5] {
        let plain = run(0, t);
        assert_eq!(run(0, t), plain, "{t} rows: no probe, same values");
        for probe in [1, 2] {
            assert_ne!(run(probe, t), plain, "probe {probe}, {t} rows");
        }
    }
}

#[test]
fn matmul_kernel_choice_uses_tensor_cores_only_where_lent() {
    use super::choice::{KernelChoice, COOP_MIN_T};
    use ops::matmul::{coop_tile_t, MatmulKernel::*};
    let d = KernelChoice::default();
    let matmul_kernel =
        |coop, dtype, t, rows, bytes| ops::matmul::matmul_kernel(&d, coop, dtype, t, rows, bytes);
    let t = COOP_MIN_T;
    for dtype in [DType::F16, DType::Q8, DType::Q4] {
        assert_eq!(matmul_kernel(true, dtype, t, 4096, 32 << 20), Coop);
        assert_eq!(matmul_kernel(true, dtype, 4096, 4096, 32 << 20), Coop);
        // No cooperative matrices: the tiled kernel, whatever the shape.
        assert_eq!(matmul_kernel(false, dtype, 4096, 4096, 32 << 20), Tiled);
        // Few rows, or a weight that stays in L2 between token blocks: the gemv kernels.
        assert_eq!(matmul_kernel(true, dtype, 16, 512, 1 << 20), GemvBlocked);
        assert_eq!(matmul_kernel(true, dtype, 4, 4096, 32 << 20), Gemv);
    }
    // f32 weights would round in f16: the SIMT kernels; small ones (routers) the gemv up to
    // 64 tokens, where the tiles would leave the GPU idle.
    assert_eq!(matmul_kernel(true, DType::F32, 4096, 4096, 32 << 20), Tiled);
    assert_eq!(
        matmul_kernel(true, DType::F32, 32, 256, 2 << 20),
        GemvBlocked
    );
    assert_eq!(
        matmul_kernel(true, DType::F32, 64, 256, 2 << 20),
        GemvBlocked
    );
    assert_eq!(matmul_kernel(true, DType::F32, 65, 256, 2 << 20), Tiled);
    assert_eq!(matmul_kernel(true, DType::F32, 32, 4096, 64 << 20), Tiled);
    assert_eq!(
        [1, 16, 17, 32, 33, 64, 4096].map(coop_tile_t),
        [16, 16, 32, 32, 64, 64, 64]
    );
    // The knobs move the boundaries: the earlier router rule, tensor cores from 32 tokens, the
    // gemv up to 16 rows.
    let earlier = KernelChoice {
        gemv_f32_max_t: 16,
        coop_min_t: 32,
        gemv_max_t: 16,
        ..d
    };
    let k =
        |dtype, t, rows, bytes| ops::matmul::matmul_kernel(&earlier, true, dtype, t, rows, bytes);
    assert_eq!(k(DType::F32, 32, 256, 2 << 20), Tiled);
    assert_eq!(k(DType::Q4, 20, 4096, 32 << 20), Tiled);
    assert_eq!(k(DType::Q4, 32, 4096, 32 << 20), Coop);
}

#[test]
fn tensor_core_matmuls_with_few_tiles_split_along_k() {
    let d = super::choice::KernelChoice::default();
    let coop_split = |tiles, k| ops::matmul::coop_split(&d, tiles, k);
    // [3072 × 2048] at 32 tokens: 24 tiles → 6 splits of 352 (the last 288).
    assert_eq!(coop_split(24, 2048), (352, 6));
    // Enough tiles, or too short a K: no split.
    assert_eq!(coop_split(128, 4096), (0, 1));
    assert_eq!(coop_split(8, 300), (0, 1));
    // The test shapes above: 4 splits of 288 (the last 192), and 3 of 352 over K = 1000 (last 296).
    assert_eq!(coop_split(1, 1056), (288, 4));
    assert_eq!(coop_split(2, 1000), (352, 3));
    for (tiles, k) in [(1, 256), (3, 777), (24, 2048), (60, 5120), (1, 100_000)] {
        let (chunk, splits) = coop_split(tiles, k);
        if splits > 1 {
            assert_eq!(chunk % 32, 0);
            assert!((splits as usize - 1) * (chunk as usize) < k && k <= (splits * chunk) as usize);
        }
    }
    let off = super::choice::KernelChoice {
        coop_split_k: false,
        ..d
    };
    assert_eq!(ops::matmul::coop_split(&off, 24, 2048), (0, 1));
}

/// Shapes for the tensor-core test beyond [`COOP_SHAPES`]: its 16- and 32-row tiles (reached with
/// the kernel forced, as test weights are small), partial and several tiles along T.
/// The last two have few tiles and a long K: split along K (4 and 3 splits, the last one short; the
/// f16 one ends mid-group).
const COOP_SMALL_SHAPES: [(usize, usize, usize); 7] = [
    (5, 130, 64),
    (16, 129, 96),
    (20, 67, 96),
    (32, 256, 128),
    (50, 200, 70),
    (20, 67, 1056),
    (33, 45, 1000),
];

/// [`COOP_SMALL_SHAPES`] for each of `dtypes`.
fn coop_small_matmuls<B: HostIo>(b: &B, dtypes: &[DType]) -> Vec<(String, Vec<f32>)> {
    block_matmuls(b, dtypes, &COOP_SMALL_SHAPES, 12)
}

/// The tensor-core kernel against the CPU for f16, q8 and q4 weights on every configuration that
/// lends cooperative matrices, and refused (a typed error, not a broken pipeline) on those that do
/// not. Where no configuration lends them (lavapipe), it says so on stderr past the test harness's
/// capture: the fallback is what `large_block_matmuls_match_cpu_for_every_weight_type` checks there.
#[test]
fn coop_matmul_matches_cpu_where_the_device_has_cooperative_matrices() {
    use std::io::Write;
    let dtypes = [DType::F16, DType::Q8, DType::Q4];
    let mut want = large_block_matmuls(&CpuBackend, &dtypes);
    want.extend(coop_small_matmuls(&CpuBackend, &dtypes));
    let mut ran = 0;
    for (label, g) in backends(None) {
        let coop = g.caps().coop;
        for wtype in [1, 2, 3] {
            let pipe = g.sh.kernels.get(&g.sh.dev, &ops::matmul::GEMM_COOP, wtype);
            assert_eq!(
                pipe.is_ok(),
                coop,
                "{label}: coop pipeline (WTYPE {wtype}) {:?}",
                pipe.err()
            );
        }
        if !coop {
            continue;
        }
        ran += 1;
        let mut got = large_block_matmuls(&g, &dtypes);
        ops::matmul::FORCE_COOP.with(|f| f.set(true));
        got.extend(coop_small_matmuls(&g, &dtypes));
        ops::matmul::FORCE_COOP.with(|f| f.set(false));
        for ((what, w), (_, v)) in want.iter().zip(&got) {
            let err = rel_l2(v, w);
            assert!(err <= TOL, "coop {what} on {label}: relative L2 {err:e}");
        }
        eprintln!("coop matmul on {label}: {} cases within {TOL:e}", got.len());
    }
    if ran == 0 {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED coop_matmul_matches_cpu_where_the_device_has_cooperative_matrices: no GPU \
             configuration here lends cooperative matrices f16×f16→f32 16×16×16 (subgroups of 32); \
             only the fallback kernels were checked"
        );
    }
}

test_backends!(
    weights_larger_than_a_binding_are_split_by_rows,
    TOL,
    Some(4096),
    |b| {
        let mut out = Vec::new();
        let mut rng = Rng(2);
        for dtype in DTYPES {
            // 300 rows × 64: 76 KiB in f32, far above the 4 KiB binding of this test.
            let (n, k) = (300, 64);
            let vals = rng.vec(n * k, 0.5);
            let w = weight(b, dtype, &[n, k], &vals);
            for t in [2, 7] {
                let x = b.put(t, k, &rng.vec(t * k, 1.0));
                out.push((
                    format!("{dtype} matmul t{t}"),
                    b.get(&b.matmul(&w, &x).unwrap()),
                ));
                out.push((
                    format!("{dtype} logits t{t}"),
                    b.logits(&x, &w, 1..t).unwrap(),
                ));
                let s = b.lm_head_stats(&x, &w, 0..t).unwrap();
                out.push((format!("{dtype} stats t{t}"), flat_stats(&s)));
            }
            let e = b.embed(&w, &[0, 299, 150, 77, 3]).unwrap();
            out.push((format!("{dtype} embed"), b.get(&e)));
        }
        out
    }
);

test_backends!(embedding_gathers_dequantized_rows, TOL, |b| {
    let mut rng = Rng(3);
    let mut out = Vec::new();
    for dtype in DTYPES {
        let table = weight(b, dtype, &[50, 96], &rng.vec(50 * 96, 1.0));
        let x = b.embed(&table, &[3, 49, 0, 3, 17]).unwrap();
        out.push((dtype.to_string(), b.get(&x)));
    }
    let odd = weight(b, DType::F16, &[7, 33], &rng.vec(7 * 33, 1.0));
    out.push((
        "f16 odd width".into(),
        b.get(&b.embed(&odd, &[6, 1, 2]).unwrap()),
    ));
    out
});

test_backends!(norms_and_residual_adds_match, TOL, |b| {
    let mut rng = Rng(4);
    let mut out = Vec::new();
    // 4099: past the 4096 columns a norm workgroup holds in registers (lib/row_norm.wgsl).
    for &(t, h) in &[(1, 64), (5, 70), (3, 1000), (2, 4099)] {
        let w = weight(b, DType::F32, &[h], &rng.vec(h, 1.0));
        let mut x = b.put(t, h, &rng.vec(t * h, 2.0));
        let d = b.put(t, h, &rng.vec(t * h, 1.0));
        out.push((
            format!("rms t{t} h{h}"),
            b.get(&b.rms_norm(&x, &w, 1e-6).unwrap()),
        ));
        let n = b.add_rms_norm(&mut x, &d, &w, 1e-5).unwrap();
        out.push((format!("add_rms out t{t} h{h}"), b.get(&n)));
        out.push((format!("add_rms x t{t} h{h}"), b.get(&x)));
        b.add(&mut x, &d).unwrap();
        out.push((format!("add t{t} h{h}"), b.get(&x)));
    }
    out
});

test_backends!(swiglu_mlp_matches, TOL, |b| {
    let mut rng = Rng(5);
    let mut out = Vec::new();
    // (64, 96) the word-a-lane gemv; q4/q8 rows of 1056 and 2048 the wide one's 16 and 64 lanes
    // a row (quantized rows hold whole groups, so the down weight's 32 and 96 are too).
    for (dtype, (h, i)) in DTYPES
        .into_iter()
        .flat_map(|d| [(64, 96), (1056, 32), (2048, 96)].map(|s| (d, s)))
    {
        for t in [1, 6, 16] {
            let gu = weight(b, dtype, &[2 * i, h], &rng.vec(2 * i * h, 0.3));
            let down = weight(b, dtype, &[h, i], &rng.vec(h * i, 0.3));
            let x = b.put(t, h, &rng.vec(t * h, 1.0));
            out.push((
                format!("{dtype} t{t} h{h} i{i}"),
                b.get(&b.mlp(&gu, &down, &x).unwrap()),
            ));
        }
    }
    out
});

fn attn_config(qk_norm: QkNorm, rotary_dim: usize, clip: Option<f32>) -> ModelConfig {
    let mut c = synth::build(&SynthSpec::tiny(Architecture::Qwen3Moe))
        .unwrap()
        .meta
        .config;
    c.num_heads = 6;
    c.num_kv_heads = 2;
    c.head_dim = 20;
    c.rotary_dim = rotary_dim;
    c.qk_norm = qk_norm;
    c.clip_qkv = clip;
    c.rope_theta = 600_000.0;
    c
}

test_backends!(qk_norm_and_partial_rope_match_in_every_variant, TOL, |b| {
    let mut rng = Rng(6);
    let mut out = Vec::new();
    // Head sizes above 64 give each invocation of the per-head kernel several elements.
    for (norm, hd, rd, clip, start) in [
        (QkNorm::PerHead, 20, 20, None, 0),
        (QkNorm::PerHead, 20, 10, None, 4093),
        (QkNorm::Whole, 20, 20, Some(0.8), 7),
        (QkNorm::None, 20, 12, Some(1.5), 1000),
        (QkNorm::PerHead, 128, 64, None, 1030),
        (QkNorm::PerHead, 160, 128, Some(0.9), 17),
    ] {
        let mut c = attn_config(norm, rd, clip);
        c.head_dim = hd;
        let (qn, kn) = match norm {
            QkNorm::PerHead => (c.head_dim, c.head_dim),
            _ => (c.q_dim(), c.kv_dim()),
        };
        let qw = weight(b, DType::F32, &[qn], &rng.vec(qn, 1.0));
        let kw = weight(b, DType::F32, &[kn], &rng.vec(kn, 1.0));
        let t = 5;
        let mut qkv = b.put(t, c.qkv_dim(), &rng.vec(t * c.qkv_dim(), 2.0));
        let (q, k) = if norm == QkNorm::None {
            (None, None)
        } else {
            (Some(&qw), Some(&kw))
        };
        b.qk_norm_rope(&mut qkv, q, k, &c, start).unwrap();
        out.push((
            format!("{norm:?} hd{hd} rd{rd} clip{clip:?} start{start}"),
            b.get(&qkv),
        ));
    }
    out
});

test_backends!(
    attention_matches_for_every_mask_with_a_cached_prefix,
    TOL,
    |b| {
        let mut rng = Rng(7);
        let mut out = Vec::new();
        let c = attn_config(QkNorm::PerHead, 20, None);
        for mask in [
            AttnMask::Causal,
            AttnMask::Bidirectional,
            AttnMask::BlockCausal(4),
            AttnMask::CausalThenBidirectional { draft_start: 75 },
        ] {
            let mut kv = b.new_kv(&c, 160).unwrap();
            // A 70-position prefix written by one pass, then a 9-position block on top of it; the
            // last pass sees 20 cached positions past its end (dual-cache style).
            let pre = b.put(70, c.qkv_dim(), &rng.vec(70 * c.qkv_dim(), 1.0));
            let a0 = b.attention(&pre, &mut kv, 1, &c, 0, 70, mask).unwrap();
            out.push((format!("{mask:?} prefix"), b.get(&a0)));
            let blk = b.put(9, c.qkv_dim(), &rng.vec(9 * c.qkv_dim(), 1.0));
            let a1 = b.attention(&blk, &mut kv, 1, &c, 70, 79, mask).unwrap();
            out.push((format!("{mask:?} block"), b.get(&a1)));
            let one = b.put(1, c.qkv_dim(), &rng.vec(c.qkv_dim(), 1.0));
            let a2 = b.attention(&one, &mut kv, 1, &c, 50, 79, mask).unwrap();
            out.push((format!("{mask:?} one of 79"), b.get(&a2)));
        }
        out
    }
);

test_backends!(
    attention_matches_for_gqa_heads_one_split_and_the_per_head_fallback,
    TOL,
    |b| {
        // LLaDA2.0-mini-shaped heads (16 q / 4 kv of 128) against a long cache, 1 and 16 tokens
        // (the GQA kernel with many splits); a 12-position first block (one split, written
        // straight to the output); head_dim 18 (not a multiple of 4: the per-head kernel).
        let mut rng = Rng(8);
        let mut out = Vec::new();
        let mut c = attn_config(QkNorm::PerHead, 20, None);
        c.num_heads = 16;
        c.num_kv_heads = 4;
        c.head_dim = 128;
        let mut kv = b.new_kv(&c, 320).unwrap();
        let pre = b.put(12, c.qkv_dim(), &rng.vec(12 * c.qkv_dim(), 1.0));
        let a = b.attention(&pre, &mut kv, 1, &c, 0, 12, AttnMask::Bidirectional);
        out.push(("hd128 first block".into(), b.get(&a.unwrap())));
        let rest = b.put(288, c.qkv_dim(), &rng.vec(288 * c.qkv_dim(), 1.0));
        let a = b.attention(&rest, &mut kv, 1, &c, 12, 300, AttnMask::Causal);
        out.push(("hd128 prefix".into(), b.get(&a.unwrap())));
        for (t, mask) in [(1, AttnMask::Causal), (16, AttnMask::BlockCausal(8))] {
            let blk = b.put(t, c.qkv_dim(), &rng.vec(t * c.qkv_dim(), 1.0));
            let a = b.attention(&blk, &mut kv, 1, &c, 300, 300 + t, mask);
            out.push((format!("hd128 {t} tokens {mask:?}"), b.get(&a.unwrap())));
        }
        c.head_dim = 18;
        c.rotary_dim = 18;
        let mut kv = b.new_kv(&c, 100).unwrap();
        for (start, t) in [(0, 90), (90, 3)] {
            let blk = b.put(t, c.qkv_dim(), &rng.vec(t * c.qkv_dim(), 1.0));
            let a = b.attention(&blk, &mut kv, 1, &c, start, start + t, AttnMask::Causal);
            out.push((format!("hd18 {start}+{t}"), b.get(&a.unwrap())));
        }
        out
    }
);

/// rope_attention stores the block's K/V from the RoPE kernel: one dispatch fewer than
/// qk_norm_rope + attention, and the same q/k/v rows, output and cache contents, bit for bit, for
/// every norm variant (the per-head kernel, the whole-projection one, clipped v heads, a head of
/// 128 with partial RoPE) and on top of a cached prefix.
#[test]
fn rope_attention_stores_the_kv_from_the_rope_kernel() {
    let cache = |b: &GpuBackend, kv: &super::GpuKv, c: &ModelConfig, rows: usize| {
        let read = |buf: &Arc<super::GpuBuffer>| -> Vec<f32> {
            let bytes = (rows * c.kv_dim() * 4) as u64;
            let got = b.with(|ctx| Ok(ctx.read(&[(buf, 0, bytes)])?)).unwrap();
            bytemuck::pod_collect_to_vec(&got[0])
        };
        let layer = 1;
        (read(&kv.k[layer]), read(&kv.v[layer]))
    };
    for (name, b) in backends(None) {
        let mut rng = Rng(40);
        for (norm, hd, rd, clip, mask) in [
            (QkNorm::PerHead, 20, 20, None, AttnMask::BlockCausal(4)),
            (QkNorm::Whole, 20, 12, Some(0.8), AttnMask::Causal),
            (QkNorm::None, 20, 20, Some(1.5), AttnMask::Bidirectional),
            (QkNorm::PerHead, 128, 64, None, AttnMask::Causal),
        ] {
            let mut c = attn_config(norm, rd, clip);
            c.head_dim = hd;
            let (qn, kn) = match norm {
                QkNorm::PerHead => (c.head_dim, c.head_dim),
                _ => (c.q_dim(), c.kv_dim()),
            };
            let qw = weight(&b, DType::F32, &[qn], &rng.vec(qn, 1.0));
            let kw = weight(&b, DType::F32, &[kn], &rng.vec(kn, 1.0));
            let (q, k) = match norm {
                QkNorm::None => (None, None),
                _ => (Some(&qw), Some(&kw)),
            };
            let what = format!("{name} {norm:?} hd{hd} clip{clip:?} {mask:?}");
            let mut fused_kv = b.new_kv(&c, 64).unwrap();
            let mut apart_kv = b.new_kv(&c, 64).unwrap();
            // A 21-position prefix, then a 6-position block on top of it.
            for (start, t) in [(0, 21), (21, 6)] {
                let data = rng.vec(t * c.qkv_dim(), 2.0);
                let mut fused_qkv = b.put(t, c.qkv_dim(), &data);
                let mut apart_qkv = b.put(t, c.qkv_dim(), &data);
                let d0 = b.dispatches();
                let fused = b
                    .rope_attention(
                        &mut fused_qkv,
                        q,
                        k,
                        &mut fused_kv,
                        1,
                        &c,
                        start,
                        start + t,
                        mask,
                    )
                    .unwrap();
                let d1 = b.dispatches();
                b.qk_norm_rope(&mut apart_qkv, q, k, &c, start).unwrap();
                let apart = b
                    .attention(&apart_qkv, &mut apart_kv, 1, &c, start, start + t, mask)
                    .unwrap();
                let d2 = b.dispatches();
                assert_eq!((d2 - d1) - (d1 - d0), 1, "{what} {start}: dispatches");
                assert_eq!(b.get(&fused_qkv), b.get(&apart_qkv), "{what} {start}: qkv");
                assert_eq!(b.get(&fused), b.get(&apart), "{what} {start}: output");
                let end = start + t;
                assert_eq!(
                    cache(&b, &fused_kv, &c, end),
                    cache(&b, &apart_kv, &c, end),
                    "{what} {start}: K/V"
                );
            }
        }
    }
}

fn router_config(gating: Gating, experts: usize, top_k: usize) -> ModelConfig {
    let mut c = attn_config(QkNorm::PerHead, 20, None);
    c.moe.num_experts = experts;
    c.moe.top_k = top_k;
    c.moe.gating = gating;
    c
}

/// Routing ids (as f32) and weights of one route call.
fn routed<B: HostIo>(
    b: &B,
    rng: &mut Rng,
    c: &ModelConfig,
    t: usize,
    dtype: DType,
    bias: Option<f32>,
) -> (Vec<f32>, Vec<f32>) {
    let (e, h) = (c.moe.num_experts, 96);
    let router = weight(b, dtype, &[e, h], &rng.vec(e * h, 1.0));
    let bias = bias.map(|s| weight(b, DType::F32, &[e], &rng.vec(e, s)));
    let x = b.put(t, h, &rng.vec(t * h, 1.0));
    let r = b.route(&x, &router, bias.as_ref(), c).unwrap();
    let (ids, w) = b.routing_to_host(&r).unwrap();
    (ids.iter().map(|&i| i as f32).collect(), w)
}

test_backends!(router_selects_and_weights_like_the_cpu, TOL, |b| {
    let mut rng = Rng(8);
    let mut out = Vec::new();
    let cases = [
        (Gating::Softmax { renormalize: true }, 8, 2, None),
        (Gating::Softmax { renormalize: false }, 60, 8, Some(0.5)),
        (
            Gating::SigmoidGrouped {
                groups: 8,
                top_groups: 4,
                scale: 2.5,
                renormalize: true,
            },
            256,
            8,
            Some(0.1),
        ),
        (
            Gating::SigmoidGrouped {
                groups: 4,
                top_groups: 1,
                scale: 1.0,
                renormalize: false,
            },
            12,
            3,
            None,
        ),
    ];
    for (i, (g, e, k, bias)) in cases.into_iter().enumerate() {
        for dtype in [DType::F32, DType::Q8] {
            let c = router_config(g, e, k);
            let (ids, w) = routed(b, &mut rng, &c, 13, dtype, bias);
            out.push((format!("case {i} {dtype} ids"), ids));
            out.push((format!("case {i} {dtype} weights"), w));
        }
    }
    out
});

test_backends!(
    router_selects_among_many_experts_groups_and_ties,
    TOL,
    |b| {
        // More than 256 experts (past the four each invocation holds in registers) with top 64,
        // the most groups (one invocation a group), groups that do not divide the 64 invocations,
        // and router rows repeated four times: every logit ties with three others, which the
        // lower index must win.
        let mut rng = Rng(31);
        let mut out = Vec::new();
        let grouped = |groups, top_groups| Gating::SigmoidGrouped {
            groups,
            top_groups,
            scale: 1.5,
            renormalize: true,
        };
        let cases = [
            (
                Gating::Softmax { renormalize: true },
                1000,
                64,
                Some(0.3),
                false,
            ),
            (grouped(64, 20), 320, 40, Some(0.2), false),
            (grouped(3, 2), 96, 12, None, true),
            (Gating::Softmax { renormalize: false }, 96, 10, None, true),
            (grouped(8, 4), 256, 8, None, true),
        ];
        for (i, (g, e, k, bias, ties)) in cases.into_iter().enumerate() {
            let c = router_config(g, e, k);
            let h = 96;
            let mut w = rng.vec(e * h, 1.0);
            if ties {
                for r in 0..e {
                    let src = (r % (e / 4)) * h;
                    w.copy_within(src..src + h, r * h);
                }
            }
            let router = weight(b, DType::F32, &[e, h], &w);
            let bias = bias.map(|s| weight(b, DType::F32, &[e], &rng.vec(e, s)));
            let x = b.put(7, h, &rng.vec(7 * h, 1.0));
            let r = b.route(&x, &router, bias.as_ref(), &c).unwrap();
            let (ids, w) = b.routing_to_host(&r).unwrap();
            out.push((
                format!("case {i} ids"),
                ids.iter().map(|&i| i as f32).collect(),
            ));
            out.push((format!("case {i} weights"), w));
        }
        out
    }
);

test_backends!(attention_merges_hundreds_of_splits, TOL, |b| {
    // One query head against 8300 keys: 519 GQA splits of 16, more than one batch of loads for
    // each of attend_merge's 64 lanes of a column; and 3 tokens (fewer splits, lanes a column)
    // on top. Head 20: five vec4 columns, so a merge workgroup's columns span heads.
    let mut rng = Rng(32);
    let mut out = Vec::new();
    let mut c = attn_config(QkNorm::PerHead, 20, None);
    c.num_heads = 1;
    c.num_kv_heads = 1;
    let n = 8300;
    let mut kv = b.new_kv(&c, n + 3).unwrap();
    // The first n - 1 positions written directly: the pass that would write them attends
    // 8299 × 8299 (four minutes on lavapipe, 2026-12-07).
    let rows = (n - 1) * c.kv_dim();
    b.put_kv(&mut kv, 1, &rng.vec(rows, 1.0), &rng.vec(rows, 1.0));
    let one = b.put(1, c.qkv_dim(), &rng.vec(c.qkv_dim(), 1.0));
    let a = b.attention(&one, &mut kv, 1, &c, n - 1, n, AttnMask::Causal);
    out.push(("1 token".into(), b.get(&a.unwrap())));
    let three = b.put(3, c.qkv_dim(), &rng.vec(3 * c.qkv_dim(), 1.0));
    let a = b.attention(&three, &mut kv, 1, &c, n, n + 3, AttnMask::Bidirectional);
    out.push(("3 tokens".into(), b.get(&a.unwrap())));
    out
});

test_backends!(
    sliding_window_attention_hides_keys_beyond_the_window_for_every_mask,
    TOL,
    |b| {
        // Windows of 3 (inside one 64-key chunk) and 70 (across chunks and GQA splits), on the
        // GQA kernel (hd 20) and the per-head fallback (hd 18), a 90-position prefix then a
        // 5-token block.
        let mut rng = Rng(21);
        let mut out = Vec::new();
        for (hd, window) in [(20, 3), (20, 70), (18, 3), (18, 70)] {
            let mut c = attn_config(QkNorm::PerHead, 20, None);
            c.head_dim = hd;
            c.rotary_dim = hd;
            c.sliding = Some(SlidingAttention {
                window,
                rope_theta: 10_000.0,
                layers: vec![1],
            });
            for mask in [
                AttnMask::Causal,
                AttnMask::Bidirectional,
                AttnMask::BlockCausal(4),
            ] {
                let mut kv = b.new_kv(&c, 100).unwrap();
                let pre = b.put(90, c.qkv_dim(), &rng.vec(90 * c.qkv_dim(), 1.0));
                let a = b.attention(&pre, &mut kv, 1, &c, 0, 90, mask).unwrap();
                out.push((format!("hd {hd} w {window} {mask:?} prefix"), b.get(&a)));
                let blk = b.put(5, c.qkv_dim(), &rng.vec(5 * c.qkv_dim(), 1.0));
                let a = b.attention(&blk, &mut kv, 1, &c, 90, 95, mask).unwrap();
                out.push((format!("hd {hd} w {window} {mask:?} block"), b.get(&a)));
            }
        }
        out
    }
);

fn zaya_config() -> ModelConfig {
    synth::build(&SynthSpec::tiny(Architecture::Zaya))
        .unwrap()
        .meta
        .config
}

test_backends!(
    cca_qkv_matches_across_passes_and_after_a_rollback,
    TOL,
    |b| {
        // Head shapes (q heads, KV heads, head dim, rotary dims): ZAYA1-like groups of 3 with
        // partial RoPE, no grouping (a head of 22: the conv's 4-tap steps and their remainder),
        // and a head wider than the 64 lanes of the finish kernel.
        // Passes at 0 and 5 continue the sequence; the pass at 3 rewrites positions 3.. (a rejected
        // draft) and reads positions 1 and 2 from the state; the last pass reads that pass's rows.
        let mut rng = Rng(22);
        let mut out = Vec::new();
        for (i, (nq, nkv, hd, rot)) in [(6, 2, 12, 6), (4, 4, 22, 22), (3, 1, 72, 36)]
            .into_iter()
            .enumerate()
        {
            let mut c = zaya_config();
            (c.num_heads, c.num_kv_heads, c.head_dim, c.rotary_dim) = (nq, nkv, hd, rot);
            let (qd, kd) = (nq * hd, nkv * hd);
            let ch = qd + kd;
            let f = DType::F32;
            let dw = weight(b, f, &[ch, 2], &rng.vec(ch * 2, 0.8));
            let dwb = weight(b, f, &[ch], &rng.vec(ch, 0.3));
            let gw = weight(b, f, &[ch, 2 * hd], &rng.vec(ch * 2 * hd, 0.3));
            let gb = weight(b, f, &[ch], &rng.vec(ch, 0.3));
            let temp: Vec<f32> = rng.vec(nkv, 0.5).iter().map(|v| v + 1.0).collect();
            let temp = weight(b, f, &[nkv], &temp);
            let mut kv = b.new_kv(&c, 40).unwrap();
            for (start, t) in [(0, 5), (5, 3), (3, 4), (7, 9)] {
                let mut proj = b.put(t, ch + kd, &rng.vec(t * (ch + kd), 1.0));
                let w = CcaWeights {
                    conv_dw: &dw,
                    conv_dw_bias: &dwb,
                    conv_grouped: &gw,
                    conv_grouped_bias: &gb,
                    temp: &temp,
                };
                b.cca_qkv(&mut proj, w, &mut kv, CcaParams::for_layer(&c, 1, start))
                    .unwrap();
                out.push((format!("case {i} pass at {start}"), b.get(&proj)));
            }
        }
        out
    }
);

test_backends!(mlp_router_with_eda_and_skip_expert_matches, TOL, |b| {
    // (hidden, router width, weight type, top_k, skip bias): widths that are no tile multiples in
    // f32/f16, q8 where groups of 32 divide them; a large selection bias on the skip class makes it
    // the choice (weight 0). 13 tokens; the second call takes the first's state through EDA.
    let mut rng = Rng(23);
    let mut out = Vec::new();
    let experts = 5;
    let classes = experts + 1;
    // Block-level routing: blocks of 4 from position 5 keeping 2 experts; one block from row 4
    // keeping 3, with expert 1 pruned (bias -1e30: no mass, never kept).
    let aligned = Some(BlockRouting::aligned(2, 5, 4, 0));
    let tail = Some(BlockRouting::tail(3, 4));
    for (i, (h, r, dtype, k, skip, blocks)) in [
        (48, 20, DType::F32, 1, 0.0, None),
        (48, 20, DType::F16, 2, 0.0, None),
        (64, 32, DType::Q8, 1, 0.0, None),
        (48, 20, DType::F32, 1, 2.0, None),
        (48, 20, DType::F32, 2, 0.0, aligned),
        (64, 32, DType::Q8, 2, 0.0, tail),
    ]
    .into_iter()
    .enumerate()
    {
        let t = 13;
        let x = b.put(t, h, &rng.vec(t * h, 1.0));
        let mut state: Option<B::Act> = None;
        for call in 0..2 {
            let down = weight(b, dtype, &[r, h], &rng.vec(r * h, 0.3));
            let fc1 = weight(b, dtype, &[r, r], &rng.vec(r * r, 0.4));
            let fc2 = weight(b, dtype, &[r, r], &rng.vec(r * r, 0.4));
            let o = weight(b, dtype, &[classes, r], &rng.vec(classes * r, 0.6));
            let v = |rng: &mut Rng, n: usize, s: f32| weight(b, DType::F32, &[n], &rng.vec(n, s));
            let (down_bias, eda_scale, fc1_bias, fc2_bias) = (
                v(&mut rng, r, 0.2),
                v(&mut rng, r, 0.8),
                v(&mut rng, r, 0.2),
                v(&mut rng, r, 0.2),
            );
            let norm: Vec<f32> = rng.vec(r, 0.2).iter().map(|a| a + 1.0).collect();
            let norm = weight(b, DType::F32, &[r], &norm);
            let mut sel = rng.vec(classes, 0.05);
            sel[experts] += skip;
            if blocks == tail {
                sel[1] = -1e30;
            }
            let bias = weight(b, DType::F32, &[classes], &sel);
            let w = MlpRouterWeights {
                down: &down,
                down_bias: &down_bias,
                eda_scale: (call > 0).then_some(&eda_scale),
                norm: &norm,
                fc1: &fc1,
                fc1_bias: &fc1_bias,
                fc2: &fc2,
                fc2_bias: &fc2_bias,
                out: &o,
                bias: &bias,
            };
            let p = MlpRouterParams {
                experts,
                top_k: k,
                eps: 1e-5,
                blocks,
            };
            let (routing, st) = b.route_mlp(&x, w, state.as_ref(), p).unwrap();
            let (ids, wts) = b.routing_to_host(&routing).unwrap();
            let label = format!("case {i} call {call}");
            out.push((
                format!("{label} ids"),
                ids.iter().map(|&e| e as f32).collect(),
            ));
            out.push((format!("{label} weights"), wts));
            out.push((format!("{label} state"), b.get(&st)));
            state = Some(st);
        }
    }
    out
});

test_backends!(scaled_residual_norm_and_affine_embedding_match, TOL, |b| {
    let mut rng = Rng(24);
    let mut out = Vec::new();
    for (t, h) in [(1, 48), (7, 200), (3, 70), (2, 2100)] {
        let mut x = b.put(t, h, &rng.vec(t * h, 1.0));
        let d = b.put(t, h, &rng.vec(t * h, 1.0));
        let s = weight(b, DType::F32, &[4, h], &rng.vec(4 * h, 1.0));
        let nw = weight(b, DType::F32, &[h], &rng.vec(h, 1.0));
        let a = weight(b, DType::F32, &[2, h], &rng.vec(2 * h, 1.0));
        let n = b.scaled_residual_norm(&mut x, &d, &s, &nw, 1e-6).unwrap();
        out.push((format!("{t}x{h} normed"), b.get(&n)));
        out.push((format!("{t}x{h} residual"), b.get(&x)));
        b.embed_affine(&mut x, &a).unwrap();
        out.push((format!("{t}x{h} affine"), b.get(&x)));
    }
    out
});

/// A tiny synthetic model file of `arch` in `dtype`, kept for the test's duration.
fn synth_file(arch: Architecture, dtype: DType) -> (tempfile::TempDir, Arc<EdmFile>) {
    synth_file_of(&SynthSpec::tiny(arch), dtype)
}

/// A synthetic model file of `spec` (alive while the returned directory is).
fn synth_file_of(spec: &SynthSpec, dtype: DType) -> (tempfile::TempDir, Arc<EdmFile>) {
    let dir = tempfile::tempdir().unwrap();
    let m = synth::build(spec).unwrap();
    let path = dir.path().join("m.edm");
    synth::write_edm(&m, &path, dtype, &|_, _| {}).unwrap();
    let f = Arc::new(EdmFile::open(&path).unwrap());
    (dir, f)
}

/// The last layer's MoE on `b`: router (and bias), the shared expert where the family has one,
/// every routed expert resident.
struct MoeLayer {
    router: GpuWeight,
    bias: Option<GpuWeight>,
    shared: Option<(GpuWeight, GpuWeight)>,
    experts: GpuExperts,
}

impl MoeLayer {
    fn load(b: &GpuBackend, file: &Arc<EdmFile>) -> Self {
        let c = &file.header.metadata.config;
        let l = c.num_layers - 1;
        let w = |n: &str| {
            b.load_weight(file.tensor(&format!("layers.{l}.{n}")).unwrap())
                .unwrap()
        };
        MoeLayer {
            router: w("moe.router"),
            bias: c.moe.router_bias.then(|| w("moe.router_bias")),
            shared: (c.architecture == Architecture::Llada2Moe)
                .then(|| (w(names::SHARED_GATE_UP), w(names::SHARED_DOWN))),
            experts: b.load_experts(file, l, &|_| true).unwrap(),
        }
    }

    fn shared(&self) -> Option<(&GpuWeight, &GpuWeight)> {
        self.shared.as_ref().map(|(gu, dn)| (gu, dn))
    }

    fn route(&self, b: &GpuBackend, x: &GpuAct, c: &ModelConfig) -> GpuRouting {
        b.route(x, &self.router, self.bias.as_ref(), c).unwrap()
    }

    /// The routed experts' output (with the shared expert's, where there is one).
    fn experts_out(&self, b: &GpuBackend, x: &GpuAct, r: &GpuRouting) -> GpuAct {
        match self.shared() {
            Some((gu, dn)) => b.moe_shared_mlp(x, r, &self.experts, gu, dn).unwrap(),
            None => b.moe(x, r, &self.experts).unwrap(),
        }
    }
}

test_backends!(moe_layer_matches_for_every_weight_type, TOL, |b| {
    let mut rng = Rng(9);
    let mut out = Vec::new();
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        for dtype in DTYPES {
            let (_dir, file) = synth_file(arch, dtype);
            let c = file.header.metadata.config.clone();
            let l = c.num_layers - 1;
            let router = b
                .load_weight(file.tensor(&format!("layers.{l}.moe.router")).unwrap())
                .unwrap();
            let bias = c.moe.router_bias.then(|| {
                b.load_weight(file.tensor(&format!("layers.{l}.moe.router_bias")).unwrap())
                    .unwrap()
            });
            let experts = b.load_experts(&file, l, &|_| true).unwrap();
            let tensor = |name: &str| file.tensor(&format!("layers.{l}.{name}")).ok();
            let shared = tensor(names::SHARED_GATE_UP)
                .zip(tensor(names::SHARED_DOWN))
                .map(|(gu, dn)| (b.load_weight(gu).unwrap(), b.load_weight(dn).unwrap()));
            assert_eq!(shared.is_some(), arch == Architecture::Llada2Moe);
            // 8 experts top-2: 1, 13 and 19 tokens run the GEMV expert kernels (13, 19: experts
            // with more than one block of 4 tokens), 70 the tiled ones (ops::moe::expert_kernel).
            for t in [1, 13, 19, 70] {
                let x = b.put(t, c.hidden_size, &rng.vec(t * c.hidden_size, 1.0));
                let r = b.route(&x, &router, bias.as_ref(), &c).unwrap();
                let (ids, _) = b.routing_to_host(&r).unwrap();
                let y = b.moe(&x, &r, &experts).unwrap();
                out.push((
                    format!("{arch} {dtype} t{t} ids"),
                    ids.iter().map(|&i| i as f32).collect(),
                ));
                out.push((format!("{arch} {dtype} t{t}"), b.get(&y)));
                // The shared expert: inside the GEMV expert kernels up to 16 tokens (1, 13; its
                // column walks 13 tokens in 4 blocks), as dense matmuls beyond (19, 70).
                if let Some((gu, dn)) = &shared {
                    let y = b.moe_shared_mlp(&x, &r, &experts, gu, dn).unwrap();
                    out.push((format!("{arch} {dtype} t{t} shared"), b.get(&y)));
                }
                // Added to a residual and normed (the GPU folds both into its combine).
                let mut res = b.put(t, c.hidden_size, &rng.vec(t * c.hidden_size, 1.0));
                let nw = weight(
                    b,
                    DType::F32,
                    &[c.hidden_size],
                    &rng.vec(c.hidden_size, 1.0),
                );
                let sh = shared.as_ref().map(|(gu, dn)| (gu, dn));
                let n = b
                    .moe_add_rms_norm(&x, &r, &experts, sh, &mut res, &nw, 1e-6)
                    .unwrap();
                out.push((format!("{arch} {dtype} t{t} normed"), b.get(&n)));
                out.push((format!("{arch} {dtype} t{t} residual"), b.get(&res)));
            }
        }
    }
    out
});

/// The MoE's residual add and norm ride in its combine: one dispatch (moe_combine_norm) in place
/// of two (moe_combine(_add), add_rms_norm), and bit for bit the same residual and output.
#[test]
fn moe_residual_norm_folds_into_the_combine() {
    // Hidden 64, 608, 1056: quads partly past the row (lib/row_norm.wgsl); 4128: past the 4096
    // columns a workgroup holds in registers, so the loop after them runs too. Top 12 of 16
    // experts: assignments past the eight the combine unrolls.
    for (arch, hidden, top_k) in [
        (Architecture::Qwen3Moe, 64, 0),
        (Architecture::Llada2Moe, 64, 0),
        (Architecture::Qwen3Moe, 1056, 0),
        (Architecture::Llada2Moe, 608, 0),
        (Architecture::Qwen3Moe, 4128, 0),
        (Architecture::Qwen3Moe, 64, 12),
    ] {
        let tiny = SynthSpec::tiny(arch);
        let spec = SynthSpec {
            hidden,
            experts: if top_k > 0 { 16 } else { tiny.experts },
            top_k: if top_k > 0 { top_k } else { tiny.top_k },
            ..tiny
        };
        let (_dir, file) = synth_file_of(&spec, DType::Q8);
        let c = file.header.metadata.config.clone();
        let h = c.hidden_size;
        // The fusion is off by default (EDGEDIFF_FUSE_COMBINE_NORM=1 turns it on).
        let fused_on = super::GpuOptions {
            poison: true,
            kernels: super::KernelChoice {
                fuse_combine_norm: true,
                ..super::KernelChoice::from_env()
            },
            ..super::GpuOptions::from_env()
        };
        for (name, b) in super::testing::backends_with(fused_on) {
            let m = MoeLayer::load(&b, &file);
            let mut rng = Rng(33);
            // A test upload holds at most 64 KiB.
            let ts: &[usize] = if hidden > 1100 {
                &[1, 3]
            } else if hidden > 64 {
                &[1, 3, 15]
            } else {
                &[1, 5, 70]
            };
            for &t in ts {
                let x = b.put(t, h, &rng.vec(t * h, 1.0));
                let r = m.route(&b, &x, &c);
                let res0 = rng.vec(t * h, 1.0);
                let nw = weight(&b, DType::F32, &[h], &rng.vec(h, 1.0));
                let mut fused_res = b.put(t, h, &res0);
                let mut apart_res = b.put(t, h, &res0);
                let d0 = b.dispatches();
                let fused = b
                    .moe_add_rms_norm(&x, &r, &m.experts, m.shared(), &mut fused_res, &nw, 1e-6)
                    .unwrap();
                let d1 = b.dispatches();
                let y = m.experts_out(&b, &x, &r);
                let apart = b.add_rms_norm(&mut apart_res, &y, &nw, 1e-6).unwrap();
                let d2 = b.dispatches();
                // One kernel fewer, and (test backends poison every output first) its fill.
                assert_eq!((d2 - d1) - (d1 - d0), 2, "{name} {arch} t{t}: dispatches");
                assert_eq!(b.get(&fused), b.get(&apart), "{name} {arch} t{t}: normed");
                assert_eq!(
                    b.get(&fused_res),
                    b.get(&apart_res),
                    "{name} {arch} t{t}: residual"
                );
            }
        }
        // The default (EDGEDIFF_FUSE_COMBINE_NORM unset or 0): the same values through the two
        // dispatches.
        let off = GpuBackend::new(&super::GpuOptions {
            poison: true,
            kernels: super::KernelChoice {
                fuse_combine_norm: false,
                ..super::KernelChoice::from_env()
            },
            ..super::GpuOptions::from_env()
        })
        .unwrap();
        let m = MoeLayer::load(&off, &file);
        let mut rng = Rng(35);
        let x = off.put(3, h, &rng.vec(3 * h, 1.0));
        let r = m.route(&off, &x, &c);
        let nw = weight(&off, DType::F32, &[h], &rng.vec(h, 1.0));
        let res0 = rng.vec(3 * h, 1.0);
        let mut res = off.put(3, h, &res0);
        let d0 = off.dispatches();
        let n = off
            .moe_add_rms_norm(&x, &r, &m.experts, m.shared(), &mut res, &nw, 1e-6)
            .unwrap();
        let unfused = off.dispatches() - d0;
        let mut res2 = off.put(3, h, &res0);
        let d1 = off.dispatches();
        let y = m.experts_out(&off, &x, &r);
        let n2 = off.add_rms_norm(&mut res2, &y, &nw, 1e-6).unwrap();
        assert_eq!(unfused, off.dispatches() - d1, "{arch}: the unfused path");
        assert_eq!(off.get(&n), off.get(&n2), "{arch}: knob off, normed");
    }
}

// The fused-norm forward's ops (ops/residual.rs) against the CPU's, which compose the separate
// ops (the Backend defaults): the qkv-style normed gemv, the o-style accumulating gemv and the
// normed router for every weight type, through the word-a-lane gemv (1–2 rows; K 1056 through
// its four-octet rounds and remainder), the wide one (3+ rows, f32 at every count; K 2048 in
// blocks of 2 rows) and the fallback where neither folds the norm in (K 70: no whole octets).
test_backends!(residual_fusions_match_the_separate_ops, TOL, |b| {
    let mut rng = Rng(41);
    let mut out = Vec::new();
    for dtype in DTYPES {
        for &(t, n, k) in &[
            (1, 37, 96),
            (2, 64, 256),
            (1, 24, 1056),
            (2, 24, 1056),
            (3, 33, 160),
            (5, 70, 2048),
            (13, 40, 512),
            (16, 20, 64),
            (2, 9, 70),
        ] {
            if k % 32 != 0 && matches!(dtype, DType::Q8 | DType::Q4) {
                continue;
            }
            let x = b.put(t, k, &rng.vec(t * k, 1.5));
            let nw = weight(b, DType::F32, &[k], &rng.vec(k, 1.0));
            let w = weight(b, dtype, &[n, k], &rng.vec(n * k, 0.5));
            let y = b.matmul_normed(&w, &x, &nw, 1e-5).unwrap();
            out.push((format!("{dtype} normed t{t} n{n} k{k}"), b.get(&y)));
            let a = b.put(t, k, &rng.vec(t * k, 1.0));
            let wo = weight(b, dtype, &[n, k], &rng.vec(n * k, 0.5));
            let mut res = b.put(t, n, &rng.vec(t * n, 1.0));
            b.matmul_add(&wo, &a, &mut res).unwrap();
            out.push((format!("{dtype} accumulated t{t} n{n} k{k}"), b.get(&res)));
            // A dense FFN sublayer: x += down(swiglu(gate_up(norm(x)))), intermediate n.
            let gu = weight(b, dtype, &[2 * n, k], &rng.vec(2 * n * k, 0.5));
            let dn_k = if matches!(dtype, DType::Q8 | DType::Q4) {
                n.next_multiple_of(32)
            } else {
                n
            };
            let gu = if dn_k == n {
                gu
            } else {
                weight(b, dtype, &[2 * dn_k, k], &rng.vec(2 * dn_k * k, 0.5))
            };
            let dn = weight(b, dtype, &[k, dn_k], &rng.vec(k * dn_k, 0.5));
            let mut xr = b.put(t, k, &rng.vec(t * k, 1.0));
            b.mlp_add(&gu, &dn, &mut xr, &nw, 1e-5).unwrap();
            out.push((format!("{dtype} dense FFN t{t} i{dn_k} k{k}"), b.get(&xr)));
        }
    }
    let c = router_config(Gating::Softmax { renormalize: true }, 16, 4);
    for &(t, k) in &[(1, 96), (2, 2048), (5, 160)] {
        let x = b.put(t, k, &rng.vec(t * k, 2.0));
        let nw = weight(b, DType::F32, &[k], &rng.vec(k, 1.0));
        let router = weight(b, DType::F32, &[16, k], &rng.vec(16 * k, 1.0));
        let (h, r) = b
            .route_normed(&x, &nw, 1e-5, &router, None, &c, None)
            .unwrap();
        let (ids, w) = b.routing_to_host(&r).unwrap();
        out.push((format!("router t{t} k{k}: normed rows"), b.get(&h)));
        out.push((
            format!("router t{t} k{k}: ids"),
            ids.iter().map(|&i| i as f32).collect(),
        ));
        out.push((format!("router t{t} k{k}: weights"), w));
    }
    out
});

/// `EDGEDIFF_GEMV_MAX_T=32` (a measurement knob: the token-blocked gemvs past their default 16
/// rows, against the tensor cores): 17–32 rows through them, fused norm and add included, match
/// the CPU.
#[test]
fn token_blocked_gemvs_past_16_rows_match_the_cpu() {
    use super::choice::KernelChoice;
    let base = super::GpuOptions {
        poison: true,
        kernels: KernelChoice {
            gemv_max_t: 32,
            fuse_norms_max_t: 32,
            // The CPU's float activations (8-bit ones: their own tests).
            wide_q8_act: false,
            ..KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    for (name, g) in super::testing::backends_with(base) {
        for dtype in DTYPES {
            for (t, n, k) in [(17, 40, 2048), (29, 33, 160), (32, 64, 512)] {
                let mut rng = Rng(48);
                let (wv, nv, xv) = (rng.vec(n * k, 0.5), rng.vec(k, 1.0), rng.vec(t * k, 1.0));
                let cpu = {
                    let c = CpuBackend;
                    let w = weight(&c, dtype, &[n, k], &wv);
                    let nw = weight(&c, DType::F32, &[k], &nv);
                    c.get(&c.matmul_normed(&w, &c.put(t, k, &xv), &nw, 1e-5).unwrap())
                };
                let gpu = {
                    let w = weight(&g, dtype, &[n, k], &wv);
                    let nw = weight(&g, DType::F32, &[k], &nv);
                    let x = g.put(t, k, &xv);
                    let d0 = g.dispatches();
                    let y = g.matmul_normed(&w, &x, &nw, 1e-5).unwrap();
                    // The normed gemv and its output's fill: no norm kernel, no tiles.
                    assert_eq!(g.dispatches() - d0, 2, "{name} {dtype} t{t}: dispatches");
                    g.get(&y)
                };
                let err = rel_l2(&gpu, &cpu);
                assert!(err <= TOL, "{name} {dtype} t{t} n{n} k{k}: {err:e}");
            }
        }
    }
}

/// The fused ops each save the dispatches they claim (the norm, the add; test backends also fill
/// every new output with NaN first, a dispatch each), and the MoE combine's residual add equals
/// the combine and the add kernel bit for bit.
#[test]
fn residual_fusions_save_their_dispatches() {
    let (_dir, file) = synth_file(Architecture::Llada2Moe, DType::Q4);
    let c = file.header.metadata.config.clone();
    let h = c.hidden_size;
    for (name, b) in backends(None) {
        let mut rng = Rng(43);
        let m = MoeLayer::load(&b, &file);
        let nw = weight(&b, DType::F32, &[h], &rng.vec(h, 1.0));
        let w = weight(&b, DType::Q4, &[64, h], &rng.vec(64 * h, 0.5));
        for t in [1, 2, 3, 13] {
            let x = b.put(t, h, &rng.vec(t * h, 1.0));
            let count = |f: &dyn Fn()| {
                let d0 = b.dispatches();
                f();
                b.dispatches() - d0
            };
            // Norm then gemv: two kernels, two fills; normed gemv: one and one.
            let fused = count(&|| drop(b.matmul_normed(&w, &x, &nw, 1e-6).unwrap()));
            let apart = count(&|| {
                let hn = b.rms_norm(&x, &nw, 1e-6).unwrap();
                drop(b.matmul(&w, &hn).unwrap());
            });
            assert_eq!(apart - fused, 2, "{name} t{t}: matmul_normed");
            let a = b.put(t, h, &rng.vec(t * h, 1.0));
            let wo = weight(&b, DType::Q4, &[h, h], &rng.vec(h * h, 0.5));
            let mut res = b.put(t, h, &rng.vec(t * h, 1.0));
            // Gemv, fill and add kernel; gemv adding into the residual.
            let d0 = b.dispatches();
            b.matmul_add(&wo, &a, &mut res).unwrap();
            let fused = b.dispatches() - d0;
            let d0 = b.dispatches();
            let y = b.matmul(&wo, &a).unwrap();
            b.add(&mut res, &y).unwrap();
            assert_eq!(b.dispatches() - d0 - fused, 2, "{name} t{t}: matmul_add");
            // The router's gemv writes the normed rows: the norm kernel goes.
            let (bias, router) = (m.bias.as_ref(), &m.router);
            let d0 = b.dispatches();
            let (hn, r) = b
                .route_normed(&x, &nw, 1e-6, router, bias, &c, None)
                .unwrap();
            let fused = b.dispatches() - d0;
            let d0 = b.dispatches();
            let hn2 = b.rms_norm(&x, &nw, 1e-6).unwrap();
            let r2 = b.route(&hn2, router, bias, &c).unwrap();
            assert_eq!(b.dispatches() - d0 - fused, 1, "{name} t{t}: route_normed");
            let (ids, _) = b.routing_to_host(&r).unwrap();
            let (ids2, _) = b.routing_to_host(&r2).unwrap();
            assert_eq!(ids, ids2, "{name} t{t}: routed experts");
            let err = rel_l2(&b.get(&hn), &b.get(&hn2));
            assert!(err <= 1e-6, "{name} t{t}: normed rows {err:e}");
            // The dense FFN: gate/up norms its input, down adds into x: the norm, the add and
            // the down projection's output (and their fills) go.
            let gu = weight(&b, DType::Q4, &[128, h], &rng.vec(128 * h, 0.5));
            let dn = weight(&b, DType::Q4, &[h, 64], &rng.vec(h * 64, 0.5));
            let mut xr = b.put(t, h, &rng.vec(t * h, 1.0));
            let d0 = b.dispatches();
            b.mlp_add(&gu, &dn, &mut xr, &nw, 1e-6).unwrap();
            let fused = b.dispatches() - d0;
            let d0 = b.dispatches();
            let hn3 = b.rms_norm(&xr, &nw, 1e-6).unwrap();
            let y = b.mlp(&gu, &dn, &hn3).unwrap();
            b.add(&mut xr, &y).unwrap();
            assert_eq!(b.dispatches() - d0 - fused, 4, "{name} t{t}: mlp_add");
            // The combine adds into the residual: no output, no add kernel; the same bits.
            let res0 = rng.vec(t * h, 1.0);
            let mut fused_res = b.put(t, h, &res0);
            let mut apart_res = b.put(t, h, &res0);
            let d0 = b.dispatches();
            b.moe_add(&hn, &r, &m.experts, m.shared(), &mut fused_res)
                .unwrap();
            let fused = b.dispatches() - d0;
            let d0 = b.dispatches();
            let y = m.experts_out(&b, &hn, &r);
            b.add(&mut apart_res, &y).unwrap();
            assert_eq!(b.dispatches() - d0 - fused, 2, "{name} t{t}: moe_add");
            assert_eq!(b.get(&fused_res), b.get(&apart_res), "{name} t{t}: moe_add");
        }
    }
}

/// The wide gemv sums each (weight row, token) the same way whatever tokens share its dispatch:
/// 16 rows at once equal the same rows 3 and 4 at a time bit for bit (what batched passes rely
/// on, ops/batch_class.rs: q4/q8 passes of ≥ 3 rows take it, f32 weights at every row count), for
/// every lane count (the experts' and the dense rows' own) and several token-block sizes, and
/// match the CPU; the kernel is the one taken for these shapes.
#[test]
fn wide_gemv_rows_equal_the_rows_in_other_blocks() {
    use super::choice::KernelChoice;
    // (wide_lanes, wide_dense_lanes): the dense rows take the second where it is not 0.
    for (wide, dense) in [(4, 0), (8, 0), (16, 0), (64, 0), (8, 32)] {
        let lanes = if dense == 0 { wide } else { dense };
        let base = super::GpuOptions {
            kernels: KernelChoice {
                wide_lanes: wide,
                wide_dense_lanes: dense,
                wide_min_chunks: 0,
                ..KernelChoice::from_env()
            },
            ..super::GpuOptions::from_env()
        };
        for (label, b) in super::testing::backends_with(base) {
            let mut rng = Rng(23);
            for (dtype, n, k) in [
                (DType::Q4, 70, 1056),
                (DType::Q4, 45, 2048),
                (DType::Q8, 33, 1056),
                (DType::Q8, 20, 4096),
                (DType::F32, 256, 2048),
                (DType::F32, 37, 1060),
            ] {
                let wide = ops::matmul::wide_gemv(&b.sh.dev.kernels, dtype, k, 3, n);
                // f32 weights (routers) always take 64 lanes a row.
                let want = if dtype == DType::F32 { 64 } else { lanes };
                assert_eq!(wide.map(|w| w.0), Some(want), "{label} {dtype} k{k}");
                let wv = rng.vec(n * k, 0.5);
                let w = weight(&b, dtype, &[n, k], &wv);
                let xs = rng.vec(16 * k, 1.0);
                let all = b.get(&b.matmul(&w, &b.put(16, k, &xs)).unwrap());
                assert!(all.iter().all(|v| v.is_finite()), "{label} {dtype} k{k}");
                // Against the CPU (q4 with 8-bit activations: their own test below).
                if dtype != DType::Q4 || !b.sh.dev.kernels.wide_q8_act {
                    let c = CpuBackend;
                    let wc = weight(&c, dtype, &[n, k], &wv);
                    let want = c.get(&c.matmul(&wc, &c.put(16, k, &xs)).unwrap());
                    let e = rel_l2(&all, &want);
                    assert!(e <= TOL, "{label} {dtype} k{k} {lanes} lanes: vs CPU {e:e}");
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let mut r = 0;
                for rows in [3, 4, 3, 3, 3] {
                    let xr = b.put(rows, k, &xs[r * k..(r + rows) * k]);
                    let part = b.get(&b.matmul(&w, &xr).unwrap());
                    assert_eq!(
                        bits(&all[r * n..(r + rows) * n]),
                        bits(&part),
                        "{label} {dtype} k{k} {lanes} lanes: rows {r}..{}",
                        r + rows
                    );
                    r += rows;
                }
            }
        }
    }
}

/// Over outputs, |got − want| / (1 + |want|): the largest, the mean; and the largest for `float`.
fn q8_errors(got: &[f32], want: &[f32], float: &[f32]) -> (f32, f32, f32) {
    let rel = |a: f32, w: f32| (a - w).abs() / (1.0 + w.abs());
    let (mut err, mut sum, mut moved) = (0f32, 0f32, 0f32);
    for ((&g, &w), &f) in got.iter().zip(want).zip(float) {
        err = err.max(rel(g, w));
        sum += rel(g, w);
        moved = moved.max(rel(f, w));
    }
    (err, sum / got.len() as f32, moved)
}

/// The wide q4 gemv with 8-bit activations (`EDGEDIFF_WIDE_Q8ACT`): the products of
/// backend/q8_act.rs (the same codes, each chunk's sum exact; only the adding order differs) for
/// rows of 33 chunks (odd), 64 and 128 (two-token blocks), passes of 3, 7 and 16 rows, with and
/// without a folded norm (then the codes of the CPU's normed rows); not the float path's values
/// (so the codes were used); a 16-row pass equals the same rows 3 and 4 at a time bit for bit; q8
/// weights keep the float path.
#[test]
fn wide_gemv_with_8_bit_activations_matches_the_cpu_codes() {
    use super::choice::KernelChoice;
    use crate::backend::q8_act;
    // With the codes, short rows take fewer lanes too (1056: 8 lanes a row).
    let with = |q8| super::GpuOptions {
        poison: true,
        kernels: KernelChoice {
            wide_q8_act: q8,
            wide_min_chunks: if q8 { 4 } else { 0 },
            wide_long: true,
            ..KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    let off = GpuBackend::new(&with(false)).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (label, b) in super::testing::backends_with(with(true)) {
        let mut rng = Rng(91);
        // 5120: past the float staging, so only the codes take the wide gemv (WIDE_Q8_STAGE).
        for (n, k) in [(70, 1056), (45, 2048), (21, 4096), (20, 5120)] {
            let long = k > ops::matmul::WIDE_STAGE;
            let shape =
                |b: &GpuBackend| ops::matmul::wide_gemv(&b.sh.dev.kernels, DType::Q4, k, 3, n);
            assert!(shape(&b).is_some(), "{label} [{n}, {k}]: the wide gemv");
            assert_eq!(
                shape(&off).is_none(),
                long,
                "[{n}, {k}] with float activations"
            );
            let wv = rng.vec(n * k, 0.5);
            let bytes = dtype::encode(DType::Q4, &wv, k);
            let (w, w_off) = (
                weight(&b, DType::Q4, &[n, k], &wv),
                weight(&off, DType::Q4, &[n, k], &wv),
            );
            for t in [3, 7, 16] {
                // Values of every size, so groups take many scales.
                let xs: Vec<f32> = rng
                    .vec(t * k, 1.0)
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v * [1.0, 1e-3, 40.0][i / 96 % 3])
                    .collect();
                let got = b.get(&b.matmul(&w, &b.put(t, k, &xs)).unwrap());
                let want = q8_act::matmul_q4(&bytes, n, k, &xs).unwrap();
                let float = off.get(&off.matmul(&w_off, &off.put(t, k, &xs)).unwrap());
                let what = format!("{label} q4 [{n}, {k}] {t} rows");
                let (err, _, moved) = q8_errors(&got, &want, &float);
                assert!(err <= 2e-5, "{what}: vs the CPU's codes {err}");
                assert!(moved >= 1e-3, "{what}: the float path's values ({moved})");
                // With the norm folded in: the codes of the normed rows (the CPU's norm; its
                // 1 / rms may differ in the last bit, which moves a code now and then, or a whole
                // group's scale where its largest value sits at a power of two: lavapipe, 7 rows,
                // one token 1.5e-2 off, the mean 5e-4, the float path 0.16).
                let nv: Vec<f32> = rng.vec(k, 1.0).iter().map(|v| 0.5 + v.abs()).collect();
                let normed = {
                    let c = CpuBackend;
                    let nw = weight(&c, DType::F32, &[k], &nv);
                    c.get(&c.rms_norm(&c.put(t, k, &xs), &nw, 1e-5).unwrap())
                };
                let want_n = q8_act::matmul_q4(&bytes, n, k, &normed).unwrap();
                let nw = weight(&b, DType::F32, &[k], &nv);
                let got_n = b.get(&b.matmul_normed(&w, &b.put(t, k, &xs), &nw, 1e-5).unwrap());
                let nw_off = weight(&off, DType::F32, &[k], &nv);
                let x_off = off.put(t, k, &xs);
                let float_n = off.get(&off.matmul_normed(&w_off, &x_off, &nw_off, 1e-5).unwrap());
                let (err, mean, moved) = q8_errors(&got_n, &want_n, &float_n);
                assert!(err <= 5e-2, "{what} normed: vs the CPU's codes {err}");
                assert!(
                    mean * 30.0 <= moved,
                    "{what} normed: {mean} vs float {moved}"
                );
                if n % 2 == 0 {
                    // A dense MLP's fused [gate; up] (gemv_wide_swiglu) on the codes too; its down
                    // projection the identity in f32 (exact), so the SwiGLU rows come out as
                    // they are, padded with zeros to k.
                    let i = n / 2;
                    let eye: Vec<f32> = (0..k * i)
                        .map(|j| f32::from(u8::from(j / i == j % i)))
                        .collect();
                    let want_mlp: Vec<f32> = want
                        .chunks(n)
                        .flat_map(|y| {
                            let h = (0..i).map(|c| y[c] / (1.0 + (-y[c]).exp()) * y[i + c]);
                            h.chain(std::iter::repeat_n(0.0, k - i))
                        })
                        .collect();
                    let down = weight(&b, DType::F32, &[k, i], &eye);
                    let got_mlp = b.get(&b.mlp(&w, &down, &b.put(t, k, &xs)).unwrap());
                    let down_off = weight(&off, DType::F32, &[k, i], &eye);
                    let float_mlp = off.get(&off.mlp(&w_off, &down_off, &x_off).unwrap());
                    let (err, _, moved) = q8_errors(&got_mlp, &want_mlp, &float_mlp);
                    assert!(
                        err <= 1e-4,
                        "{what} mlp: vs the CPU's codes {err} ({moved})"
                    );
                    assert!(
                        moved >= 1e-3,
                        "{what} mlp: the float path's values ({moved})"
                    );
                }
                if t == 16 {
                    let mut r = 0;
                    for rows in [3, 4, 3, 3, 3] {
                        let xr = b.put(rows, k, &xs[r * k..(r + rows) * k]);
                        let part = b.get(&b.matmul(&w, &xr).unwrap());
                        assert_eq!(
                            bits(&got[r * n..(r + rows) * n]),
                            bits(&part),
                            "{what}: {r}"
                        );
                        r += rows;
                    }
                }
            }
        }
        let q4 = super::weight_code(DType::Q4);
        for entry in [&ops::matmul::GEMV_WIDE, &ops::matmul::GEMV_WIDE_SWIGLU] {
            let built = b.sh.kernels.built(entry);
            assert!(
                built.contains(&(q4 | super::kernels::q8_act())),
                "{label} {}: {built:?}",
                entry.name
            );
        }
        // q8 weights: the float path, the same bits as without the knob.
        let (n, k) = (33, 1056);
        let wv = rng.vec(n * k, 0.5);
        let xs = rng.vec(5 * k, 1.0);
        let (w, w_off) = (
            weight(&b, DType::Q8, &[n, k], &wv),
            weight(&off, DType::Q8, &[n, k], &wv),
        );
        assert_eq!(
            bits(&b.get(&b.matmul(&w, &b.put(5, k, &xs)).unwrap())),
            bits(&off.get(&off.matmul(&w_off, &off.put(5, k, &xs)).unwrap())),
            "{label}: q8 weights"
        );
    }
}

/// The dense wide gemv's token blocks (`EDGEDIFF_WIDE_TARGET_GROUPS`): each block its own
/// workgroup (0), every block in one looping workgroup (1), or in between (7: 2–3 workgroups a row
/// group here), and the 8-bit codes made once by `q8_codes` (`EDGEDIFF_WIDE_Q8_ONCE`) give the
/// same bits — plain, with a folded norm, and the fused SwiGLU of a dense MLP, with 8-bit and float
/// activations, q4 and q8 weights — on poisoned outputs, so a block the loop skipped or a code not
/// written would show.
#[test]
fn wide_gemv_token_blocks_looped_in_a_workgroup_equal_them_spread() {
    use super::choice::KernelChoice;
    let with = |target, once, q8| super::GpuOptions {
        poison: true,
        kernels: KernelChoice {
            wide_target_groups: target,
            wide_q8_once: once,
            wide_q8_act: q8,
            ..KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let variants = [(1, false), (7, false), (0, true), (1, true)];
    for q8 in [true, false] {
        let base = super::testing::backends_with(with(0, false, q8));
        let runs: Vec<_> = variants
            .iter()
            .map(|&(target, once)| super::testing::backends_with(with(target, once, q8)))
            .collect();
        for (i, (label, b0)) in base.iter().enumerate() {
            let mut rng = Rng(57);
            for (dtype, n, k) in [
                (DType::Q4, 300, 1056),
                (DType::Q4, 70, 2048),
                (DType::Q8, 90, 1024),
            ] {
                let wv = rng.vec(n * k, 0.5);
                let nv: Vec<f32> = rng.vec(k, 1.0).iter().map(|v| 0.5 + v.abs()).collect();
                let dv = rng.vec(k * n / 2, 0.5);
                for t in [7, 16] {
                    let xs = rng.vec(t * k, 1.0);
                    let what = format!("{label} q8 acts {q8} {dtype} [{n}, {k}] {t} rows");
                    let run = |b: &GpuBackend| {
                        let w = weight(b, dtype, &[n, k], &wv);
                        let nw = weight(b, DType::F32, &[k], &nv);
                        let down = weight(b, DType::F32, &[k, n / 2], &dv);
                        let x = b.put(t, k, &xs);
                        let mut out = b.get(&b.matmul(&w, &x).unwrap());
                        out.extend(b.get(&b.matmul_normed(&w, &x, &nw, 1e-5).unwrap()));
                        out.extend(b.get(&b.mlp(&w, &down, &x).unwrap()));
                        out
                    };
                    let spread = run(b0);
                    assert!(spread.iter().all(|v| v.is_finite()), "{what}");
                    for ((target, once), r) in variants.iter().zip(&runs) {
                        assert_eq!(
                            bits(&run(&r[i].1)),
                            bits(&spread),
                            "{what}: target {target}, codes once {once}"
                        );
                    }
                }
            }
            if q8 {
                let q4 = super::weight_code(DType::Q4) | super::kernels::q8_act();
                let once = &runs[2][i].1;
                let built = once.sh.kernels.built(&ops::matmul::Q8_CODES);
                assert!(built.contains(&q4), "{label}: q8_codes built {built:?}");
            }
        }
    }
}

/// A weight past `gemv_blocked_max_bytes` with enough row groups to fill the GPU (the LM head)
/// takes the wide gemv for up to `gemv_max_t` rows where its workgroups loop over the token blocks
/// (`wide_target_groups`): the bits of the wide gemv taken the ordinary way (the byte bound
/// lifted), not those of the tiles it took before (`wide_target_groups` 0); past `gemv_max_t`
/// rows the tiles still.
#[test]
fn a_large_weight_takes_the_looping_wide_gemv_for_the_gemvs_rows() {
    use super::choice::KernelChoice;
    let with = |target, max_bytes| super::GpuOptions {
        poison: true,
        kernels: KernelChoice {
            wide_target_groups: target,
            gemv_blocked_max_bytes: max_bytes,
            // 16 lanes a row: 32 rows a row group.
            wide_min_chunks: 0,
            ..KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let runs: Vec<_> = [(4, 0), (0, 0), (0, u64::MAX)]
        .into_iter()
        .map(|(target, bytes)| super::testing::backends_with(with(target, bytes)))
        .collect();
    for (i, (label, looped)) in runs[0].iter().enumerate() {
        let (tiles, wide) = (&runs[1][i].1, &runs[2][i].1);
        let mut rng = Rng(61);
        // 4 row groups of 32 rows (16 lanes a row) at least: the target.
        let (n, k) = (160, 2048);
        let wv = rng.vec(n * k, 0.5);
        let max_t = looped.sh.dev.kernels.gemv_max_t;
        for t in [16.min(max_t), max_t + 3] {
            let xs = rng.vec(t * k, 1.0);
            let run = |b: &GpuBackend| {
                let w = weight(b, DType::Q4, &[n, k], &wv);
                b.get(&b.matmul(&w, &b.put(t, k, &xs)).unwrap())
            };
            let (got, by_tiles, by_wide) = (run(looped), run(tiles), run(wide));
            // assert! rather than assert_eq!: a failure names the case, not 2,560 numbers.
            if t <= max_t {
                assert!(bits(&got) == bits(&by_wide), "{label} {t} rows");
                assert!(
                    bits(&got) != bits(&by_tiles),
                    "{label} {t} rows: the tiles' sums"
                );
            } else {
                assert!(bits(&got) == bits(&by_tiles), "{label} {t} rows");
            }
        }
    }
}

/// The looping wide gemv in row sets (`EDGEDIFF_WIDE_ROW_SETS`): 2 or 4 sets of rows a workgroup
/// against each staged block give the one-set sums bit for bit, for q4 with 8-bit activations and
/// q8 weights, a row count whose last workgroup has a partial set and an empty one, and ragged
/// token blocks; one block (nothing to share) keeps one set; the row-set pipelines ran.
#[test]
fn the_looping_wide_gemv_in_row_sets_keeps_its_sums() {
    use super::choice::KernelChoice;
    let with = |sets| {
        poisoned(KernelChoice {
            wide_target_groups: 4,
            // 16 lanes a row: 32 rows a set.
            wide_min_chunks: 0,
            wide_row_sets: sets,
            ..KernelChoice::from_env()
        })
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let runs: Vec<_> = [1, 2, 4]
        .into_iter()
        .map(|sets| super::testing::backends_with(with(sets)))
        .collect();
    for (i, (label, one)) in runs[0].iter().enumerate() {
        let mut rng = Rng(67);
        // 200 rows: 7 sets of 32; at 4 sets the second workgroup has 2 full, 1 partial, 1 empty.
        for (dtype, n, k) in [(DType::Q4, 200, 2048), (DType::Q8, 200, 1024)] {
            let wv = rng.vec(n * k, 0.5);
            for t in [16, 13, 3] {
                let xs = rng.vec(t * k, 1.0);
                let run = |b: &GpuBackend| {
                    let w = weight(b, dtype, &[n, k], &wv);
                    b.get(&b.matmul(&w, &b.put(t, k, &xs)).unwrap())
                };
                let want = run(one);
                assert!(
                    want.iter().all(|v| v.is_finite()),
                    "{label} {dtype} {t} rows"
                );
                for (sets, r) in [2u32, 4].iter().zip(&runs[1..]) {
                    let b = &r[i].1;
                    let (lanes, tile) =
                        ops::matmul::wide_gemv(&b.sh.dev.kernels, dtype, k, t, n).unwrap();
                    let tile =
                        ops::matmul::wide_q8(&b.sh.dev.kernels, dtype, k).map_or(tile, |q| q.0);
                    let took = ops::matmul::wide_row_sets(&b.sh.dev.kernels, n, lanes, t, tile);
                    assert_eq!(
                        took,
                        if t > tile as usize { *sets } else { 1 },
                        "{label} {t} rows"
                    );
                    assert!(
                        bits(&run(b)) == bits(&want),
                        "{label} {dtype} [{n}, {k}] {t} rows: {sets} sets"
                    );
                }
            }
        }
        for (sets, r) in [2u32, 4].iter().zip(&runs[1..]) {
            let built = r[i].1.sh.kernels.built(&ops::matmul::GEMV_WIDE);
            let q4 = super::weight_code(DType::Q4) | super::kernels::q8_act();
            let want = q4 | super::kernels::row_sets(*sets);
            let q4_on = r[i].1.sh.dev.kernels.wide_q8_act;
            assert!(
                !q4_on || built.contains(&want),
                "{label}: {sets} sets not built: {built:?}"
            );
        }
    }
}

/// The pipeline store (`EDGEDIFF_PIPELINE_CACHE`): a run that names a model records the
/// pipelines it built; the next run naming that model builds them before any op asks for one and
/// computes the same bits; another model's list is its own; garbage in either file is ignored
/// (no error, valid lines still used) and replaced whole at the next save; nothing is written
/// without a store.
#[test]
fn a_models_pipelines_are_built_ahead_in_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let with = |store: bool| super::GpuOptions {
        pipeline_cache: store.then(|| dir.path().to_path_buf()),
        ..super::GpuOptions::from_env()
    };
    let mut rng = Rng(91);
    let (n, k) = (40, 256);
    let vals = rng.vec(n * k, 0.5);
    let xs = rng.vec(3 * k, 1.0);
    let run = |b: &GpuBackend| {
        let w = weight(b, DType::Q4, &[n, k], &vals);
        let y = b.get(&b.matmul(&w, &b.put(3, k, &xs)).unwrap());
        b.keep_caches();
        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let files = || {
        let mut v: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    let plain = GpuBackend::new(&with(false)).unwrap();
    plain.prepare_for_model("m1");
    let want = run(&plain);
    drop(plain);
    assert!(files().is_empty(), "no store, no files: {:?}", files());

    let first = GpuBackend::new(&with(true)).unwrap();
    first.prepare_for_model("m1");
    assert_eq!(first.finish_warm_up(), 0, "nothing recorded yet");
    assert_eq!(run(&first), want);
    let built = first.pipelines_built();
    assert!(!built.is_empty());
    drop(first);
    let keys = files().into_iter().find(|f| f.ends_with(".keys")).unwrap();

    let second = GpuBackend::new(&with(true)).unwrap();
    second.prepare_for_model("m1");
    assert_eq!(second.finish_warm_up(), built.len());
    assert_eq!(second.pipelines_built(), built, "built before any op");
    assert_eq!(run(&second), want);
    drop(second);

    let other = GpuBackend::new(&with(true)).unwrap();
    other.prepare_for_model("m2");
    assert_eq!(other.finish_warm_up(), 0, "another model's list is its own");
    drop(other);

    // Garbage: a keys file with one valid line among broken ones, driver data cut short.
    let kpath = dir.path().join(&keys);
    let (f, e, w) = &built[0];
    std::fs::write(
        &kpath,
        format!("junk\n{f}\t{e}\t{w}\nno.wgsl\tnone\t1\n\u{0}\u{1}"),
    )
    .unwrap();
    for p in files().iter().filter(|p| p.ends_with(".pipelines")) {
        std::fs::write(dir.path().join(p), b"EDPIPE01 cut").unwrap();
    }
    let again = GpuBackend::new(&with(true)).unwrap();
    again.prepare_for_model("m1");
    assert_eq!(again.finish_warm_up(), 1, "the one valid, known line");
    assert_eq!(run(&again), want);
    drop(again);
    let text = std::fs::read_to_string(&kpath).unwrap();
    assert_eq!(
        super::pipeline_store::parse_keys(&text),
        built,
        "rewritten whole"
    );
}

/// One-row passes of f32 weights (the routers) on the wide gemv with 128 lanes a row
/// (`EDGEDIFF_WIDE_F32_LANES1`): the CPU's products for long, short and ragged rows (a lane's last
/// round past the row's end), and not the 64-lane sums bit for bit where rows are long (so the
/// 128-lane path ran); two-row passes keep 64 lanes, so their bits do not change.
#[test]
fn one_row_f32_wide_gemv_with_128_lanes_matches_the_cpu() {
    use super::choice::KernelChoice;
    let with = |lanes| super::GpuOptions {
        poison: true,
        kernels: KernelChoice {
            gemv_wide_f32: true,
            wide_f32_lanes1: lanes,
            ..KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    let (b64, b128) = (
        GpuBackend::new(&with(64)).unwrap(),
        GpuBackend::new(&with(128)).unwrap(),
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut rng = Rng(83);
    for (n, k) in [(256, 2048), (37, 64), (9, 1088), (70, 4096)] {
        let vals = rng.vec(n * k, 0.5);
        for t in [1, 2] {
            let xs = rng.vec(t * k, 1.0);
            let want = CpuBackend.matmul(
                &weight(&CpuBackend, DType::F32, &[n, k], &vals),
                &CpuBackend.put(t, k, &xs),
            );
            let want = CpuBackend.get(&want.unwrap());
            let got = |b: &GpuBackend| {
                let w = weight(b, DType::F32, &[n, k], &vals);
                b.get(&b.matmul(&w, &b.put(t, k, &xs)).unwrap())
            };
            let (g64, g128) = (got(&b64), got(&b128));
            let e = rel_l2(&g128, &want);
            assert!(e <= 1e-5, "n{n} k{k} t{t}: 128 lanes vs CPU rel L2 {e}");
            if t == 2 {
                assert!(bits(&g128) == bits(&g64), "n{n} k{k}: two rows changed");
            } else if k >= 2048 {
                assert!(
                    bits(&g128) != bits(&g64),
                    "n{n} k{k}: the 128-lane gemv did not run"
                );
            }
        }
    }
}

/// `EDGEDIFF_WIDE_DENSE_LANES` moves the dense matrices' lanes but not those of a matrix the wide
/// gemv reads once (the LM head), which keeps the experts' (more lanes there measured slower).
#[test]
fn dense_lanes_leave_the_read_once_matrices_alone() {
    use super::choice::KernelChoice;
    let choice = KernelChoice {
        wide_dense_lanes: 32,
        wide_target_groups: 4,
        wide_lanes: 16,
        wide_min_chunks: 8,
        ..KernelChoice::default()
    };
    let lanes = |rows| ops::matmul::wide_gemv(&choice, DType::Q4, 2048, 2, rows).map(|w| w.0);
    // Rows of 2048 (64 chunks) take 8 lanes as the experts do: 64 rows a group, 4 groups read once.
    assert_eq!(lanes(40), Some(32));
    assert_eq!(lanes(192), Some(32));
    assert_eq!(lanes(193), Some(8));
    let off = KernelChoice {
        wide_dense_lanes: 0,
        ..choice
    };
    assert_eq!(
        ops::matmul::wide_gemv(&off, DType::Q4, 2048, 2, 40).map(|w| w.0),
        Some(8)
    );
}

/// The defaults measured on 2026-12-08 (docs/PERF.md): the LLaDA2.0-mini head [157,184 × 2048] of a
/// one-row pass — an AR step's, alone or gathered from a batch — takes the wide gemv (the
/// word-a-lane one cost a 16-sequence batched AR pass 1.9 of its 3.9 ms), and so does the dense
/// down projection [2048 × 5120] from two rows, where its rows fit the staging only as codes;
/// a one-row pass's other matrices keep the word-a-lane gemv.
#[test]
fn the_measured_defaults_put_the_one_row_head_and_long_rows_on_the_wide_gemv() {
    use super::choice::KernelChoice;
    let d = KernelChoice::default();
    let wide = |k, solo, rows| ops::matmul::wide_gemv(&d, DType::Q4, k, solo, rows);
    assert!(wide(2048, 1, 157_184).is_some(), "the one-row head");
    assert_eq!(wide(2048, 1, 3072), None, "a one-row qkv");
    assert_eq!(wide(5120, 1, 2048), None, "a one-row long dense row");
    for solo in [2, 16, 32] {
        let (_, tile) = wide(5120, solo, 2048).expect("the long dense rows");
        assert_eq!(tile, 2, "{solo} rows: two tokens of 5120 codes a block");
    }
    assert_eq!(
        wide(ops::matmul::WIDE_Q8_STAGE + 32, 2, 2048),
        None,
        "past the codes' staging"
    );
}

/// A one-row pass's matrix that the wide gemv reads once (the LM head; here a small one, with the
/// workgroup target lowered to match) takes the wide gemv with 8-bit activations
/// (`EDGEDIFF_WIDE_HEAD1`): backend/q8_act.rs's products, not the word-a-lane gemv's floats. A
/// matrix too small to be read once, and every matrix with the knob off, keeps the word-a-lane
/// gemv and the CPU's float products.
#[test]
fn one_row_head_takes_the_wide_gemv_and_its_codes() {
    use super::choice::KernelChoice;
    use crate::backend::q8_act;
    let with = |head1| {
        poisoned(KernelChoice {
            wide_q8_act: true,
            wide_min_chunks: 4,
            wide_target_groups: 4,
            wide_head1: head1,
            ..KernelChoice::from_env()
        })
    };
    let (on, off) = (
        GpuBackend::new(&with(true)).unwrap(),
        GpuBackend::new(&with(false)).unwrap(),
    );
    let mut rng = Rng(57);
    // 700 rows of 33 chunks: 8 lanes a row, 11 row groups (≥ 4: read once); 40 rows: one group.
    for (n, k, head) in [(700, 1056, true), (40, 1056, false), (300, 2048, true)] {
        let choice = &on.sh.dev.kernels;
        let shape = ops::matmul::wide_gemv(choice, DType::Q4, k, 1, n);
        assert_eq!(shape.is_some(), head, "[{n}, {k}]: the head's kernel");
        let off_shape = ops::matmul::wide_gemv(&off.sh.dev.kernels, DType::Q4, k, 1, n);
        assert_eq!(off_shape, None, "[{n}, {k}]: the knob off");
        let wv = rng.vec(n * k, 0.5);
        let bytes = dtype::encode(DType::Q4, &wv, k);
        let xs: Vec<f32> = rng
            .vec(k, 1.0)
            .iter()
            .enumerate()
            .map(|(i, v)| v * [1.0, 1e-3, 40.0][i / 96 % 3])
            .collect();
        let got = |b: &GpuBackend| {
            let w = weight(b, DType::Q4, &[n, k], &wv);
            b.get(&b.matmul(&w, &b.put(1, k, &xs)).unwrap())
        };
        let (g_on, g_off) = (got(&on), got(&off));
        let codes = q8_act::matmul_q4(&bytes, n, k, &xs).unwrap();
        let c = CpuBackend;
        let float = c.get(
            &c.matmul(&weight(&c, DType::Q4, &[n, k], &wv), &c.put(1, k, &xs))
                .unwrap(),
        );
        let e = rel_l2(&g_off, &float);
        assert!(e <= TOL, "[{n}, {k}] off: vs the CPU {e:e}");
        if head {
            let (err, _, moved) = q8_errors(&g_on, &codes, &float);
            assert!(err <= 2e-5, "[{n}, {k}]: vs the CPU's codes {err}");
            assert!(
                moved >= 1e-3,
                "[{n}, {k}]: the float path's values ({moved})"
            );
        } else {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&g_on),
                bits(&g_off),
                "[{n}, {k}]: the word-a-lane gemv"
            );
        }
    }
}

/// One-row passes with 32 or 64 lanes a weight row (`EDGEDIFF_GEMV1_LANES`): the CPU's products
/// for every weight type and odd widths (no multiple of 8, or a row shorter than the lanes' first
/// round), and not the 16-lane sums bit for bit where rows are long (so the wider path ran).
#[test]
fn one_row_gemv_with_more_lanes_matches_the_cpu() {
    use super::choice::KernelChoice;
    let with = |lanes| super::GpuOptions {
        poison: true,
        kernels: KernelChoice {
            gemv1_lanes: lanes,
            // f32 weights would take the wide gemv instead.
            gemv_wide_f32: false,
            ..KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    let b16 = GpuBackend::new(&with(16)).unwrap();
    let wider = [32, 64].map(|l| (l, GpuBackend::new(&with(l)).unwrap()));
    let mut rng = Rng(31);
    for (n, k) in [(37, 96), (70, 2048), (9, 1088), (130, 70)] {
        for dtype in DTYPES {
            if dtype.is_quantized() && k % 32 != 0 {
                continue;
            }
            let vals = rng.vec(n * k, 0.5);
            let xs = rng.vec(k, 1.0);
            let want = CpuBackend.matmul(
                &weight(&CpuBackend, dtype, &[n, k], &vals),
                &CpuBackend.put(1, k, &xs),
            );
            let want = CpuBackend.get(&want.unwrap());
            let got = |b: &GpuBackend| {
                let w = weight(b, dtype, &[n, k], &vals);
                b.get(&b.matmul(&w, &b.put(1, k, &xs)).unwrap())
            };
            let g16 = got(&b16);
            for (lanes, b) in &wider {
                let g = got(b);
                let e = rel_l2(&g, &want);
                assert!(
                    e <= 1e-5,
                    "{dtype} n{n} k{k}: {lanes} lanes vs CPU rel L2 {e}"
                );
                if k >= 1024 {
                    assert!(
                        g != g16,
                        "{dtype} n{n} k{k}: the {lanes}-lane gemv did not run"
                    );
                }
            }
        }
    }
}

/// `EDGEDIFF_GEMV_MAX_GROUPS`: a capped word-a-lane gemv grid whose workgroups work several row
/// groups in turn writes what one workgroup a group writes, bit for bit — one row (16 and 64
/// lanes), token blocks along z, ragged last groups, every weight type — into poisoned outputs.
#[test]
fn capped_gemv_grid_loops_over_row_groups_with_the_same_bits() {
    use super::choice::KernelChoice;
    let with = |cap, lanes| super::GpuOptions {
        poison: true,
        kernels: KernelChoice {
            gemv_max_groups: cap,
            gemv1_lanes: lanes,
            // Every row count and weight type on the word-a-lane gemv.
            gemv_wide_min_t: None,
            gemv_wide_f32: false,
            ..KernelChoice::from_env()
        },
        ..super::GpuOptions::from_env()
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut rng = Rng(57);
    for lanes in [16, 64] {
        let plain = GpuBackend::new(&with(0, lanes)).unwrap();
        let capped = [1, 5].map(|c| (c, GpuBackend::new(&with(c, lanes)).unwrap()));
        for (n, k, t) in [(37, 96, 1), (70, 256, 1), (45, 128, 3), (29, 64, 6)] {
            for dtype in DTYPES {
                if dtype.is_quantized() && k % 32 != 0 {
                    continue;
                }
                let vals = rng.vec(n * k, 0.5);
                let xs = rng.vec(t * k, 1.0);
                let got = |b: &GpuBackend| {
                    let w = weight(b, dtype, &[n, k], &vals);
                    b.get(&b.matmul(&w, &b.put(t, k, &xs)).unwrap())
                };
                let want = got(&plain);
                for (cap, b) in &capped {
                    assert!(
                        bits(&got(b)) == bits(&want),
                        "{dtype} n{n} k{k} t{t}, {lanes} lanes: grid capped at {cap}"
                    );
                }
            }
        }
    }
}

/// `EDGEDIFF_MOE_GEMV_BLOCKS`: a GEMV expert workgroup working several weight-row blocks in turn
/// writes what one workgroup a block writes, bit for bit — on the direct path (one token), the
/// list path, with the shared expert's column, and with a ragged last workgroup (3 blocks a
/// workgroup over 48 gate/up and 40 down blocks) or a single one (64).
#[test]
fn expert_gemv_row_blocks_per_workgroup_change_no_bit() {
    use super::choice::{ExpertKernel, KernelChoice};
    use super::GpuOptions;
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        let spec = SynthSpec {
            hidden: 160,
            expert_ffn: 96,
            ..SynthSpec::tiny(arch)
        };
        let (_dir, file) = synth_file_of(&spec, DType::Q4);
        let c = file.header.metadata.config.clone();
        let h = c.hidden_size;
        let mut want: Option<Vec<Vec<f32>>> = None;
        for blocks in [1, 3, 64] {
            let opts = GpuOptions {
                poison: true,
                kernels: KernelChoice {
                    moe: Some(ExpertKernel::Gemv),
                    moe_gemv_blocks: blocks,
                    ..KernelChoice::from_env()
                },
                ..GpuOptions::from_env()
            };
            let b = GpuBackend::new(&opts).unwrap();
            let m = MoeLayer::load(&b, &file);
            let mut rng = Rng(71);
            let mut got = Vec::new();
            for t in [1, 6] {
                let x = b.put(t, h, &rng.vec(t * h, 1.0));
                let r = m.route(&b, &x, &c);
                got.push(b.get(&m.experts_out(&b, &x, &r)));
            }
            assert!(
                got.iter().flatten().all(|v| v.is_finite()),
                "{arch} {blocks}"
            );
            match &want {
                None => want = Some(got),
                Some(w) => assert!(*w == got, "{arch}: {blocks} blocks a workgroup"),
            }
        }
    }
}

/// `EDGEDIFF_MOE_GEMV1_LANES=32`: one-token GEMV expert kernels with 32 lanes a weight row give
/// the 16-lane kernels' outputs (which the CPU comparisons above check) to float rounding, not bit
/// for bit where rows are long (so the 32-lane pipeline ran), with the shared expert's column and
/// short rows whose last lanes get no octet; passes of more tokens keep 16 lanes, bit for bit.
#[test]
fn one_token_expert_gemv_with_32_lanes_matches_16() {
    use super::choice::{ExpertKernel, KernelChoice};
    use super::GpuOptions;
    // Two backends for every case: each new one would build its pipelines again.
    let backends = [16, 32].map(|lanes| {
        GpuBackend::new(&GpuOptions {
            poison: true,
            kernels: KernelChoice {
                moe: Some(ExpertKernel::Gemv),
                moe_wide: super::choice::MoeWide::Off,
                moe_gemv1_lanes: lanes,
                ..KernelChoice::from_env()
            },
            ..GpuOptions::from_env()
        })
        .unwrap()
    });
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        for (hidden, ffn, dtypes) in [
            (160, 96, &[DType::Q4, DType::Q8, DType::F16][..]),
            (1088, 512, &[DType::Q4][..]),
        ] {
            let spec = SynthSpec {
                hidden,
                expert_ffn: ffn,
                ..SynthSpec::tiny(arch)
            };
            for &dtype in dtypes {
                let (_dir, file) = synth_file_of(&spec, dtype);
                let c = file.header.metadata.config.clone();
                let h = c.hidden_size;
                let outs: Vec<Vec<Vec<f32>>> = backends
                    .iter()
                    .map(|b| {
                        let m = MoeLayer::load(b, &file);
                        let mut rng = Rng(73);
                        [1, 6]
                            .iter()
                            .map(|&t| {
                                let x = b.put(t, h, &rng.vec(t * h, 1.0));
                                let r = m.route(b, &x, &c);
                                b.get(&m.experts_out(b, &x, &r))
                            })
                            .collect()
                    })
                    .collect();
                let what = format!("{arch} {dtype} {hidden}x{ffn}");
                let e = rel_l2(&outs[1][0], &outs[0][0]);
                assert!(e <= 1e-5, "{what}: one token, 32 vs 16 lanes rel L2 {e}");
                if hidden >= 1088 {
                    assert!(
                        outs[1][0] != outs[0][0],
                        "{what}: the 32-lane kernels did not run"
                    );
                }
                assert!(outs[1][1] == outs[0][1], "{what}: six tokens changed");
            }
        }
    }
}

/// The wide GEMV expert kernels (16-byte chunks, staged tokens): against the word-a-lane ones
/// (which the CPU comparisons above check) to a few ulps, but not bit for bit — so the wide path
/// is the one taken — on the direct path (1 token), the lists (13 tokens: blocks of tokens per
/// expert) and with the shared expert's column; and every token's output with 13 tokens equals
/// that token alone bit for bit. Rows of 1088 (q4: 34 chunks, 16 lanes; q8: 68, 64 lanes) and 512.
#[test]
fn wide_expert_kernels_match_the_narrow_ones_and_each_token_alone() {
    use super::choice::{ExpertKernel, KernelChoice};
    use super::GpuOptions;
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        let spec = SynthSpec {
            hidden: 1088,
            expert_ffn: 512,
            ..SynthSpec::tiny(arch)
        };
        for dtype in [DType::Q4, DType::Q8] {
            let (_dir, file) = synth_file_of(&spec, dtype);
            let c = file.header.metadata.config.clone();
            let h = c.hidden_size;
            let mut outs = Vec::new();
            // Wide with the lanes of wide_lanes, and with fewer for short rows; then narrow.
            for (wide, min_chunks) in [(true, 0), (true, 4), (false, 0)] {
                let b = GpuBackend::new(&GpuOptions {
                    poison: true,
                    kernels: KernelChoice {
                        moe: Some(ExpertKernel::Gemv),
                        moe_wide: if wide {
                            super::choice::MoeWide::All
                        } else {
                            super::choice::MoeWide::Off
                        },
                        wide_min_chunks: min_chunks,
                        // Float activations: this test holds the wide kernels to the narrow.
                        wide_q8_act: false,
                        // The router of a token alone sums as in a block (one-row passes have
                        // lanes of their own by default): the experts' bits are the subject.
                        wide_f32_lanes1: 64,
                        ..KernelChoice::from_env()
                    },
                    ..GpuOptions::from_env()
                })
                .unwrap();
                let m = MoeLayer::load(&b, &file);
                let mut rng = Rng(73);
                let xs = rng.vec(13 * h, 1.0);
                let x = b.put(13, h, &xs);
                let all = b.get(&m.experts_out(&b, &x, &m.route(&b, &x, &c)));
                let x1 = b.put(1, h, &xs[..h]);
                let one = b.get(&m.experts_out(&b, &x1, &m.route(&b, &x1, &c)));
                if wide {
                    for t in 0..13 {
                        let xt = b.put(1, h, &xs[t * h..(t + 1) * h]);
                        let yt = b.get(&m.experts_out(&b, &xt, &m.route(&b, &xt, &c)));
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&all[t * h..(t + 1) * h]),
                            bits(&yt),
                            "{arch} {dtype}: token {t} of 13 vs alone"
                        );
                    }
                }
                outs.push((all, one));
            }
            let (na, n1) = &outs[2];
            for (lanes, (wa, w1)) in ["wide lanes", "fewer lanes"].iter().zip(&outs) {
                for (what, w, n) in [("13 tokens", wa, na), ("1 token", w1, n1)] {
                    let e = rel_l2(w, n);
                    assert!(
                        e <= 1e-5,
                        "{arch} {dtype} {what} {lanes}: wide vs narrow rel L2 {e}"
                    );
                    assert!(
                        w != n,
                        "{arch} {dtype} {what} {lanes}: the wide kernels did not run"
                    );
                }
            }
            assert!(
                outs[0].0 != outs[1].0,
                "{arch} {dtype}: fewer lanes changed nothing"
            );
        }
    }
}

/// The wide expert kernels in row sets (`EDGEDIFF_MOE_ROW_SETS`): 2 and 4 sets a workgroup give
/// the one-set bits, on the direct path (1 token) and the lists (13 tokens), for q4 with 8-bit
/// codes (gate/up writing down's codes, and codes made in place) and float activations (q4, q8);
/// expert rows of 544 leave the last gate/up workgroup three sets past the columns at 4 sets,
/// hidden 1088 a partial down set. The row-set pipelines ran.
#[test]
fn wide_expert_kernels_in_row_sets_keep_their_sums() {
    use super::choice::{ExpertKernel, KernelChoice, MoeWide};
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let spec = SynthSpec {
        hidden: 1088,
        expert_ffn: 544,
        ..SynthSpec::tiny(Architecture::Llada2Moe)
    };
    for (dtype, q8, once) in [
        (DType::Q4, true, true),
        (DType::Q4, true, false),
        (DType::Q4, false, false),
        (DType::Q8, false, false),
    ] {
        let (_dir, file) = synth_file_of(&spec, dtype);
        let c = file.header.metadata.config.clone();
        let h = c.hidden_size;
        let mut runs = Vec::new();
        for sets in [1, 2, 4] {
            let b = GpuBackend::new(&poisoned(KernelChoice {
                moe: Some(ExpertKernel::Gemv),
                moe_wide: MoeWide::All,
                wide_q8_act: q8,
                moe_q8_once: once,
                wide_min_chunks: 4,
                moe_row_sets: sets,
                ..KernelChoice::from_env()
            }))
            .unwrap();
            let m = MoeLayer::load(&b, &file);
            let mut rng = Rng(79);
            let outs: Vec<Vec<f32>> = [1, 13]
                .iter()
                .map(|&t| {
                    let x = b.put(t, h, &rng.vec(t * h, 1.0));
                    b.get(&m.experts_out(&b, &x, &m.route(&b, &x, &c)))
                })
                .collect();
            if sets > 1 {
                let want = super::kernels::row_sets(sets);
                for entry in [&ops::moe::GATE_UP_WIDE, &ops::moe::DOWN_WIDE] {
                    let built = b.sh.kernels.built(entry);
                    assert!(
                        built.iter().any(|w| w & (0xff << 16) == want),
                        "{dtype} q8 {q8}: {} in {sets} sets not built: {built:x?}",
                        entry.name
                    );
                }
            }
            runs.push(outs);
        }
        for (sets, outs) in [2, 4].iter().zip(&runs[1..]) {
            for (t, (got, want)) in [1, 13].iter().zip(outs.iter().zip(&runs[0])) {
                assert!(want.iter().all(|v| v.is_finite()), "{dtype} {t} tokens");
                assert!(
                    bits(got) == bits(want),
                    "{dtype} q8 {q8} once {once}, {t} tokens: {sets} sets"
                );
            }
        }
    }
}

/// The wide expert kernels with 8-bit activations (q4): within the codes' rounding of the float
/// kernels (and not equal to them: the codes were used), on the direct path (1 token) and the
/// lists (13 tokens); every token's output with 13 tokens equals that token alone bit for bit;
/// both stages took the 8-bit pipelines; codes made once a stage (`moe_q8_once`) give the same
/// bits. The dense test above holds the arithmetic itself to the CPU's codes.
#[test]
fn wide_expert_kernels_with_8_bit_activations() {
    use super::choice::{ExpertKernel, KernelChoice, MoeWide};
    use super::GpuOptions;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        let spec = SynthSpec {
            hidden: 1088,
            expert_ffn: 512,
            ..SynthSpec::tiny(arch)
        };
        let (_dir, file) = synth_file_of(&spec, DType::Q4);
        let c = file.header.metadata.config.clone();
        let h = c.hidden_size;
        let mut outs = Vec::new();
        // Codes made once at two lane counts of gate/up: 8 (its 32 columns a workgroup whole
        // chunks: gate/up writes down's codes, QCODES_OUT) and 16 (half chunks: q8_codes makes
        // them), each against the 8-bit kernels making their own at the same lanes.
        let mut made = Vec::new();
        for (q8, once, min_chunks) in [
            (true, false, 4),
            (false, false, 4),
            (true, false, 0),
            (true, true, 4),
            (true, true, 0),
        ] {
            let b = GpuBackend::new(&GpuOptions {
                poison: true,
                kernels: KernelChoice {
                    moe: Some(ExpertKernel::Gemv),
                    moe_wide: MoeWide::All,
                    wide_q8_act: q8,
                    moe_q8_once: once,
                    // 4: down's rows of 512 (16 chunks) on 4 lanes, gate/up's 1088 on 8; 0: all
                    // on 16.
                    wide_min_chunks: min_chunks,
                    // A token alone routes as in a block (see the test above).
                    wide_f32_lanes1: 64,
                    ..KernelChoice::from_env()
                },
                ..GpuOptions::from_env()
            })
            .unwrap();
            let m = MoeLayer::load(&b, &file);
            let mut rng = Rng(79);
            let xs = rng.vec(13 * h, 1.0);
            let x = b.put(13, h, &xs);
            let all = b.get(&m.experts_out(&b, &x, &m.route(&b, &x, &c)));
            let x1 = b.put(1, h, &xs[..h]);
            let one = b.get(&m.experts_out(&b, &x1, &m.route(&b, &x1, &c)));
            if once {
                // The codes made once give the 8-bit kernels' bits exactly, routed experts and
                // the shared one alike, and the kernels that took them are the QCODES pipelines.
                let (qa, q1): &(Vec<f32>, Vec<f32>) =
                    if min_chunks == 4 { &outs[0] } else { &made[0] };
                let what = format!("{arch}, codes made once, min chunks {min_chunks}");
                assert!(bits(&all) == bits(qa), "{what}: 13 tokens");
                assert!(bits(&one) == bits(q1), "{what}: 1 token");
                let want = super::kernels::q8_act() | super::kernels::q8_codes_in();
                for entry in [&ops::moe::GATE_UP_WIDE, &ops::moe::DOWN_WIDE] {
                    let built = b.sh.kernels.built(entry);
                    assert!(
                        built.iter().any(|w| w & want == want),
                        "{what} {}: {built:?}",
                        entry.name
                    );
                }
                // Whole chunks: gate/up wrote down's codes; half chunks: q8_codes made them.
                let out = super::kernels::q8_codes_out();
                let gate_up = b.sh.kernels.built(&ops::moe::GATE_UP_WIDE);
                assert_eq!(
                    gate_up.iter().any(|w| w & out != 0),
                    min_chunks == 4,
                    "{what}: {gate_up:?}"
                );
                assert!(!b.sh.kernels.built(&ops::matmul::Q8_CODES).is_empty());
                continue;
            }
            if min_chunks == 0 {
                made.push((all, one));
                continue;
            }
            if q8 {
                for t in 0..13 {
                    let xt = b.put(1, h, &xs[t * h..(t + 1) * h]);
                    let yt = b.get(&m.experts_out(&b, &xt, &m.route(&b, &xt, &c)));
                    assert_eq!(
                        bits(&all[t * h..(t + 1) * h]),
                        bits(&yt),
                        "{arch}: token {t} of 13 vs alone"
                    );
                }
                let want = super::weight_code(DType::Q4) | super::kernels::q8_act();
                for entry in [&ops::moe::GATE_UP_WIDE, &ops::moe::DOWN_WIDE] {
                    let built = b.sh.kernels.built(entry);
                    assert!(
                        built
                            .iter()
                            .any(|w| w & 0xff == super::weight_code(DType::Q4) && w & want == want),
                        "{arch} {}: {built:?}",
                        entry.name
                    );
                }
            }
            outs.push((all, one));
        }
        let ((qa, q1), (fa, f1)) = (&outs[0], &outs[1]);
        for (what, q, f) in [("13 tokens", qa, fa), ("1 token", q1, f1)] {
            let e = rel_l2(q, f);
            assert!(
                (1e-4..=2e-2).contains(&e),
                "{arch} {what}: 8-bit vs float activations rel L2 {e}"
            );
        }
    }
}

/// The register variants of the word-a-lane kernels (kernels::chunk_t, kernels::depth: one-row
/// pipelines, the experts' token chunk, eight octets' loads a round) and the direct expert path at
/// two tokens sum exactly as the plain kernels and the lists do: the routed experts (13 tokens on
/// the list path, 1 on the direct path, 2 on either; hidden 1088
/// runs the eight-deep loop) and the dense gemv at one row, two (the two-row rounds) and five, bit
/// for bit.
#[test]
fn gemv_register_variants_change_no_bit() {
    use super::choice::{ExpertKernel, KernelChoice, MoeWide};
    use super::GpuOptions;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let variants = [
        (false, 4, 4, 1),
        (true, 1, 8, 2),
        (true, 2, 4, 2),
        (true, 4, 8, 1),
    ];
    for arch in [Architecture::Llada2Moe] {
        let spec = SynthSpec {
            hidden: 1088,
            expert_ffn: 512,
            ..SynthSpec::tiny(arch)
        };
        for dtype in [DType::Q4, DType::Q8] {
            let (_dir, file) = synth_file_of(&spec, dtype);
            let c = file.header.metadata.config.clone();
            let h = c.hidden_size;
            let mut outs = Vec::new();
            for (lean_one, moe_chunk, gemv_depth, moe_direct_max_t) in variants {
                let b = GpuBackend::new(&GpuOptions {
                    poison: true,
                    kernels: KernelChoice {
                        moe: Some(ExpertKernel::Gemv),
                        moe_wide: MoeWide::Off,
                        gemv_wide_min_t: None,
                        lean_one,
                        moe_chunk,
                        gemv_depth,
                        moe_direct_max_t,
                        ..KernelChoice::from_env()
                    },
                    ..GpuOptions::from_env()
                })
                .unwrap();
                let m = MoeLayer::load(&b, &file);
                let mut rng = Rng(91);
                let xs = rng.vec(13 * h, 1.0);
                let x = b.put(13, h, &xs);
                let all = b.get(&m.experts_out(&b, &x, &m.route(&b, &x, &c)));
                let x1 = b.put(1, h, &xs[..h]);
                let one = b.get(&m.experts_out(&b, &x1, &m.route(&b, &x1, &c)));
                let x2 = b.put(2, h, &xs[..2 * h]);
                let two = b.get(&m.experts_out(&b, &x2, &m.route(&b, &x2, &c)));
                let w = weight(&b, dtype, &[45, h], &rng.vec(45 * h, 0.5));
                let d1 = b.get(&b.matmul(&w, &x1).unwrap());
                let d2 = b.get(&b.matmul(&w, &b.put(2, h, &xs[..2 * h])).unwrap());
                let d5 = b.get(&b.matmul(&w, &b.put(5, h, &xs[..5 * h])).unwrap());
                outs.push([all, one, two, d1, d2, d5].map(|v| bits(&v)));
            }
            for (i, o) in outs.iter().enumerate().skip(1) {
                for (j, what) in [
                    "13 tokens",
                    "1 token",
                    "2 tokens",
                    "dense 1 row",
                    "dense 2 rows",
                    "dense 5 rows",
                ]
                .iter()
                .enumerate()
                {
                    assert!(
                        o[j] == outs[0][j],
                        "{arch} {dtype} {what}: {:?}",
                        variants[i]
                    );
                }
            }
        }
    }
}

/// The shared expert rides along the GEMV expert kernels: two dense dispatches (gemv_swiglu,
/// gemv) fewer than computing it first, and the same sums (the backend-vs-CPU test above checks
/// the values; this one that the fused path is the one taken).
#[test]
fn shared_expert_runs_inside_the_gemv_expert_kernels() {
    let (_dir, file) = synth_file(Architecture::Llada2Moe, DType::Q4);
    let c = file.header.metadata.config.clone();
    let l = c.num_layers - 1;
    for (name, b) in backends(None) {
        let w = |n: &str| {
            b.load_weight(file.tensor(&format!("layers.{l}.{n}")).unwrap())
                .unwrap()
        };
        let (router, gu, dn) = (
            w("moe.router"),
            w(names::SHARED_GATE_UP),
            w(names::SHARED_DOWN),
        );
        let bias = c.moe.router_bias.then(|| w("moe.router_bias"));
        let experts = b.load_experts(&file, l, &|_| true).unwrap();
        let x = b.put(1, c.hidden_size, &Rng(21).vec(c.hidden_size, 1.0));
        let r = b.route(&x, &router, bias.as_ref(), &c).unwrap();
        let d0 = b.dispatches();
        let fused = b.get(&b.moe_shared_mlp(&x, &r, &experts, &gu, &dn).unwrap());
        let d1 = b.dispatches();
        let ys = b.mlp(&gu, &dn, &x).unwrap();
        let apart = b.get(&b.moe_plus_shared(&x, &r, &experts, &ys).unwrap());
        let d2 = b.dispatches();
        // Two kernels fewer, and (test backends poison every output first) their two fills.
        assert_eq!((d2 - d1) - (d1 - d0), 4, "{name}: dispatches");
        let e = rel_l2(&fused, &apart);
        assert!(e <= 1e-6, "{name}: fused vs apart rel L2 {e}");
    }
}

fn flat_stats(s: &[PositionStats]) -> Vec<f32> {
    let mut v = Vec::new();
    for p in s {
        v.extend([p.argmax as f32, p.p_max, p.entropy, p.margin]);
        for &(id, pr) in &p.top {
            v.extend([id as f32, pr]);
        }
    }
    v
}

test_backends!(lm_head_statistics_match_the_full_logits, TOL, |b| {
    let mut rng = Rng(10);
    let mut out = Vec::new();
    // 5000 rows: several 2048-logit chunks and a ragged last one; 3 positions of 6.
    for dtype in [DType::F32, DType::Q8, DType::Q4] {
        let (v, h) = (5000, 64);
        let head = weight(b, dtype, &[v, h], &rng.vec(v * h, 1.0));
        let x = b.put(6, h, &rng.vec(6 * h, 1.0));
        out.push((
            format!("{dtype} stats"),
            flat_stats(&b.lm_head_stats(&x, &head, 2..5).unwrap()),
        ));
        out.push((
            format!("{dtype} logits"),
            b.logits(&x, &head, 2..5).unwrap(),
        ));
        let sharp = b.put(1, h, &rng.vec(h, 40.0));
        out.push((
            format!("{dtype} peaked"),
            flat_stats(&b.lm_head_stats(&sharp, &head, 0..1).unwrap()),
        ));
    }
    let small = weight(b, DType::F32, &[5, 8], &rng.vec(40, 1.0));
    let x = b.put(2, 8, &rng.vec(16, 1.0));
    out.push((
        "vocab below top-k".into(),
        flat_stats(&b.lm_head_stats(&x, &small, 0..2).unwrap()),
    ));
    out
});

/// The LM-head statistics at every chunking (shaders/stats.wgsl): chunks of 2 and 5 logits (empty
/// candidate slots in the partials; more partials than stats_merge holds in registers), 64, the
/// default, 4096 (chunks past the 2048 logits a workgroup holds in registers) and 8192 (one chunk:
/// stats_merge alone on the logits, past its registers too). Three rows at once; a head of 37
/// distinct rows repeated, so the 8 best are exact ties across chunks (the lower ids win); a
/// vocabulary of one (no second probability).
#[test]
fn lm_head_statistics_at_every_chunking() {
    use super::choice::KernelChoice;
    let mut rng = Rng(57);
    let h = 16;
    let distinct = rng.vec(5000 * h, 1.0);
    let pattern = rng.vec(37 * h, 1.0);
    let repeated: Vec<f32> = (0..4999)
        .flat_map(|r| pattern[(r % 37) * h..][..h].to_vec())
        .collect();
    let one = rng.vec(h, 1.0);
    let xs = rng.vec(3 * h, 1.0);
    let heads = [
        (5000, &distinct),
        (4999, &repeated),
        (5, &distinct),
        (1, &one),
    ];
    let stats = |b: &dyn Fn(usize, &[f32]) -> Vec<PositionStats>| -> Vec<Vec<PositionStats>> {
        heads.iter().map(|&(v, w)| b(v, &w[..v * h])).collect()
    };
    let want = stats(&|v, w| {
        let head = weight(&CpuBackend, DType::F32, &[v, h], w);
        CpuBackend
            .lm_head_stats(&CpuBackend.put(3, h, &xs), &head, 0..3)
            .unwrap()
    });
    let top = |s: &[PositionStats]| -> Vec<Vec<u32>> {
        s.iter()
            .map(|p| p.top.iter().map(|t| t.0).collect())
            .collect()
    };
    // The ties: each row's 8 best are one pattern row's 8 first copies.
    for p in &want[1] {
        let ids: Vec<u32> = p.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, (0..8).map(|k| ids[0] + 37 * k).collect::<Vec<_>>());
    }
    for chunk in [2, 5, 64, 2048, 4096, 8192] {
        let base = super::GpuOptions {
            kernels: KernelChoice {
                stats_chunk: chunk,
                ..KernelChoice::from_env()
            },
            ..super::GpuOptions::from_env()
        };
        for (label, b) in super::testing::backends_with(base) {
            let got = stats(&|v, w| {
                let head = weight(&b, DType::F32, &[v, h], w);
                b.lm_head_stats(&b.put(3, h, &xs), &head, 0..3).unwrap()
            });
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let what = format!("{label}, chunk {chunk}, head {k}");
                assert_eq!(top(g), top(w), "{what}: ids");
                assert_eq!(
                    g.iter().map(|p| p.argmax).collect::<Vec<_>>(),
                    w.iter().map(|p| p.argmax).collect::<Vec<_>>(),
                    "{what}: argmax"
                );
                let e = rel_l2(&flat_stats(g), &flat_stats(w));
                assert!(e <= TOL, "{what}: relative L2 {e:e}");
            }
        }
    }
}

// Rows picked for a batched pass's LM head: ranges in any order, empty ones, awkward widths.
test_backends!(gather_rows_picks_the_rows_of_each_range, 0.0, |b| {
    let mut rng = Rng(41);
    let mut out = Vec::new();
    for (rows, cols) in [(9, 7), (33, 64), (5, 130)] {
        let x = b.put(rows, cols, &rng.vec(rows * cols, 1.0));
        let ranges = [2..5, 0..0, 7.min(rows)..rows, 0..1, 1..4];
        let g = b.gather_rows(&x, &ranges).unwrap();
        out.push((format!("{rows}x{cols}"), b.get(&g)));
    }
    let x = b.put(3, 4, &rng.vec(12, 1.0));
    assert!(
        b.gather_rows(&x, &[0..1, 1..4]).is_err(),
        "rows past the end"
    );
    out
});

#[test]
fn bad_inputs_are_errors_not_panics() {
    for (label, g) in backends(None) {
        let t = weight(&g, DType::F32, &[10, 8], &[0.5; 80]);
        assert!(
            matches!(
                g.embed(&t, &[3, 10]),
                Err(crate::backend::BackendError::TokenOutOfRange { id: 10, vocab: 10 })
            ),
            "{label}"
        );
        let x = g.upload_act(2, 7, &[0.0; 14]).unwrap();
        assert!(g.matmul(&t, &x).is_err(), "{label}");
        assert!(g.lm_head_stats(&x, &t, 1..3).is_err(), "{label}");
        // ZAYA1's ops: a standard-attention cache has no CCA state; scales of the wrong shape.
        let c = attn_config(QkNorm::PerHead, 20, None);
        let mut kv = g.new_kv(&c, 8).unwrap();
        let mut proj = g.upload_act(1, 8, &[0.0; 8]).unwrap();
        let cca = CcaWeights {
            conv_dw: &t,
            conv_dw_bias: &t,
            conv_grouped: &t,
            conv_grouped_bias: &t,
            temp: &t,
        };
        let p = CcaParams::for_layer(&c, 0, 0);
        assert!(g.cca_qkv(&mut proj, cca, &mut kv, p).is_err(), "{label}");
        let mut x8 = g.upload_act(2, 8, &[0.0; 16]).unwrap();
        let d8 = g.upload_act(2, 8, &[0.0; 16]).unwrap();
        let n8 = weight(&g, DType::F32, &[8], &[1.0; 8]);
        assert!(
            g.scaled_residual_norm(&mut x8, &d8, &t, &n8, 1e-6).is_err(),
            "{label}"
        );
        assert!(g.embed_affine(&mut x8, &t).is_err(), "{label}");
        // The backend keeps working after errors.
        let x = g.upload_act(1, 8, &[1.0; 8]).unwrap();
        assert_eq!(
            g.read_act(&g.matmul(&t, &x).unwrap()).unwrap(),
            vec![4.0; 10]
        );
    }
}

/// `bench forward`'s dispatch floor records and times its chains (the same trivial copy behind
/// barriers, alternating with an add, into separate buffers, and timed per dispatch where the
/// device has timestamps) without error, and gives a positive time for each.
#[test]
fn dispatch_floor_runs_its_chains() {
    for (label, b) in super::testing::backends_with(super::GpuOptions::from_env()) {
        let f = b.dispatch_floor(8).unwrap();
        for (what, v) in [
            ("dependent", f.dependent),
            ("switching", f.switching),
            ("independent", f.independent),
            ("timed", f.timed.unwrap_or(1.0)),
            ("host record", f.host_record),
            ("host submit", f.host_submit),
        ] {
            assert!(v.is_finite() && v > 0.0, "{label} {what}: {v}");
        }
    }
}

/// Timed dispatches carry their grid (`bench forward --shapes`): one norm of 3 rows and one of 5
/// are the same entry point in two grids, in recording order, and the untagged list names the
/// same entries.
#[test]
fn timed_dispatches_carry_their_grids() {
    let b = GpuBackend::new(&super::GpuOptions::from_env()).unwrap();
    let mut rng = Rng(11);
    let w = weight(&b, DType::F32, &[64], &rng.vec(64, 1.0));
    let xs = [3, 5].map(|t| b.put(t, 64, &rng.vec(t * 64, 1.0)));
    b.get(&xs[1]);
    if !b.start_timing(64) {
        return; // no timestamps on this device: nothing is tagged
    }
    for x in &xs {
        b.rms_norm(x, &w, 1e-6).unwrap();
    }
    let spans = b.finish_timing_tagged().unwrap();
    assert_eq!(spans.len(), 2, "{spans:?}");
    let (a, c) = (spans[0].0, spans[1].0);
    assert_eq!((a.entry, c.entry), ("rms_norm", "rms_norm"));
    let (ga, gc) = (a.grid.unwrap(), c.grid.unwrap());
    assert!(ga.iter().chain(&gc).all(|&d| d > 0), "{ga:?} {gc:?}");
    assert_ne!(ga, gc, "3 rows and 5 rows in one grid");
}

/// The load-latency chain is one cycle through every slot: a walk from word 0 visits each 128-byte
/// slot once and is back at word 0 after exactly `slots` links; and the device walks one (the
/// chase kernel runs; its time is not checked).
#[test]
fn latency_chain_is_one_cycle_through_every_slot() {
    for words in [64, 96, 32 * 1000] {
        let (chain, _) = super::yardsticks::latency_chain(words);
        let slots = words / 32;
        let mut seen = vec![false; slots];
        let mut i = 0usize;
        for _ in 0..slots {
            assert_eq!(i % 32, 0, "{words}: a link off a slot's first word");
            assert!(!seen[i / 32], "{words}: slot {} twice", i / 32);
            seen[i / 32] = true;
            i = chain[i] as usize;
        }
        assert_eq!(i, 0, "{words}: not back at the start after a cycle");
    }
    let b = GpuBackend::new(&super::GpuOptions::from_env()).unwrap();
    for warm in [true, false] {
        let (ns, bytes) = b.load_latency(32 * 4 * 100, 150, warm).unwrap();
        assert!(
            ns.is_finite() && bytes == 32 * 4 * 100,
            "{warm}: {ns} {bytes}"
        );
    }
}
