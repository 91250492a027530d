//! Exact lazy paging on the GPU: a bounded expert pool managed by the shared pager gives forward
//! passes bit-identical to having every expert resident on the GPU, for every pool size down to one
//! token's top-k, every eviction policy, with and without the optimistic (prefetching) pass, and
//! the pager's counters add up. No adapter fails these tests; only EDGEDIFF_SKIP_GPU_TESTS=1 skips.

use std::path::Path;
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::gpu::testing::backends;
use edgediff::backend::gpu::GpuBackend;
use edgediff::backend::AttnMask;
use edgediff::engine::{Engine, EngineConfig, EngineError, Prompt};
use edgediff::experts::{Eviction, ExpertMemory, ExpertsError};
use edgediff::format::{DType, EdmFile};
use edgediff::model::{Architecture, ForwardRequest, Model, Window};
use edgediff::synth::{self, SynthSpec};

fn write(dir: &Path, arch: Architecture) -> Arc<EdmFile> {
    let spec = SynthSpec {
        experts: 16,
        // ZAYA1 routes top-1 (its import refuses more).
        top_k: if arch == Architecture::Zaya { 1 } else { 4 },
        ..SynthSpec::tiny(arch)
    };
    let path = dir.join(format!("{arch}.edm"));
    synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::Q8, &|_, _| {}).unwrap();
    Arc::new(EdmFile::open(path).unwrap())
}

/// A denoising-like schedule: the prompt, then each block re-run with more tokens revealed, then the
/// next block (consecutive passes route alike, which the optimistic pass relies on).
fn schedule() -> Vec<(usize, Vec<u32>)> {
    let prompt: Vec<u32> = (10..18).collect();
    let mut steps = vec![(0, prompt)];
    for b in 0..2 {
        for reveal in [0usize, 4, 4, 8] {
            let block: Vec<u32> = (0..8)
                .map(|i| if i < reveal { 40 + i as u32 + b * 8 } else { 3 })
                .collect();
            steps.push((8 + 8 * b as usize, block));
        }
    }
    steps
}

fn run(b: &GpuBackend, model: &Model<GpuBackend>) -> Vec<(Vec<f32>, Vec<u32>)> {
    let mut kv = model.new_kv(b, 64).unwrap();
    let want = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    schedule()
        .into_iter()
        .map(|(start, tokens)| {
            let w = Window::block(start, tokens.len(), AttnMask::BlockCausal(8));
            let out = model.forward(b, &mut kv, &tokens, w, &want).unwrap();
            let argmax = out.stats.iter().map(|s| s.argmax).collect();
            (out.logits.unwrap(), argmax)
        })
        .collect()
}

/// Whether combination `combo` runs on GPU configuration `k` of `share`: each combination on
/// exactly one of them.
fn runs_here(combo: usize, k: usize, share: usize) -> bool {
    (combo + k).is_multiple_of(share)
}

