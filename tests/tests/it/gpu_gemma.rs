//! DiffusionGemma's GPU ops (backend/gpu/ops/gemma.rs) against the CPU reference on fresh seeded
//! random inputs, sizes that are not tile multiples, every weight type, outputs poisoned with NaN
//! (`testing::backends`). Both backends load the same file bytes, so quantized weights dequantize
//! identically and the f32 bound (relative L2 ≤ 1e-4) holds for every type.

use edgediff::arch::Activation;
use edgediff::backend::cpu::{CpuAct, CpuBackend};
use edgediff::backend::gpu::testing::{backends, rel_l2};
use edgediff::backend::gpu::GpuBackend;
use edgediff::backend::{Backend, BackendError, ScaledRouterParams};
use edgediff::format::{dtype, DType, TensorView};

const TOL: f32 = 1e-4;
const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::Q8, DType::Q4];

/// Seeded uniform values in [-scale, scale).
fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut r = edgediff::decode::Rng::new(seed);
    (0..n).map(|_| (r.next_f32() * 2.0 - 1.0) * scale).collect()
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

fn cpu_act(rows: usize, cols: usize, data: &[f32]) -> CpuAct {
    CpuAct::new(rows, cols, data.to_vec())
}

fn gpus() -> Vec<(String, GpuBackend)> {
    let g = backends(None);
    assert!(
        !g.is_empty() || edgediff::backend::gpu::testing::skip_requested(),
        "no GPU configuration to test"
    );
    g
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = rel_l2(got, want);
    assert!(err <= tol, "{what}: relative L2 {err:e} > {tol:e}");
}

#[test]
fn scale_matches_the_cpu() {
    let (rows, cols) = (7, 37);
    let x = random(1, rows * cols, 2.0);
    let mut want = cpu_act(rows, cols, &x);
    CpuBackend.scale(&mut want, 1.7).unwrap();
    for (label, g) in gpus() {
        let mut a = g.upload_act(rows, cols, &x).unwrap();
        g.scale(&mut a, 1.7).unwrap();
        close(&label, &g.read_act(&a).unwrap(), &want.data, TOL);
    }
}

/// The dense GeGLU MLP (and the self-conditioning block's), 1, 5 and 33 tokens, an
/// intermediate width of 45 (f32 and f16: quantized rows need whole groups of 32, below); SiLU
/// through the same entry equals `mlp`.
#[test]
fn gated_mlp_matches_the_cpu_for_both_activations() {
    let (h, inter) = (64, 45);
    let gpus = gpus();
    for (i, &dt) in [DType::F32, DType::F16].iter().enumerate() {
        let gu = random(10 + i as u64, 2 * inter * h, 0.3);
        let dn = random(20 + i as u64, h * inter, 0.3);
        for &t in &[1usize, 5, 33] {
            let x = random(30 + t as u64, t * h, 1.0);
            for act in [Activation::GeluTanh, Activation::Silu] {
                let c = CpuBackend;
                let want = c
                    .gated_mlp(
                        &weight(&c, dt, &[2 * inter, h], &gu),
                        &weight(&c, dt, &[h, inter], &dn),
                        &cpu_act(t, h, &x),
                        act,
                    )
                    .unwrap();
                for (label, g) in &gpus {
                    let got = g
                        .gated_mlp(
                            &weight(g, dt, &[2 * inter, h], &gu),
                            &weight(g, dt, &[h, inter], &dn),
                            &g.upload_act(t, h, &x).unwrap(),
                            act,
                        )
                        .unwrap();
                    close(
                        &format!("{label} {dt:?} t={t} {act:?}"),
                        &g.read_act(&got).unwrap(),
                        &want.data,
                        TOL,
                    );
                }
            }
        }
    }
}

