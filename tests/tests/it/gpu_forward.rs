//! Whole forward passes on the GPU against the CPU reference: every family, every weight type,
//! every attention mask, with and without optional device features, with weights and expert pools
//! split across bindings, and through the KV cache. The CPU reads the same file (quantized weights
//! dequantize identically on both), so the f32 bound (relative L2 ≤ 1e-4) holds for every type.
//! No adapter fails these tests; only EDGEDIFF_SKIP_GPU_TESTS=1 skips them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::gpu::testing::{backends, rel_l2};
use edgediff::backend::gpu::GpuBackend;
use edgediff::backend::{AttnMask, Backend};
use edgediff::format::{DType, EdmFile};
use edgediff::model::{Architecture, ForwardOutput, ForwardRequest, Model, Window};
use edgediff::synth::{self, SynthSpec};
use edgediff_tests::write_wide_q4;

const TOKENS: [u32; 12] = [1, 40, 77, 300, 12, 3, 3, 3, 90, 41, 7, 250];
const MASKS: [AttnMask; 4] = [
    AttnMask::Causal,
    AttnMask::Bidirectional,
    AttnMask::BlockCausal(4),
    AttnMask::CausalThenBidirectional { draft_start: 8 },
];

fn write_synth(dir: &Path, arch: Architecture, dtype: DType) -> PathBuf {
    let m = synth::build(&SynthSpec::tiny(arch)).unwrap();
    let path = dir.join(format!("{arch}-{dtype}.edm"));
    synth::write_edm(&m, &path, dtype, &|_, _| {}).unwrap();
    path
}

fn load<B: Backend>(b: &B, path: &Path) -> Model<B> {
    let file = Arc::new(EdmFile::open(path).unwrap());
    Model::load(b, file, &|_, _| true).unwrap()
}

fn run<B: Backend>(
    b: &B,
    m: &Model<B>,
    kv: &mut B::Kv,
    tokens: &[u32],
    window: Window,
    logits: bool,
) -> ForwardOutput {
    let want = ForwardRequest {
        logits,
        ..Default::default()
    };
    m.forward(b, kv, tokens, window, &want).unwrap()
}

/// The first adapter, outputs poisoned before kernels write them, the wide q4 kernels with 8-bit
/// activation codes (`q8`) or float activations.
fn poisoned_gpu(q8: bool) -> GpuBackend {
    use edgediff::backend::gpu::choice::KernelChoice;
    use edgediff::backend::gpu::GpuOptions;
    GpuBackend::new(&GpuOptions {
        poison: true,
        kernels: KernelChoice {
            wide_q8_act: q8,
            ..KernelChoice::from_env()
        },
        ..GpuOptions::from_env()
    })
    .unwrap()
}

/// Logits and statistics of the GPU pass against the CPU pass.
fn compare(what: &str, gpu: &ForwardOutput, cpu: &ForwardOutput) {
    let (g, c) = (gpu.logits.as_ref().unwrap(), cpu.logits.as_ref().unwrap());
    let err = rel_l2(g, c);
    assert!(err <= 1e-4, "{what}: logits relative L2 {err:e}");
    assert_eq!(gpu.stats.len(), cpu.stats.len(), "{what}");
    for (i, (s, r)) in gpu.stats.iter().zip(&cpu.stats).enumerate() {
        assert_eq!(s.argmax, r.argmax, "{what}: argmax of position {i}");
        let ids = |v: &[(u32, f32)]| v.iter().map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(ids(&s.top), ids(&r.top), "{what}: top ids of position {i}");
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs().max(1e-2);
        // The margin is a difference of two probabilities, each within 1e-4 of p_max: its error
        // scales with p_max, not with the (possibly tiny) difference.
        let margin_close = (s.margin - r.margin).abs() <= 2e-4 * r.p_max.max(1e-2);
        assert!(
            close(s.p_max, r.p_max) && margin_close && close(s.entropy, r.entropy),
            "{what}: position {i}: gpu {s:?} cpu {r:?}"
        );
    }
}