#[test]
fn paged_gpu_experts_are_bit_identical_to_resident_for_every_pool_size_policy_and_prefetch() {
    let dir = tempfile::tempdir().unwrap();
    let configs = backends(None);
    let share = configs.len().max(1);
    for (k, (name, b)) in configs.into_iter().enumerate() {
        // ZAYA1's MLP router picks the skip expert (id num_experts) for some tokens: nothing to
        // page for those.
        for arch in [
            Architecture::Qwen3Moe,
            Architecture::Llada2Moe,
            Architecture::Zaya,
        ] {
            let file = write(dir.path(), arch);
            let resident = run(&b, &Model::load(&b, file.clone(), &|_, _| true).unwrap());
            let c = file.header.metadata.config.clone();
            let moe_layers = (0..c.num_layers).filter(|&l| c.is_moe_layer(l)).count();
            let expert_bytes = file.header.experts[0].length;
            let mut requests = None;
            let mut repasses = 0;
            for (si, slots) in [c.moe.top_k, 7, 16 * moe_layers].into_iter().enumerate() {
                for (pi, policy) in [Eviction::Lru, Eviction::Lfu, Eviction::LeastStale]
                    .into_iter()
                    .enumerate()
                {
                    for prefetch in [false, true] {
                        // Every combination on one of the two GPU configurations (CI's 2-core
                        // lavapipe time), each configuration with and without prefetch.
                        if !runs_here(si + pi + usize::from(prefetch), k, share) {
                            continue;
                        }
                        let what = format!(
                            "{name} {arch}: {slots} slots, {policy:?}, prefetch {prefetch}"
                        );
                        let pool = b.expert_pool(&file, slots, policy, prefetch, 0).unwrap();
                        let model = Model::load_with_experts(&b, file.clone(), &mut |l| {
                            b.paged_experts(&pool, l)
                        })
                        .unwrap();
                        assert!(run(&b, &model) == resident, "{what}: output differs");
                        let s = pool.stats();
                        repasses += s.repasses;
                        // Every pass asks for each layer's routed experts once, whatever the mode.
                        let total = s.hits + s.misses;
                        assert_eq!(*requests.get_or_insert(total), total, "{what}");
                        assert!(s.misses > 0, "{what}");
                        assert_eq!(
                            s.bytes_read,
                            (s.misses + s.prefetched) * expert_bytes,
                            "{what}"
                        );
                        assert!(s.occupied <= slots && s.slots == slots, "{what}");
                        if !prefetch {
                            assert_eq!((s.prefetched, s.repasses), (0, 0), "{what}");
                        }
                        if slots == 16 * moe_layers {
                            assert_eq!(
                                s.evictions, 0,
                                "{what}: a pool of every expert never evicts"
                            );
                            if prefetch {
                                assert!(s.repasses <= schedule().len() as u64, "{what}");
                            }
                        }
                    }
                }
            }
            // Routing changes between blocks, so some optimistic pass met a missing expert and
            // was repaired: the repair path is covered.
            assert!(repasses > 0, "{name} {arch}");
        }
    }
}

#[test]
fn paged_pools_spread_over_several_buffers_are_bit_identical_to_resident() {
    // Bindings of about three experts: every layer's resident experts and every paged pool spread
    // over several pool buffers (each expert kernel runs once per buffer), as on a device that
    // binds 128 MiB with a model whose layer holds more.
    let dir = tempfile::tempdir().unwrap();
    for (ai, arch) in [Architecture::Qwen3Moe, Architecture::Llada2Moe]
        .into_iter()
        .enumerate()
    {
        let file = write(dir.path(), arch);
        let expert_bytes = file.header.experts[0].length;
        let configs = backends(Some(3 * expert_bytes + 256));
        let share = configs.len().max(1);
        for (k, (name, b)) in configs.into_iter().enumerate() {
            let resident = run(&b, &Model::load(&b, file.clone(), &|_, _| true).unwrap());
            let c = file.header.metadata.config.clone();
            let moe_layers = (0..c.num_layers).filter(|&l| c.is_moe_layer(l)).count();
            for (si, slots) in [c.moe.top_k, 7, 16 * moe_layers].into_iter().enumerate() {
                for prefetch in [false, true] {
                    // Every (family, pool size, prefetch) on one of the two GPU configurations
                    // (CI's 2-core lavapipe time): each configuration still meets both families,
                    // every pool size and both prefetch modes.
                    if !runs_here(ai + si + usize::from(prefetch), k, share) {
                        continue;
                    }
                    let what = format!("{name} {arch}: {slots} slots, prefetch {prefetch}");
                    let pool = b
                        .expert_pool(&file, slots, Eviction::Lru, prefetch, 0)
                        .unwrap();
                    let model = Model::load_with_experts(&b, file.clone(), &mut |l| {
                        b.paged_experts(&pool, l)
                    })
                    .unwrap();
                    assert!(run(&b, &model) == resident, "{what}: output differs");
                    assert!(pool.stats().misses > 0, "{what}");
                }
            }
        }
    }
}