/// Quantized MLPs: an intermediate width of 96 (whole groups), hidden 64.
#[test]
fn gated_mlp_geglu_matches_the_cpu_for_quantized_weights() {
    let (h, inter, t) = (64, 96, 9);
    let gpus = gpus();
    for (i, &dt) in DTYPES.iter().enumerate() {
        let gu = random(40 + i as u64, 2 * inter * h, 0.3);
        let dn = random(50 + i as u64, h * inter, 0.3);
        let x = random(60, t * h, 1.0);
        let c = CpuBackend;
        let want = c
            .gated_mlp(
                &weight(&c, dt, &[2 * inter, h], &gu),
                &weight(&c, dt, &[h, inter], &dn),
                &cpu_act(t, h, &x),
                Activation::GeluTanh,
            )
            .unwrap();
        for (label, g) in &gpus {
            let got = g
                .gated_mlp(
                    &weight(g, dt, &[2 * inter, h], &gu),
                    &weight(g, dt, &[h, inter], &dn),
                    &g.upload_act(t, h, &x).unwrap(),
                    Activation::GeluTanh,
                )
                .unwrap();
            close(
                &format!("{label} {dt:?}"),
                &g.read_act(&got).unwrap(),
                &want.data,
                TOL,
            );
        }
    }
}

/// The scaled-norm router: the same experts, weights within the f32 bound, for 13 experts top-3
/// and 6 experts top-6 (every expert), f32 and q8 router weights.
#[test]
fn route_scaled_matches_the_cpu() {
    let h = 64;
    let gpus = gpus();
    for (n, k, dt) in [(13, 3, DType::F32), (6, 6, DType::Q8), (13, 1, DType::F16)] {
        let t = 11;
        let x = random(70, t * h, 3.0);
        let proj = random(71, n * h, 0.5);
        let scale = random(72, h, 1.0);
        let es = random(73, n, 1.0);
        let p = ScaledRouterParams {
            experts: n,
            top_k: k,
            eps: 1e-6,
        };
        let c = CpuBackend;
        let r = c
            .route_scaled(
                &cpu_act(t, h, &x),
                &weight(&c, dt, &[n, h], &proj),
                &weight(&c, DType::F32, &[h], &scale),
                &weight(&c, DType::F32, &[n], &es),
                p,
            )
            .unwrap();
        let (ids, w) = c.routing_to_host(&r).unwrap();
        for (label, g) in &gpus {
            let r = g
                .route_scaled(
                    &g.upload_act(t, h, &x).unwrap(),
                    &weight(g, dt, &[n, h], &proj),
                    &weight(g, DType::F32, &[h], &scale),
                    &weight(g, DType::F32, &[n], &es),
                    p,
                )
                .unwrap();
            let (gids, gw) = g.routing_to_host(&r).unwrap();
            assert_eq!(gids, ids, "{label} {n} top-{k}: experts");
            close(&format!("{label} {n} top-{k}: weights"), &gw, &w, TOL);
        }
        // A misshapen expert scale is a typed error on both.
        let bad = |b: &dyn Fn() -> Result<(), BackendError>| {
            assert!(matches!(b(), Err(BackendError::Shape { .. })))
        };
        bad(&|| {
            c.route_scaled(
                &cpu_act(t, h, &x),
                &weight(&c, dt, &[n, h], &proj),
                &weight(&c, DType::F32, &[h], &scale),
                &weight(&c, DType::F32, &[h], &scale),
                p,
            )
            .map(|_| ())
        });
        for (_, g) in &gpus {
            bad(&|| {
                g.route_scaled(
                    &g.upload_act(t, h, &x).unwrap(),
                    &weight(g, dt, &[n, h], &proj),
                    &weight(g, DType::F32, &[h], &scale),
                    &weight(g, DType::F32, &[h], &scale),
                    p,
                )
                .map(|_| ())
            });
        }
    }
}

/// Capped logits and their statistics: logits reaching well past the cap (so tanh saturates),
/// a vocabulary of 300, rows 1..6 of 7.
#[test]
fn softcapped_logits_and_stats_match_the_cpu() {
    let (h, v, t) = (64, 300, 7);
    let gpus = gpus();
    for &dt in &DTYPES {
        let head = random(80, v * h, 1.0);
        let x = random(81, t * h, 1.0);
        let c = CpuBackend;
        let ch = weight(&c, dt, &[v, h], &head);
        let cx = cpu_act(t, h, &x);
        for cap in [3.0f32, 30.0] {
            let want = c.logits_softcap(&cx, &ch, 1..6, cap).unwrap();
            assert!(want.iter().any(|l| l.abs() > 0.9 * cap) || cap > 10.0);
            let want_stats = c.lm_head_stats_softcap(&cx, &ch, 1..6, cap).unwrap();
            for (label, g) in &gpus {
                let gh = weight(g, dt, &[v, h], &head);
                let gx = g.upload_act(t, h, &x).unwrap();
                let got = g.logits_softcap(&gx, &gh, 1..6, cap).unwrap();
                close(&format!("{label} {dt:?} cap {cap}"), &got, &want, TOL);
                let stats = g.lm_head_stats_softcap(&gx, &gh, 1..6, cap).unwrap();
                assert_eq!(stats.len(), want_stats.len());
                for (s, w) in stats.iter().zip(&want_stats) {
                    assert_eq!(s.argmax, w.argmax, "{label} {dt:?} cap {cap}");
                    assert!((s.p_max - w.p_max).abs() < 1e-4, "{label}: p_max");
                    assert!((s.entropy - w.entropy).abs() < 1e-3, "{label}: entropy");
                }
                assert!(matches!(
                    g.logits_softcap(&gx, &gh, 1..6, 0.0),
                    Err(BackendError::Shape { .. })
                ));
            }
        }
    }
}

