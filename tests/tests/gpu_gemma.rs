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

/// Soft embeddings of the self-conditioning block: every weight type, a vocabulary of 300, 5
/// rows; and with storage bindings capped at 16 KiB, so the table splits into row chunks and the
/// logits go up in several row chunks.
#[test]
fn soft_embed_matches_the_cpu_whole_and_split() {
    let (h, v, t) = (64, 300, 5);
    let logits = random(90, t * v, 4.0);
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
                    &format!("{label} {dt:?} binding {max_binding:?}"),
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