#[test]
fn read_ahead_threads_change_neither_the_output_nor_the_pagers_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let configs = backends(None);
    let share = configs.len().max(1);
    for (k, (name, b)) in configs.into_iter().enumerate() {
        for (ai, arch) in [Architecture::Qwen3Moe, Architecture::Llada2Moe]
            .into_iter()
            .enumerate()
        {
            let file = write(dir.path(), arch);
            let resident = run(&b, &Model::load(&b, file.clone(), &|_, _| true).unwrap());
            let c = file.header.metadata.config.clone();
            let mut read_ahead = 0;
            for (si, slots) in [c.moe.top_k, 7, 24].into_iter().enumerate() {
                // One policy per (family, pool size), alternating (CI's 2-core lavapipe time): each
                // configuration still meets both policies, every pool size and both prefetch
                // modes; every policy's decisions against the pool are the first test's.
                let policy = [Eviction::Lru, Eviction::LeastStale][(ai + si) % 2];
                for prefetch in [false, true] {
                    if !runs_here(si + usize::from(prefetch), k, share) {
                        continue;
                    }
                    let what =
                        format!("{name} {arch}: {slots} slots, {policy:?}, prefetch {prefetch}");
                    let mut stats = Vec::new();
                    // 0: everything on this thread; 1: read-ahead, uploads here; 3 with
                    // any batch uploaded on three threads.
                    for (readers, parallel) in [(0, None), (1, None), (3, Some(0))] {
                        let pool = b
                            .expert_pool(&file, slots, policy, prefetch, readers)
                            .unwrap();
                        if let Some(bytes) = parallel {
                            pool.set_parallel_upload_bytes(bytes);
                        }
                        let model = Model::load_with_experts(&b, file.clone(), &mut |l| {
                            b.paged_experts(&pool, l)
                        })
                        .unwrap();
                        assert!(
                            run(&b, &model) == resident,
                            "{what}, {readers} readers: output differs"
                        );
                        stats.push(pool.stats());
                    }
                    // Without readers nothing is staged; with them, only experts that were
                    // then paged in are counted.
                    assert_eq!(stats[0].read_ahead, 0, "{what}");
                    for s in &stats[1..] {
                        assert!(s.read_ahead <= s.misses + s.prefetched, "{what}: {s:?}");
                        read_ahead += s.read_ahead;
                    }
                    // The same decisions in the same order: every counter but the stall and
                    // the read-ahead count is equal.
                    let key = |s: &edgediff::experts::PagerStats| {
                        (
                            s.hits,
                            s.misses,
                            s.prefetched,
                            s.prefetch_hits,
                            s.evictions,
                            s.bytes_read,
                            s.repasses,
                            s.occupied,
                        )
                    };
                    for s in &stats[1..] {
                        assert_eq!(key(s), key(&stats[0]), "{what}");
                    }
                }
            }
            // The staged path was taken (a reader that never delivered would pass the rest).
            assert!(read_ahead > 0, "{name} {arch}");
        }
    }
}

#[test]
fn with_every_expert_resident_the_optimistic_pass_stops_missing() {
    let dir = tempfile::tempdir().unwrap();
    for (name, b) in backends(None) {
        let file = write(dir.path(), Architecture::Olmoe);
        let c = file.header.metadata.config.clone();
        let all = c.num_layers * c.moe.num_experts;
        let pool = b.expert_pool(&file, all, Eviction::Lru, true, 0).unwrap();
        let model =
            Model::load_with_experts(&b, file.clone(), &mut |l| b.paged_experts(&pool, l)).unwrap();
        let mut kv = model.new_kv(&b, 64).unwrap();
        let block = [5u32, 3, 3, 3, 9, 3, 3, 3];
        let w = Window::block(0, 8, AttnMask::Bidirectional);
        for _ in 0..3 {
            model
                .forward(&b, &mut kv, &block, w, &ForwardRequest::default())
                .unwrap();
        }
        let s = pool.stats();
        // Pass 1 is synchronous (no prediction) and pages in what it routes; passes 2 and 3 route
        // the same and run optimistically with everything resident: no miss, no re-run.
        assert_eq!(s.repasses, 0, "{name}");
        assert_eq!(s.hits, 2 * s.misses, "{name}: {s:?}");
    }
}

#[test]
fn an_expert_memory_below_one_layers_top_k_is_a_clear_error() {
    let e = ExpertMemory::Bytes(3 * 1000)
        .slots(64, 1000, 4)
        .unwrap_err();
    assert!(matches!(
        e,
        ExpertsError::PoolTooSmall {
            slots: 3,
            top_k: 4,
            ..
        }
    ));
    let msg = e.to_string();
    assert!(
        msg.contains("3 experts of 1000 bytes") && msg.contains("4000 bytes"),
        "{msg}"
    );
    assert_eq!(ExpertMemory::Bytes(4000).slots(64, 1000, 4).unwrap(), 4);
    assert_eq!(
        "12.5%"
            .parse::<ExpertMemory>()
            .unwrap()
            .slots(64, 1000, 4)
            .unwrap(),
        8
    );
    assert_eq!(
        "800".parse::<ExpertMemory>().unwrap(),
        ExpertMemory::Bytes(800)
    );
    assert!("lots".parse::<ExpertMemory>().is_err());
    assert!(ExpertMemory::Fraction(0.01).slots(64, 1000, 4).is_err());
}