/// Soft embeddings of the self-conditioning block: every weight type, a vocabulary of 300 (not a
/// multiple of the kernel's 64-term steps), 5 rows in one tile and 21 rows × 96 columns over
/// partial row and column tiles; and with storage bindings capped at 16 KiB, so the table splits
/// into row chunks and the logits go up in several row chunks.
#[test]
fn soft_embed_matches_the_cpu_whole_and_split() {
    for (h, v, t) in [(64, 300, 5), (96, 300, 21)] {
        soft_embed_case(h, v, t);
    }
}

fn soft_embed_case(h: usize, v: usize, t: usize) {
    let logits = random(90 + t as u64, t * v, 4.0);
    for max_binding in [None, Some(16 << 10)] {
        let gpus = backends(max_binding);
        assert!(!gpus.is_empty() || edgediff::backend::gpu::testing::skip_requested());
        for (i, &dt) in DTYPES.iter().enumerate() {
            let table = random(91 + i as u64, v * h, 1.0);
            let c = CpuBackend;
            let want = c
                .soft_embed(&logits, &weight(&c, dt, &[v, h], &table), 7.5)
                .unwrap();
            for (label, g) in &gpus {
                let got = g
                    .soft_embed(&logits, &weight(g, dt, &[v, h], &table), 7.5)
                    .unwrap();
                close(
                    &format!("{label} {dt:?} binding {max_binding:?} {t} x {h}"),
                    &g.read_act(&got).unwrap(),
                    &want.data,
                    TOL,
                );
                assert!(matches!(
                    g.soft_embed(&logits[1..], &weight(g, dt, &[v, h], &table), 1.0),
                    Err(BackendError::Shape { .. })
                ));
            }
        }
    }
}