#[test]
fn forward_matches_cpu_for_every_family_weight_type_and_mask() {
    let gpus = backends(None);
    if gpus.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        for dtype in [DType::F32, DType::F16, DType::Q8, DType::Q4] {
            let path = write_synth(dir.path(), arch, dtype);
            let cpu = load(&CpuBackend, &path);
            for (label, g) in &gpus {
                let gm = load(g, &path);
                for mask in MASKS {
                    let window = Window::block(0, TOKENS.len(), mask);
                    let mut ckv = cpu.new_kv(&CpuBackend, 64).unwrap();
                    let want = run(&CpuBackend, &cpu, &mut ckv, &TOKENS, window, true);
                    let mut gkv = gm.new_kv(g, 64).unwrap();
                    let got = run(g, &gm, &mut gkv, &TOKENS, window, true);
                    compare(&format!("{arch} {dtype} {mask:?} on {label}"), &got, &want);
                }
            }
        }
    }
}

#[test]
fn one_forward_pass_is_one_submission() {
    let gpus = backends(None);
    let dir = tempfile::tempdir().unwrap();
    let path = write_synth(dir.path(), Architecture::Llada2Moe, DType::Q4);
    for (label, g) in &gpus {
        let m = load(g, &path);
        let mut kv = m.new_kv(g, 64).unwrap();
        let window = Window::block(0, 8, AttnMask::BlockCausal(4));
        run(g, &m, &mut kv, &TOKENS[..8], window, false);
        let (before, d0) = (g.submissions(), g.dispatches());
        let out = run(g, &m, &mut kv, &TOKENS[..8], window, false);
        assert_eq!(out.stats.len(), 8);
        let (subs, dispatches) = (g.submissions() - before, g.dispatches() - d0);
        // One submission, waited on once; a backend that submits every n dispatches (so the GPU
        // starts early) adds one per n.
        let every = g.submit_every();
        if every == 0 || every > dispatches {
            assert_eq!(subs, 1, "{label}");
        } else {
            assert!(
                subs <= dispatches / every + 1,
                "{label}: {subs} submissions"
            );
            assert!(subs >= dispatches / every, "{label}: {subs} submissions");
        }
    }
}

#[test]
fn cached_blocks_on_the_gpu_match_the_cpu() {
    // Block diffusion's pattern: a prompt block, then a second block attending to the cached first
    // one, then a single-token pass at a later position; positions past the block stay visible
    // (kv_len > end) as in Fast-dLLM's dual cache.
    let gpus = backends(None);
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let path = write_synth(dir.path(), arch, DType::Q8);
        let cpu = load(&CpuBackend, &path);
        for (label, g) in &gpus {
            let gm = load(g, &path);
            let mut ckv = cpu.new_kv(&CpuBackend, 64).unwrap();
            let mut gkv = gm.new_kv(g, 64).unwrap();
            let mask = AttnMask::BlockCausal(4);
            let steps = [
                (0..8, Window::block(0, 8, mask)),
                (8..12, Window::block(8, 4, mask)),
                (
                    4..8,
                    Window {
                        start: 4,
                        kv_len: 12,
                        mask: AttnMask::Bidirectional,
                    },
                ),
                (11..12, Window::block(11, 1, AttnMask::Causal)),
            ];
            for (i, (toks, w)) in steps.into_iter().enumerate() {
                let want = run(&CpuBackend, &cpu, &mut ckv, &TOKENS[toks.clone()], w, true);
                let got = run(g, &gm, &mut gkv, &TOKENS[toks], w, true);
                compare(&format!("{arch} step {i} on {label}"), &got, &want);
            }
        }
    }
}

