//! Exact expert paging for DiffusionGemma's canvas model (issue 18): its routed experts paged
//! through the same bounded pool and pager as the masked-diffusion models (experts/paging.rs,
//! backend/gpu/experts.rs) give the encoder and canvas passes bit-identical logits and the canvas
//! decoder exactly the tokens of the fully resident model, on the CPU and on every GPU
//! configuration (lavapipe here); a pool that cannot hold one token's top-k is a typed error.
//! No adapter fails these tests; only EDGEDIFF_SKIP_GPU_TESTS=1 skips the GPU part.

use std::path::Path;
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::gpu::testing::backends;
use edgediff::backend::Backend;
use edgediff::decode::DecoderKind;
use edgediff::engine::{Engine, EngineConfig, EngineError, Prompt};
use edgediff::experts::paging::PagedLoad;
use edgediff::experts::{Eviction, ExpertMemory, ExpertsError, PagerStats};
use edgediff::format::{DType, EdmFile};
use edgediff::model::canvas::CanvasModel;
use edgediff::model::{Architecture, ForwardRequest};
use edgediff::synth::{self, SynthSpec};

/// 11 experts top-3 per layer (33 in all: a 25 % pool is 9 slots, 12.5 % is 5), a canvas of 7,
/// the tiny shape's three layers (two sliding, one global).
fn write(dir: &Path, dtype: DType, hidden: usize) -> Arc<EdmFile> {
    let spec = SynthSpec {
        experts: 11,
        top_k: 3,
        hidden,
        block_size: 7,
        seed: 5,
        ..SynthSpec::tiny(Architecture::DiffusionGemma)
    };
    let path = dir.join(format!("dg-{dtype:?}-{hidden}.edm"));
    synth::write_edm(&synth::build(&spec).unwrap(), &path, dtype, &|_, _| {}).unwrap();
    Arc::new(EdmFile::open(path).unwrap())
}

/// The passes of a canvas decode: the prompt encoded, a canvas denoised without and then with
/// self-conditioning, the committed canvas encoded, the next canvas denoised twice (its routing
/// changes with the input, so a small pool evicts and pages in again). Every pass's logits.
fn passes<B: Backend>(b: &B, m: &CanvasModel<B>) -> Vec<Vec<f32>> {
    let want = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    let logits = |o: edgediff::model::ForwardOutput| o.logits.unwrap();
    let mut kv = m.new_kv(b, 40).unwrap();
    let prompt = [2u32, 40, 77, 300, 12, 3, 90, 41, 7];
    let first = [5u32, 6, 511, 8, 9, 10, 200];
    let second = [13u32, 400, 17, 17, 99, 1, 256];
    let mut out = vec![logits(m.encode(b, &mut kv, &prompt, 0, &want).unwrap())];
    let step = logits(m.denoise(b, &mut kv, &first, 9, None, &want).unwrap());
    out.push(logits(
        m.denoise(b, &mut kv, &first, 9, Some(&step), &want)
            .unwrap(),
    ));
    out.push(step);
    out.push(logits(m.encode(b, &mut kv, &first, 9, &want).unwrap()));
    let step = logits(m.denoise(b, &mut kv, &second, 16, None, &want).unwrap());
    out.push(logits(
        m.denoise(b, &mut kv, &second, 16, Some(&step), &want)
            .unwrap(),
    ));
    out.push(step);
    out
}

/// The canvas model with its experts paged through a pool of `slots`.
fn paged<B: PagedLoad>(
    b: &B,
    file: &Arc<EdmFile>,
    slots: usize,
    policy: Eviction,
    prefetch: bool,
    readers: usize,
) -> (CanvasModel<B>, edgediff::experts::ExpertPaging) {
    let (paging, mut experts) = b
        .expert_paging(file, slots, policy, prefetch, readers)
        .unwrap();
    let m = CanvasModel::load_with_experts(b, file.clone(), &mut *experts).unwrap();
    (m, paging)
}

fn check_stats(what: &str, s: &PagerStats, slots: usize) {
    assert_eq!(s.slots, slots, "{what}: {s:?}");
    assert!(s.misses > 0 && s.occupied <= slots, "{what}: {s:?}");
}