/// The canvas sampler's head (`Backend::canvas_head`): every weight type, with and without the
/// softcap; vocabularies below one workgroup (37: lanes without a token, empty spans), of 300
/// and of 1000 (spans of 16); 5 and 21 rows; and with bindings capped at 16 KiB, so the logits
/// run in several row chunks. Entropies within 1e-4 (relative), the argmax and the sampled token
/// equal the CPU's except where the CPU's own logits put the choice within rounding (two logits
/// within 1e-4, or the uniform within 1e-4 of a cumulative boundary), the soft embeddings within
/// the f32 bound; draws and embeddings start poisoned.
#[test]
fn canvas_head_matches_the_cpu_whole_and_split() {
    use edgediff::backend::draw::CanvasHeadParams;
    for (h, v, t) in [(64, 37, 5), (64, 300, 5), (96, 300, 21), (64, 1000, 7)] {
        let x = random(70 + v as u64, t * h, 1.0);
        let mut rng = edgediff::decode::Rng::new(71 + t as u64);
        let uniforms: Vec<f32> = (0..t).map(|_| rng.next_f32()).collect();
        for max_binding in [None, Some(16 << 10)] {
            let gpus = backends(max_binding);
            assert!(!gpus.is_empty() || edgediff::backend::gpu::testing::skip_requested());
            for (i, &dt) in DTYPES.iter().enumerate() {
                let table = random(72 + i as u64, v * h, 1.0);
                let cap = if i % 2 == 0 { Some(3.0) } else { None };
                let p = CanvasHeadParams {
                    cap,
                    temperature: 0.6,
                    embed_scale: 2.5,
                    next_input: true,
                };
                let c = CpuBackend;
                let ct = weight(&c, dt, &[v, h], &table);
                let xc = cpu_act(t, h, &x);
                let (want, want_soft) = c.canvas_head(&xc, &ct, p, &uniforms).unwrap();
                let mut logits = match cap {
                    Some(cap) => c.logits_softcap(&xc, &ct, 0..t, cap).unwrap(),
                    None => c.logits(&xc, &ct, 0..t).unwrap(),
                };
                logits.iter_mut().for_each(|l| *l /= p.temperature);
                for (label, g) in &gpus {
                    let what =
                        format!("{label} {dt:?} cap {cap:?} binding {max_binding:?} {t} x {v}");
                    let gt = weight(g, dt, &[v, h], &table);
                    let xg = g.upload_act(t, h, &x).unwrap();
                    let (got, soft) = g.canvas_head(&xg, &gt, p, &uniforms).unwrap();
                    assert_eq!(got.len(), t, "{what}");
                    for (r, (d, w)) in got.iter().zip(&want).enumerate() {
                        let row = &logits[r * v..(r + 1) * v];
                        let err = (d.entropy - w.entropy).abs() / w.entropy.abs().max(1.0);
                        assert!(
                            err <= 1e-4,
                            "{what} row {r}: entropy {} vs {}",
                            d.entropy,
                            w.entropy
                        );
                        if d.argmax != w.argmax {
                            let gap = (row[d.argmax as usize] - row[w.argmax as usize]).abs();
                            assert!(
                                gap <= 1e-4,
                                "{what} row {r}: argmax {} vs {}",
                                d.argmax,
                                w.argmax
                            );
                        }
                        if d.sampled != w.sampled {
                            let at = d.sampled.min(w.sampled) as usize;
                            let cdf = cumulative(row, at);
                            assert!(
                                (cdf - uniforms[r]).abs() <= 1e-4,
                                "{what} row {r}: sampled {} vs {} (u {}, cdf {cdf})",
                                d.sampled,
                                w.sampled,
                                uniforms[r]
                            );
                        }
                    }
                    let want_soft = want_soft.as_ref().unwrap();
                    close(
                        &what,
                        &g.read_act(&soft.unwrap()).unwrap(),
                        &want_soft.data,
                        TOL,
                    );
                    // Without the next step's input: the same draws, no embeddings.
                    let last = CanvasHeadParams {
                        next_input: false,
                        ..p
                    };
                    let (again, none) = g.canvas_head(&xg, &gt, last, &uniforms).unwrap();
                    assert_eq!(again, got, "{what}");
                    assert!(none.is_none(), "{what}");
                    let short = g.canvas_head(&xg, &gt, p, &uniforms[1..]);
                    assert!(matches!(short, Err(BackendError::Shape { .. })), "{what}");
                    let cold = CanvasHeadParams {
                        temperature: 0.0,
                        ..p
                    };
                    let cold = g.canvas_head(&xg, &gt, cold, &uniforms);
                    assert!(matches!(cold, Err(BackendError::Shape { .. })), "{what}");
                }
            }
        }
    }
}

/// The softmax probability mass of tokens `0..=at` of logits `row`.
fn cumulative(row: &[f32], at: usize) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = row.iter().map(|l| ((l - max) as f64).exp()).collect();
    (e[..=at].iter().sum::<f64>() / e.iter().sum::<f64>()) as f32
}

/// The layer geometry of a synthetic diffusion_gemma config: `tiny`'s (heads of 12 and global
/// heads of 24, window 4), one with heads of 40 / 80, one with rows of 30, and the 26B-A4B preset's first six layers
/// (heads of 256 with full RoPE, a global layer of 512 with K = V and 64 of 256 pairs rotated).
fn gemma_configs() -> Vec<edgediff::model::ModelConfig> {
    use edgediff::model::Architecture;
    use edgediff::synth::{Specials, SynthSpec};
    let special = Specials {
        pad: 0,
        bos: 2,
        eos: 1,
        mask: 3,
    };
    let tiny = SynthSpec::tiny(Architecture::DiffusionGemma);
    let wide = SynthSpec {
        head_dim: 40,
        heads: 6,
        kv_heads: 3,
        sliding_window: 5,
        ..tiny.clone()
    };
    // Rows of 30 floats (3 KV heads of 10): with an odd capacity a layer's bytes are not whole
    // 16-byte words, and the cache buffer is padded (the GPU machine's seven-layer reference).
    let odd = SynthSpec {
        head_dim: 10,
        heads: 6,
        kv_heads: 3,
        ..tiny.clone()
    };
    let big = SynthSpec {
        layers: 6,
        ..SynthSpec::diffusion_gemma_26b_a4b()
    };
    [tiny, wide, odd, big]
        .iter()
        .map(|s| edgediff::import::parse_config(&s.hf_config(&special)).unwrap())
        .collect()
}