fn generate<B: edgediff::experts::paging::PagedLoad>(
    b: B,
    file: &Arc<EdmFile>,
    memory: Option<ExpertMemory>,
) -> (Vec<u32>, Option<edgediff::experts::PagerStats>) {
    let config = EngineConfig {
        expert_memory: memory,
        ..Default::default()
    };
    let e = Engine::open(b, file.clone(), &config).unwrap();
    let mut r = e.request(Prompt::Tokens(vec![1, 40, 77, 300, 12, 3, 90, 41]));
    r.decoding.max_new_tokens = 24;
    r.decoding.ignore_eos = true;
    let out = e.generate(&r, &mut |_| {}).unwrap();
    (out.tokens, e.expert_stats())
}

#[test]
fn engines_with_an_expert_memory_generate_the_same_tokens_on_cpu_and_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), Architecture::Llada2Moe);
    let quarter = Some(ExpertMemory::Fraction(0.25));
    let (all, none) = generate(CpuBackend, &file, None);
    assert!(none.is_none() && !all.is_empty());
    let (paged, stats) = generate(CpuBackend, &file, quarter);
    assert_eq!(paged, all, "cpu");
    let s = stats.unwrap();
    assert!(s.misses > 0 && s.occupied <= s.slots, "{s:?}");
    for (name, b) in backends(None) {
        let (gpu_all, _) = generate(b, &file, None);
        let (_, b) = backends(None)
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap();
        let (gpu_paged, stats) = generate(b, &file, quarter);
        assert_eq!(gpu_paged, gpu_all, "{name}");
        let s = stats.unwrap();
        assert!(
            s.hits + s.misses > 0 && s.occupied <= s.slots,
            "{name}: {s:?}"
        );
    }
    // Too small a budget names its numbers.
    let err = Engine::open(
        CpuBackend,
        file.clone(),
        &EngineConfig {
            expert_memory: Some(ExpertMemory::Bytes(1)),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, EngineError::Experts(ExpertsError::PoolTooSmall { .. })),
        "{err}"
    );
}

/// Bytes of this process's mappings of `path` resident in memory (Linux `/proc/self/smaps`).
#[cfg(target_os = "linux")]
fn mapped_rss(path: &Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = path.to_str().unwrap();
    let (mut total, mut inside) = (0, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let is_header = fields.next().is_some_and(|r| r.contains('-'))
            && fields.next().is_some_and(|p| p.len() == 4);
        if is_header {
            inside = line.ends_with(name);
        } else if let Some(kb) = line.strip_prefix("Rss:").filter(|_| inside) {
            total += kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024;
        }
    }
    total
}

#[cfg(target_os = "linux")]
#[test]
fn paged_experts_leave_no_host_pages_behind() {
    let dir = tempfile::tempdir().unwrap();
    let Some((name, b)) = backends(None).into_iter().next() else {
        return;
    };
    let spec = SynthSpec {
        experts: 32,
        top_k: 4,
        ..SynthSpec::tiny(Architecture::Qwen3Moe)
    };
    let m = synth::build(&spec).unwrap();
    let path = dir.path().join("paged.edm");
    synth::write_edm(&m, &path, DType::F32, &|_, _| {}).unwrap();
    let file = Arc::new(EdmFile::open(&path).unwrap());
    let experts: u64 = file.header.experts.iter().map(|t| t.length * 32).sum();
    let dense = file.file_len() - experts;
    let c = file.header.metadata.config.clone();
    let pool = b
        .expert_pool(&file, c.num_layers * 32, Eviction::Lru, true, 2)
        .unwrap();
    let model =
        Model::load_with_experts(&b, file.clone(), &mut |l| b.paged_experts(&pool, l)).unwrap();
    run(&b, &model);
    let read = pool.stats().bytes_read;
    let resident = mapped_rss(&path);
    eprintln!("{name}: mapped RSS {resident}, bytes paged in {read}, dense bytes {dense}");
    // Paged experts are read with positional reads, never through the mapping: only the dense
    // weights (read once at load) are mapped in, plus page rounding at their edges.
    assert!(read > 0, "{name}: nothing was paged in");
    assert!(
        resident <= dense + 64 * 1024,
        "{name}: {resident} mapped bytes for {dense} dense bytes after paging in {read}"
    );
}