#[test]
fn zaya_with_a_binding_window_matches_the_cpu_through_the_cache_and_a_rollback() {
    // ZAYA1's per-sequence state on the GPU: the tiny zaya with a sliding window of 2 on layer 1
    // (it binds from position 2 on), f32 and q8; a full pass, then a cached prefix, a garbage pass
    // over positions 6.. (a rejected draft) and the pass resumed at 6, whose conv window reads
    // positions 4 and 5 from the cache's state.
    let gpus = backends(None);
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        sliding_window: 2,
        seed: 3,
        ..SynthSpec::tiny(Architecture::Zaya)
    };
    for dtype in [DType::F32, DType::Q8] {
        let path = dir.path().join(format!("zaya-window-2-{dtype}.edm"));
        synth::write_edm(&synth::build(&spec).unwrap(), &path, dtype, &|_, _| {}).unwrap();
        let cpu = load(&CpuBackend, &path);
        for (label, g) in &gpus {
            let gm = load(g, &path);
            for mask in [AttnMask::Causal, AttnMask::BlockCausal(4)] {
                let mut ckv = cpu.new_kv(&CpuBackend, 64).unwrap();
                let mut gkv = gm.new_kv(g, 64).unwrap();
                let steps: [(&[u32], Window); 4] = [
                    (&TOKENS, Window::block(0, 12, mask)),
                    (&TOKENS[..8], Window::block(0, 8, mask)),
                    (&[5, 6, 7, 8, 9, 10], Window::block(6, 6, mask)),
                    (&TOKENS[6..], Window::block(6, 6, mask)),
                ];
                for (i, (toks, w)) in steps.into_iter().enumerate() {
                    let want = run(&CpuBackend, &cpu, &mut ckv, toks, w, true);
                    let got = run(g, &gm, &mut gkv, toks, w, true);
                    compare(
                        &format!("zaya {dtype} {mask:?} step {i} on {label}"),
                        &got,
                        &want,
                    );
                }
            }
            // The MLP router's choices, the skip expert (id num_experts) among them.
            let want = ForwardRequest {
                routing: true,
                ..Default::default()
            };
            let window = Window::block(0, TOKENS.len(), AttnMask::Causal);
            let mut ckv = cpu.new_kv(&CpuBackend, 64).unwrap();
            let r = cpu.forward(&CpuBackend, &mut ckv, &TOKENS, window, &want);
            let mut gkv = gm.new_kv(g, 64).unwrap();
            let gr = gm.forward(g, &mut gkv, &TOKENS, window, &want);
            let (r, gr) = (r.unwrap().routing, gr.unwrap().routing);
            let skip = cpu.config.moe.num_experts as u32;
            assert!(r.iter().any(|(_, ids, _)| ids.contains(&skip)), "{dtype}");
            assert_eq!(r.len(), gr.len());
            for ((l, ids, w), (gl, gids, gw)) in r.iter().zip(&gr) {
                assert_eq!((l, ids), (gl, gids), "zaya {dtype} routing on {label}");
                assert!(
                    rel_l2(gw, w) <= 1e-4,
                    "zaya {dtype} layer {l} weights on {label}"
                );
            }
        }
    }
}

#[test]
fn weights_and_expert_pools_split_across_bindings_give_the_same_forward() {
    // 64 KiB bindings: the f32 embedding [512, 64] (128 KiB) splits in two, the LM head runs in
    // several passes, and each layer's experts spread over four pool buffers.
    let gpus = backends(Some(64 << 10));
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        let path = write_synth(dir.path(), arch, DType::F32);
        let cpu = load(&CpuBackend, &path);
        for (label, g) in &gpus {
            let gm = load(g, &path);
            let window = Window::block(0, TOKENS.len(), AttnMask::Causal);
            let mut ckv = cpu.new_kv(&CpuBackend, 64).unwrap();
            let want = run(&CpuBackend, &cpu, &mut ckv, &TOKENS, window, true);
            let mut gkv = gm.new_kv(g, 64).unwrap();
            let got = run(g, &gm, &mut gkv, &TOKENS, window, true);
            compare(&format!("{arch} split on {label}"), &got, &want);
        }
    }
}

#[test]
fn routing_read_back_matches_the_cpu() {
    let gpus = backends(None);
    let dir = tempfile::tempdir().unwrap();
    let path = write_synth(dir.path(), Architecture::Olmoe, DType::F16);
    let cpu = load(&CpuBackend, &path);
    let want = ForwardRequest {
        routing: true,
        ..Default::default()
    };
    let window = Window::block(0, TOKENS.len(), AttnMask::Causal);
    let mut ckv = cpu.new_kv(&CpuBackend, 64).unwrap();
    let r = cpu
        .forward(&CpuBackend, &mut ckv, &TOKENS, window, &want)
        .unwrap();
    for (label, g) in &gpus {
        let gm: Model<GpuBackend> = load(g, &path);
        let mut gkv = gm.new_kv(g, 64).unwrap();
        let o = gm.forward(g, &mut gkv, &TOKENS, window, &want).unwrap();
        assert_eq!(o.routing.len(), r.routing.len(), "{label}");
        for ((l, ids, w), (l2, ids2, w2)) in o.routing.iter().zip(&r.routing) {
            assert_eq!((l, ids), (l2, ids2), "{label}");
            assert!(rel_l2(w, w2) <= 1e-5, "{label}: layer {l} weights");
        }
    }
}