/// prepare_heads and attention_heads of every layer: a causal prefix of 7 (the encoder, its
/// window ending at the query), then a bidirectional block of 5 after it (the canvas decoder:
/// the window ends at the block's start) reading the prefix from the cache.
#[test]
fn attention_heads_match_the_cpu_for_every_layer_geometry() {
    use edgediff::backend::{AttnMask, HeadsParams};
    let gpus = gpus();
    for (ci, c) in gemma_configs().iter().enumerate() {
        let cpu = CpuBackend;
        // 41 positions: an odd capacity (the passes below need 41). The last pass, one row
        // against 41 keys, splits its keys over workgroups (16 a split: 3 splits).
        let mut ckv = cpu.new_kv(c, 41).unwrap();
        let mut gkvs: Vec<_> = gpus.iter().map(|(_, g)| g.new_kv(c, 41).unwrap()).collect();
        for l in 0..c.num_layers {
            let geom = c.attn_of(l);
            let hd = geom.head_dim;
            let qn = random(100 + l as u64, hd, 1.0);
            let kn = random(200 + l as u64, hd, 1.0);
            for (pass, (start, t, mask, at_start)) in [
                (0usize, 7usize, AttnMask::Causal, false),
                (7, 5, AttnMask::Bidirectional, true),
                (12, 28, AttnMask::Bidirectional, false),
                (40, 1, AttnMask::Causal, false),
            ]
            .into_iter()
            .enumerate()
            {
                let p = HeadsParams {
                    layer: l,
                    geom,
                    eps: 1e-6,
                    v_norm: true,
                    scale: 1.0,
                    start,
                    kv_len: start + t,
                    mask,
                    window_at_start: at_start,
                };
                let proj = random(300 + (l * 2 + pass) as u64, t * geom.proj_dim(), 2.0);
                let cq = weight(&cpu, DType::F32, &[hd], &qn);
                let ck = weight(&cpu, DType::F32, &[hd], &kn);
                let heads = cpu
                    .prepare_heads(&cpu_act(t, geom.proj_dim(), &proj), &cq, &ck, p)
                    .unwrap();
                let want = cpu.attention_heads(&heads, &mut ckv, p).unwrap();
                for ((label, g), gkv) in gpus.iter().zip(&mut gkvs) {
                    let what = format!("{label} config {ci} layer {l} pass {pass} (hd {hd})");
                    let gh = g
                        .prepare_heads(
                            &g.upload_act(t, geom.proj_dim(), &proj).unwrap(),
                            &weight(g, DType::F32, &[hd], &qn),
                            &weight(g, DType::F32, &[hd], &kn),
                            p,
                        )
                        .unwrap();
                    close(
                        &format!("{what}: heads"),
                        &g.read_act(&gh).unwrap(),
                        &heads.data,
                        TOL,
                    );
                    let got = g.attention_heads(&gh, gkv, p).unwrap();
                    close(
                        &format!("{what}: attention"),
                        &g.read_act(&got).unwrap(),
                        &want.data,
                        TOL,
                    );
                }
            }
        }
        // A layer index past the cache, and a block mask, are typed errors.
        for ((_, g), gkv) in gpus.iter().zip(&mut gkvs) {
            let geom = c.attn_of(0);
            let p = HeadsParams {
                layer: c.num_layers,
                geom,
                eps: 1e-6,
                v_norm: true,
                scale: 1.0,
                start: 0,
                kv_len: 1,
                mask: AttnMask::Causal,
                window_at_start: false,
            };
            let qkv = g
                .upload_act(
                    1,
                    geom.q_dim() + 2 * geom.kv_dim(),
                    &vec![0.0; geom.q_dim() + 2 * geom.kv_dim()],
                )
                .unwrap();
            assert!(matches!(
                g.attention_heads(&qkv, gkv, p),
                Err(BackendError::Shape { .. })
            ));
            let p = HeadsParams {
                layer: 0,
                mask: AttnMask::BlockCausal(4),
                ..p
            };
            assert!(matches!(
                g.attention_heads(&qkv, gkv, p),
                Err(BackendError::Unsupported { .. })
            ));
        }
    }
}