#[test]
fn paged_canvas_passes_are_bit_identical_to_resident_on_cpu_and_gpu() {
    let dir = tempfile::tempdir().unwrap();
    for (dtype, hidden) in [(DType::F32, 40), (DType::Q4, 64)] {
        let file = write(dir.path(), dtype, hidden);
        let c = file.header.metadata.config.clone();
        let total = c.num_layers * c.moe.num_experts;
        let cpu = CpuBackend;
        let resident = passes(&cpu, &CanvasModel::load(&cpu, file.clone()).unwrap());
        // The smallest pool (one token's top-k), 12.5 % and 25 % of the 33 experts, all of them.
        for slots in [c.moe.top_k, 5, 9, total] {
            for policy in [Eviction::Lru, Eviction::LeastStale] {
                let what = format!("cpu {dtype:?}: {slots} slots, {policy:?}");
                let (m, paging) = paged(&cpu, &file, slots, policy, false, 0);
                assert_eq!(passes(&cpu, &m), resident, "{what}");
                let s = paging.stats();
                check_stats(&what, &s, slots);
                if slots == total {
                    assert_eq!(
                        s.evictions, 0,
                        "{what}: a pool of every expert never evicts"
                    );
                } else {
                    assert!(s.evictions > 0, "{what}: {s:?}");
                }
            }
        }
        for (label, g) in backends(None) {
            let resident = passes(&g, &CanvasModel::load(&g, file.clone()).unwrap());
            // Synchronous passes only (prefetch off), then the optimistic pass with the previous
            // pass's routing and read-ahead threads (a miss re-runs the pass).
            for (slots, prefetch, readers) in [
                (c.moe.top_k, false, 0),
                (5, true, 2),
                (9, false, 0),
                (9, true, 2),
                (total, true, 0),
            ] {
                let what = format!("{label} {dtype:?}: {slots} slots, prefetch {prefetch}");
                let (m, paging) = paged(&g, &file, slots, Eviction::Lru, prefetch, readers);
                assert_eq!(passes(&g, &m), resident, "{what}");
                let s = paging.stats();
                check_stats(&what, &s, slots);
                assert!(paging.pool_bytes(&file) > 0, "{what}");
                if slots == total && prefetch {
                    // The optimistic pass ran (its routing read back with the capped logits'
                    // statistics); one meeting an expert outside the previous pass's routing
                    // was re-run, to the same logits.
                    assert!(s.repasses > 0, "{what}: {s:?}");
                }
            }
        }
    }
}

/// A seeded canvas generation of 17 tokens (three canvases of 7), 4 denoising steps per canvas.
fn generate<B: PagedLoad>(
    b: B,
    file: &Arc<EdmFile>,
    memory: Option<ExpertMemory>,
) -> (Vec<u32>, usize, Option<PagerStats>) {
    let config = EngineConfig {
        expert_memory: memory,
        ..Default::default()
    };
    let e = Engine::open(b, file.clone(), &config).unwrap();
    assert!(e.is_canvas_model());
    let mut r = e.request(Prompt::Tokens(vec![2, 40, 77, 300, 12]));
    r.decoding = e.default_decoding();
    let DecoderKind::Canvas(o) = &mut r.decoding.decoder else {
        panic!("not the canvas decoder: {:?}", r.decoding.decoder)
    };
    o.steps = 4;
    r.decoding.max_new_tokens = 17;
    r.decoding.sampling.seed = 9;
    r.decoding.ignore_eos = true;
    let out = e.generate(&r, &mut |_| {}).unwrap();
    (out.tokens, out.stats.forward_passes, e.expert_stats())
}

#[test]
fn canvas_generation_with_a_quarter_and_an_eighth_pool_gives_the_resident_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), DType::Q4, 64);
    let pools = [(0.25, 9), (0.125, 5)];
    let (all, passes, none) = generate(CpuBackend, &file, None);
    assert!(none.is_none());
    assert_eq!(all.len(), 17);
    for (share, slots) in pools {
        let (tokens, p, stats) = generate(CpuBackend, &file, Some(ExpertMemory::Fraction(share)));
        let what = format!("cpu, {share} of the experts");
        assert_eq!(tokens, all, "{what}");
        assert_eq!(p, passes, "{what}");
        check_stats(&what, &stats.unwrap(), slots);
    }
    for (label, _) in backends(None) {
        let gpu = || {
            backends(None)
                .into_iter()
                .find(|(n, _)| *n == label)
                .unwrap()
                .1
        };
        let (all, passes, _) = generate(gpu(), &file, None);
        for (share, slots) in pools {
            let (tokens, p, stats) = generate(gpu(), &file, Some(ExpertMemory::Fraction(share)));
            let what = format!("{label}, {share} of the experts");
            assert_eq!(tokens, all, "{what}");
            assert_eq!(p, passes, "{what}");
            check_stats(&what, &stats.unwrap(), slots);
        }
    }
}

#[test]
fn an_expert_memory_below_one_tokens_top_k_is_a_typed_error_for_a_canvas_model() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), DType::F32, 40);
    let open = |b: &dyn Fn(ExpertMemory) -> Result<(), EngineError>| {
        // 1 byte buys no slot; 5 % of 33 experts is 2 slots, short of top-3.
        for (memory, slots) in [
            (ExpertMemory::Bytes(1), 0),
            (ExpertMemory::Fraction(0.05), 2),
        ] {
            match b(memory) {
                Err(EngineError::Experts(ExpertsError::PoolTooSmall {
                    slots: s, top_k, ..
                })) => assert_eq!((s, top_k), (slots, 3), "{memory:?}"),
                Err(e) => panic!("{memory:?}: {e}"),
                Ok(()) => panic!("{memory:?}: opened"),
            }
        }
    };
    let config = |memory| EngineConfig {
        expert_memory: Some(memory),
        ..Default::default()
    };
    open(&|m| Engine::open(CpuBackend, file.clone(), &config(m)).map(|_| ()));
    for (label, _) in backends(None) {
        open(&|m| {
            let (_, g) = backends(None)
                .into_iter()
                .find(|(n, _)| *n == label)
                .unwrap();
            Engine::open(g, file.clone(), &config(m)).map(|_| ())
        });
    }
    assert!(matches!(
        "a quarter".parse::<ExpertMemory>(),
        Err(ExpertsError::BadExpertMemory(_))
    ));
}