/// The fused-norm forward (KernelChoice::fuse_norms_max_t, on by default up to 32 rows) against
/// the same backend with it off: the same statistics, logits within f32 rounding, and two
/// dispatches fewer a layer, MoE or dense (its two add_rms_norm; the first layer's input norm goes
/// too, and the last layer's returns as the final norm). The comparison with the CPU (above) runs
/// the fused forward too.
#[test]
fn fused_norm_forward_saves_two_dispatches_a_layer() {
    use edgediff::backend::gpu::choice::KernelChoice;
    use edgediff::backend::gpu::GpuOptions;
    if edgediff::backend::gpu::testing::skip_requested() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Qwen3-MoE (MoE layers), LLaDA2 (a dense first layer, then MoE), and a Qwen3 of dense
    // layers only (what a dense GGUF model loads as).
    let dense = SynthSpec {
        dense_layers: 2,
        experts: 0,
        top_k: 0,
        ..SynthSpec::tiny(Architecture::Qwen3Moe)
    };
    let specs = [
        ("qwen3_moe", SynthSpec::tiny(Architecture::Qwen3Moe)),
        ("llada2_moe", SynthSpec::tiny(Architecture::Llada2Moe)),
        ("qwen3 dense", dense),
    ];
    for (label, spec) in specs {
        let m = synth::build(&spec).unwrap();
        let path = dir.path().join(format!("{}.edm", label.replace(' ', "-")));
        synth::write_edm(&m, &path, DType::Q4, &|_, _| {}).unwrap();
        let open = |max_t| {
            GpuBackend::new(&GpuOptions {
                kernels: KernelChoice {
                    fuse_norms_max_t: max_t,
                    ..KernelChoice::from_env()
                },
                ..GpuOptions::from_env()
            })
            .unwrap()
        };
        let (on, off) = (open(32), open(0));
        let (mon, moff) = (load(&on, &path), load(&off, &path));
        let layers = mon.config.num_layers as u64;
        // Up to 24 rows: past the 16 the fused forward served before 2026-12-07.
        let tokens: Vec<u32> = TOKENS.iter().chain(&TOKENS).copied().collect();
        for t in [1, 2, 12, 24] {
            let window = Window::block(0, t, AttnMask::Bidirectional);
            let pass = |g: &GpuBackend, m: &Model<GpuBackend>| {
                let mut kv = m.new_kv(g, 64).unwrap();
                let d0 = g.dispatches();
                let out = run(g, m, &mut kv, &tokens[..t], window, true);
                (out, g.dispatches() - d0)
            };
            let (fused, d_on) = pass(&on, &mon);
            let (apart, d_off) = pass(&off, &moff);
            compare(
                &format!("{label} t{t}: fused against unfused"),
                &fused,
                &apart,
            );
            assert_eq!(
                d_off - d_on,
                2 * layers,
                "{label} t{t}: dispatches {d_on} fused, {d_off} unfused"
            );
        }
    }
}

/// Kernels built without naga's runtime checks (the default on Vulkan, KernelChoice::checks_on)
/// compute what the checked ones do, bit for bit: the checks only clamp indices our kernels keep
/// in bounds, and count loop iterations that end anyway. Every weight type and row counts on
/// both kernel families (gemv, wide gemv, tiles; direct and listed experts).
#[test]
fn kernels_without_runtime_checks_equal_the_checked_ones() {
    use edgediff::backend::gpu::choice::{KernelChoice, ShaderChecks};
    use edgediff::backend::gpu::GpuOptions;
    if edgediff::backend::gpu::testing::skip_requested() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = synth::build(&SynthSpec::tiny(Architecture::Llada2Moe)).unwrap();
    let open = |checks| {
        GpuBackend::new(&GpuOptions {
            poison: true,
            kernels: KernelChoice {
                shader_checks: Some(checks),
                ..KernelChoice::from_env()
            },
            ..GpuOptions::from_env()
        })
        .unwrap()
    };
    let (checked, unchecked) = (open(ShaderChecks::All), open(ShaderChecks::None));
    for dtype in [DType::F32, DType::F16, DType::Q8, DType::Q4] {
        let path = dir.path().join(format!("{dtype:?}.edm"));
        synth::write_edm(&m, &path, dtype, &|_, _| {}).unwrap();
        let (mc, mu) = (load(&checked, &path), load(&unchecked, &path));
        for t in [1, 2, 5, 20] {
            let tokens: Vec<u32> = (0..t as u32).map(|i| (i * 37 + 5) % 300).collect();
            let window = Window::block(0, t, AttnMask::Bidirectional);
            let pass = |g: &GpuBackend, m: &Model<GpuBackend>| {
                let mut kv = m.new_kv(g, 64).unwrap();
                run(g, m, &mut kv, &tokens, window, true)
            };
            let (a, b) = (pass(&checked, &mc), pass(&unchecked, &mu));
            let bits = |o: &ForwardOutput| -> Vec<u32> {
                o.logits
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(&a), bits(&b), "{dtype:?} t{t}: logits differ");
        }
    }
}