fn write_gemma(dir: &std::path::Path, dtype: DType, hidden: usize) -> std::path::PathBuf {
    use edgediff::model::Architecture;
    let spec = edgediff::synth::SynthSpec {
        hidden,
        block_size: 6,
        seed: 4,
        ..edgediff::synth::SynthSpec::tiny(Architecture::DiffusionGemma)
    };
    let path = dir.join(format!("dg-{dtype:?}-{hidden}.edm"));
    let m = edgediff::synth::build(&spec).unwrap();
    edgediff::synth::write_edm(&m, &path, dtype, &|_, _| {}).unwrap();
    path
}

fn canvas_model<B: Backend>(
    b: &B,
    path: &std::path::Path,
) -> edgediff::model::canvas::CanvasModel<B> {
    let file = std::sync::Arc::new(edgediff::format::EdmFile::open(path).unwrap());
    edgediff::model::canvas::CanvasModel::load(b, file).unwrap()
}

/// Encoder logits of a 9-token prefix, the canvas decoder's logits of a 6-token canvas after it
/// without self-conditioning, then with the first step's logits as self-conditioning input (the
/// same host values on both), and the routing of every layer; f32 (hidden 40) and every weight
/// type at hidden 64 (quantized rows need whole groups). Both backends load the same bytes.
#[test]
fn the_canvas_model_on_the_gpu_matches_the_cpu() {
    use edgediff::model::ForwardRequest;
    let tmp = tempfile::tempdir().unwrap();
    let gpus = gpus();
    let want = ForwardRequest {
        logits: true,
        routing: true,
        ..Default::default()
    };
    let prefix = [2u32, 40, 77, 300, 12, 3, 90, 41, 7];
    let canvas = [5u32, 6, 511, 8, 9, 10];
    for (dtype, hidden) in [
        (DType::F32, 40),
        (DType::F32, 64),
        (DType::F16, 64),
        (DType::Q8, 64),
        (DType::Q4, 64),
    ] {
        let path = write_gemma(tmp.path(), dtype, hidden);
        let run = |out: edgediff::model::ForwardOutput| {
            let routing: Vec<Vec<u32>> =
                out.routing.iter().map(|(_, ids, _)| ids.clone()).collect();
            (out.logits.unwrap(), routing)
        };
        let cpu = CpuBackend;
        let m = canvas_model(&cpu, &path);
        let mut kv = m.new_kv(&cpu, 32).unwrap();
        let (enc, enc_r) = run(m.encode(&cpu, &mut kv, &prefix, 0, &want).unwrap());
        let (dec, dec_r) = run(m.denoise(&cpu, &mut kv, &canvas, 9, None, &want).unwrap());
        let (sc, sc_r) = run(m
            .denoise(&cpu, &mut kv, &canvas, 9, Some(&dec), &want)
            .unwrap());
        for (label, g) in &gpus {
            let gm = canvas_model(g, &path);
            let mut gkv = gm.new_kv(g, 32).unwrap();
            let what = format!("{label} {dtype:?} hidden {hidden}");
            let (genc, genc_r) = run(gm.encode(g, &mut gkv, &prefix, 0, &want).unwrap());
            close(&format!("{what}: encoder"), &genc, &enc, TOL);
            assert_eq!(genc_r, enc_r, "{what}: encoder routing");
            let (gdec, gdec_r) = run(gm.denoise(g, &mut gkv, &canvas, 9, None, &want).unwrap());
            close(&format!("{what}: canvas"), &gdec, &dec, TOL);
            assert_eq!(gdec_r, dec_r, "{what}: canvas routing");
            let (gsc, gsc_r) = run(gm
                .denoise(g, &mut gkv, &canvas, 9, Some(&dec), &want)
                .unwrap());
            close(&format!("{what}: self-conditioned canvas"), &gsc, &sc, TOL);
            assert_eq!(gsc_r, sc_r, "{what}: self-conditioned routing");
        }
    }
}

