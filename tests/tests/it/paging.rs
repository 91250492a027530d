//! Exact lazy paging: with any pool size down to one token's top-k and any eviction policy, every
//! forward pass is bit-identical to having all experts resident, and the pager's counters add up.

use std::path::Path;
use std::sync::{Arc, Mutex};

use edgediff::backend::cpu::{CpuBackend, CpuExpertPool, CpuExperts};
use edgediff::backend::AttnMask;
use edgediff::experts::{Eviction, Pager};
use edgediff::format::{DType, EdmFile};
use edgediff::model::{Architecture, ForwardRequest, Model, Window};
use edgediff::synth::{self, SynthSpec};

fn write(dir: &Path, arch: Architecture) -> Arc<EdmFile> {
    let spec = SynthSpec {
        experts: 16,
        top_k: 4,
        ..SynthSpec::tiny(arch)
    };
    let path = dir.join(format!("{arch}.edm"));
    synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::Q8, &|_, _| {}).unwrap();
    Arc::new(EdmFile::open(path).unwrap())
}

/// A short denoising-like schedule: the same block re-run with more tokens revealed each step, then
/// the next block.
fn schedule() -> Vec<(usize, Vec<u32>)> {
    let prompt: Vec<u32> = (10..18).collect();
    let mut steps = vec![(0, prompt)];
    for b in 0..2 {
        for reveal in [0usize, 4, 8] {
            let block: Vec<u32> = (0..8)
                .map(|i| if i < reveal { 40 + i as u32 + b * 8 } else { 3 })
                .collect();
            steps.push((8 + 8 * b as usize, block));
        }
    }
    steps
}

fn run(model: &Model<CpuBackend>) -> Vec<Vec<f32>> {
    let mut kv = model.new_kv(&CpuBackend, 64).unwrap();
    let want = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    schedule()
        .into_iter()
        .map(|(start, tokens)| {
            let w = Window::block(start, tokens.len(), AttnMask::BlockCausal(8));
            model
                .forward(&CpuBackend, &mut kv, &tokens, w, &want)
                .unwrap()
                .logits
                .unwrap()
        })
        .collect()
}

#[test]
fn paged_experts_give_bit_identical_logits_for_every_pool_size_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        let file = write(dir.path(), arch);
        let resident = run(&Model::load(&CpuBackend, file.clone(), &|_, _| true).unwrap());
        let c = &file.header.metadata.config;
        let moe_layers = (0..c.num_layers).filter(|&l| c.is_moe_layer(l)).count();
        let expert_bytes = file.header.experts[0].length;
        for slots in [c.moe.top_k, 7, 16 * moe_layers] {
            for policy in [Eviction::Lru, Eviction::Lfu, Eviction::LeastStale] {
                Pager::check_capacity(slots, c.moe.top_k).unwrap();
                let pool = Arc::new(Mutex::new(CpuExpertPool::new(Pager::new(
                    slots,
                    c.num_layers,
                    policy,
                ))));
                let model = Model::load_with_experts(&CpuBackend, file.clone(), &mut |l| {
                    Ok(CpuExperts::paged(file.clone(), l, pool.clone()))
                })
                .unwrap();
                assert_eq!(run(&model), resident, "{arch}: {slots} slots, {policy:?}");
                let s = pool.lock().unwrap().pager.stats.clone();
                assert!(s.misses > 0 && s.hits + s.misses > 0);
                assert_eq!(
                    s.bytes_read,
                    s.misses * expert_bytes,
                    "{arch} {slots} {policy:?}"
                );
                assert!(s.occupied <= slots);
                if slots == 16 * moe_layers {
                    assert_eq!(s.evictions, 0, "a pool holding every expert never evicts");
                }
            }
        }
    }
}

#[test]
fn prefetching_the_previous_steps_routing_turns_misses_into_hits() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), Architecture::Olmoe);
    let c = file.header.metadata.config.clone();
    let pool = Arc::new(Mutex::new(CpuExpertPool::new(Pager::new(
        2 * c.moe.num_experts,
        c.num_layers,
        Eviction::Lru,
    ))));
    let model = Model::load_with_experts(&CpuBackend, file.clone(), &mut |l| {
        Ok(CpuExperts::paged(file.clone(), l, pool.clone()))
    })
    .unwrap();
    let mut kv = model.new_kv(&CpuBackend, 64).unwrap();
    let want = ForwardRequest {
        routing: true,
        ..Default::default()
    };
    let block: Vec<u32> = vec![5, 3, 3, 3, 9, 3, 3, 3];
    let w = Window::block(0, 8, AttnMask::Bidirectional);
    let first = model
        .forward(&CpuBackend, &mut kv, &block, w, &want)
        .unwrap();
    let predicted: Vec<(usize, Vec<u32>)> = first
        .routing
        .iter()
        .map(|(l, ids, _)| (*l, ids.clone()))
        .collect();
    // A fresh pool, warmed by prefetch from the previous step's routing: the same step then only hits.
    let pool2 = Arc::new(Mutex::new(CpuExpertPool::new(Pager::new(
        2 * c.moe.num_experts,
        c.num_layers,
        Eviction::Lru,
    ))));
    pool2.lock().unwrap().prefetch(&file, &predicted).unwrap();
    let model2 = Model::load_with_experts(&CpuBackend, file.clone(), &mut |l| {
        Ok(CpuExperts::paged(file.clone(), l, pool2.clone()))
    })
    .unwrap();
    let mut kv2 = model2.new_kv(&CpuBackend, 64).unwrap();
    model2
        .forward(&CpuBackend, &mut kv2, &block, w, &want)
        .unwrap();
    let s = pool2.lock().unwrap().pager.stats.clone();
    assert_eq!(s.misses, 0, "{s:?}");
    assert!(s.prefetched > 0 && s.prefetch_hits == s.prefetched, "{s:?}");
}