/// q4 weights with rows of 512 values or more (the wide kernels' 16 chunks) take 8-bit activations
/// in passes of 3 rows or more by default (KernelChoice::wide_q8_act): a 12-token block's logits
/// stay within the codes' rounding of the CPU's, and not within the f32 bound (the codes were
/// used); with float activations (EDGEDIFF_WIDE_Q8ACT=0) the f32 bound holds again.
#[test]
fn q4_blocks_take_8_bit_activations_within_their_rounding() {
    if edgediff::backend::gpu::testing::skip_requested() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_wide_q4(dir.path(), Architecture::Llada2Moe);
    let window = Window::block(0, 12, AttnMask::Bidirectional);
    let cpu = {
        let c = CpuBackend;
        let m = load(&c, &path);
        let mut kv = m.new_kv(&c, 64).unwrap();
        run(&c, &m, &mut kv, &TOKENS, window, true)
    };
    for q8 in [true, false] {
        let g = poisoned_gpu(q8);
        let m = load(&g, &path);
        let mut kv = m.new_kv(&g, 64).unwrap();
        let out = run(&g, &m, &mut kv, &TOKENS, window, true);
        let err = rel_l2(out.logits.as_ref().unwrap(), cpu.logits.as_ref().unwrap());
        if q8 {
            assert!(
                (1e-4..=5e-2).contains(&err),
                "8-bit activations: logits relative L2 {err:e}"
            );
        } else {
            compare("float activations", &out, &cpu);
        }
    }
}

/// Lossless speculative decoding verifies draft tokens with rows that must sum as AR's one-row
/// passes do (`ForwardRequest::rows_as`, decode/speculative.rs). On the q4 model whose blocks take
/// 8-bit activation codes (above), a 12-row causal pass computed as one-row passes gives the
/// logits of 12 one-row passes over the same tokens up to attention's summation order, while the
/// same pass computed as its own 12 rows does not (the codes).
#[test]
fn rows_computed_as_one_row_give_the_one_row_passes_logits() {
    if edgediff::backend::gpu::testing::skip_requested() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_wide_q4(dir.path(), Architecture::Qwen3Moe);
    let g = poisoned_gpu(true);
    let m = load(&g, &path);
    let n = TOKENS.len();
    let one_rows: Vec<f32> = {
        let mut kv = m.new_kv(&g, 64).unwrap();
        (0..n)
            .flat_map(|i| {
                let w = Window::block(i, 1, AttnMask::Causal);
                run(&g, &m, &mut kv, &TOKENS[i..i + 1], w, true)
                    .logits
                    .unwrap()
            })
            .collect()
    };
    let block = |rows_as| {
        let mut kv = m.new_kv(&g, 64).unwrap();
        let want = ForwardRequest {
            logits: true,
            rows_as,
            ..Default::default()
        };
        let w = Window::block(0, n, AttnMask::Causal);
        m.forward(&g, &mut kv, &TOKENS, w, &want).unwrap()
    };
    let as_one = block(Some(1));
    let err = rel_l2(as_one.logits.as_ref().unwrap(), &one_rows);
    assert!(
        err <= 1e-5,
        "computed as one row: logits relative L2 {err:e}"
    );
    let own = block(None);
    let err = rel_l2(own.logits.as_ref().unwrap(), &one_rows);
    assert!(
        err >= 1e-4,
        "computed as 12 rows: logits relative L2 {err:e}"
    );
}