/// The routed GeGLU experts alone at 3 tokens (the GEMV expert kernels) and 70 (the tiled ones),
/// every weight type: the activation override reaches both.
#[test]
fn geglu_experts_match_the_cpu_on_both_expert_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let gpus = gpus();
    for &dtype in &DTYPES {
        let path = write_gemma(tmp.path(), dtype, 64);
        let file = std::sync::Arc::new(edgediff::format::EdmFile::open(&path).unwrap());
        let c = file.header.metadata.config.clone();
        let (h, n, k) = (c.hidden_size, c.moe.num_experts, c.moe.top_k);
        let p = ScaledRouterParams {
            experts: n,
            top_k: k,
            eps: 1e-6,
        };
        let proj = random(500, n * h, 1.0);
        let ones = vec![1.0f32; h];
        let es = random(501, n, 1.0);
        for t in [3usize, 70] {
            let x = random(502 + t as u64, t * h, 1.0);
            let cpu = CpuBackend;
            let experts = cpu.load_experts(&file, 0, &|_| true).unwrap();
            let xs = cpu_act(t, h, &x);
            let r = cpu
                .route_scaled(
                    &xs,
                    &weight(&cpu, DType::F32, &[n, h], &proj),
                    &weight(&cpu, DType::F32, &[h], &ones),
                    &weight(&cpu, DType::F32, &[n], &es),
                    p,
                )
                .unwrap();
            let want = cpu
                .moe_act(&xs, &r, &experts, Activation::GeluTanh)
                .unwrap();
            let silu = cpu.moe_act(&xs, &r, &experts, Activation::Silu).unwrap();
            assert!(
                rel_l2(&silu.data, &want.data) > 1e-2,
                "the activations must differ"
            );
            for (label, g) in &gpus {
                let ge = g.load_experts(&file, 0, &|_| true).unwrap();
                let gx = g.upload_act(t, h, &x).unwrap();
                let gr = g
                    .route_scaled(
                        &gx,
                        &weight(g, DType::F32, &[n, h], &proj),
                        &weight(g, DType::F32, &[h], &ones),
                        &weight(g, DType::F32, &[n], &es),
                        p,
                    )
                    .unwrap();
                let got = g.moe_act(&gx, &gr, &ge, Activation::GeluTanh).unwrap();
                close(
                    &format!("{label} {dtype:?} t={t}: GeGLU experts"),
                    &g.read_act(&got).unwrap(),
                    &want.data,
                    TOL,
                );
                let got = g.moe_act(&gx, &gr, &ge, Activation::Silu).unwrap();
                close(
                    &format!("{label} {dtype:?} t={t}: SwiGLU experts"),
                    &g.read_act(&got).unwrap(),
                    &silu.data,
                    TOL,
                );
            }
        }
    }
}

/// The canvas decoder through the engine on the GPU commits the CPU's tokens for a seeded run
/// (the same draws; every step's logits agree to the f32 bound, far from any sampling boundary
/// on this model and seed).
#[test]
fn the_canvas_decoder_on_the_gpu_commits_the_cpu_tokens() {
    use edgediff::decode::DecoderKind;
    use edgediff::engine::{Engine, Prompt};
    let tmp = tempfile::tempdir().unwrap();
    let path = write_gemma(tmp.path(), DType::F32, 40);
    let open = || std::sync::Arc::new(edgediff::format::EdmFile::open(&path).unwrap());
    let request = |e_default: edgediff::decode::DecodeParams| {
        let mut p = e_default;
        let DecoderKind::Canvas(o) = &mut p.decoder else {
            panic!("not the canvas decoder")
        };
        o.steps = 5;
        p.max_new_tokens = 14;
        p.sampling.seed = 21;
        p.ignore_eos = true;
        p
    };
    let cpu = Engine::new(CpuBackend, open()).unwrap();
    let mut r = cpu.request(Prompt::Tokens(vec![2, 40, 77, 300]));
    r.decoding = request(cpu.default_decoding());
    let want = cpu.generate(&r, &mut |_| {}).unwrap();
    assert_eq!(want.tokens.len(), 14);
    for (label, g) in gpus() {
        let e = Engine::new(g, open()).unwrap();
        let got = e.generate(&r, &mut |_| {}).unwrap();
        assert_eq!(got.tokens, want.tokens, "{label}");
        assert_eq!(
            got.stats.forward_passes, want.stats.forward_passes,
            "{label}"
        );
    }
}
