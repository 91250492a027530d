//! Block-level expert routing (`--block-experts N`): each block of a pass routes within the N
//! experts per layer with the largest router mass over the block. The GPU's mask kernel and
//! masked selection against the CPU reference on random routers of awkward sizes; N ≥ the expert
//! count is exact routing bit for bit; N below the router's top-k is a typed error; a block never
//! reaches more than N distinct experts per layer (where exact routing does).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::{CpuAct, CpuBackend};
use edgediff::backend::gpu::testing::{backends, rel_l2};
use edgediff::backend::gpu::GpuBackend;
use edgediff::backend::{AttnMask, Backend, BlockRouting};
use edgediff::decode::sampling;
use edgediff::decode::{DecodeError, DecodeParams};
use edgediff::engine::{Engine, EngineConfig, EngineError, Prompt};
use edgediff::format::{dtype, DType, EdmFile, TensorView};
use edgediff::model::{
    Architecture, ForwardOutput, ForwardRequest, Gating, Model, ModelConfig, ModelError,
    RouterKind, Window,
};
use edgediff::synth::{self, SynthSpec};

/// Seeded values in [-1, 1): the decoder's SplitMix64 stream, rescaled.
struct Rng(sampling::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(sampling::Rng::new(seed))
    }
    fn next(&mut self) -> f32 {
        (self.0.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn weight<B: Backend>(b: &B, dt: DType, shape: &[usize], values: &[f32]) -> B::Weight {
    let bytes = dtype::encode(dt, values, *shape.last().unwrap());
    b.load_weight(TensorView {
        name: "w",
        dtype: dt,
        shape,
        bytes: &bytes,
    })
    .unwrap()
}

/// One router case: the config, the inputs, the blocks.
struct Case {
    c: ModelConfig,
    rows: usize,
    dtype: DType,
    router: Vec<f32>,
    bias: Option<Vec<f32>>,
    x: Vec<f32>,
    blocks: BlockRouting,
}

// Q8 groups of 32 along the input: a hidden size of three groups.
const HIDDEN: usize = 96;

/// Activations from the host.
trait Put: Backend {
    fn put(&self, rows: usize, cols: usize, data: &[f32]) -> Self::Act;
}

impl Put for CpuBackend {
    fn put(&self, rows: usize, cols: usize, data: &[f32]) -> CpuAct {
        CpuAct::new(rows, cols, data.to_vec())
    }
}

impl Put for GpuBackend {
    fn put(&self, rows: usize, cols: usize, data: &[f32]) -> Self::Act {
        self.upload_act(rows, cols, data).unwrap()
    }
}

fn route_on<B: Put>(b: &B, case: &Case) -> (Vec<u32>, Vec<f32>) {
    let e = case.c.moe.num_experts;
    let router = weight(b, case.dtype, &[e, HIDDEN], &case.router);
    let bias = case.bias.as_ref().map(|v| weight(b, DType::F32, &[e], v));
    let x = b.put(case.rows, HIDDEN, &case.x);
    let r = b
        .route_within_blocks(&x, &router, bias.as_ref(), &case.c, &case.blocks)
        .unwrap();
    b.routing_to_host(&r).unwrap()
}

fn router_config(gating: Gating, experts: usize, top_k: usize) -> ModelConfig {
    let mut c = synth::build(&SynthSpec::tiny(Architecture::Qwen3Moe))
        .unwrap()
        .meta
        .config;
    c.moe.num_experts = experts;
    c.moe.top_k = top_k;
    c.moe.gating = gating;
    c
}

#[test]
fn gpu_block_routing_matches_the_cpu() {
    let gpus = backends(None);
    let mut rng = Rng::new(19);
    let grouped = Gating::SigmoidGrouped {
        groups: 8,
        top_groups: 4,
        scale: 2.5,
        renormalize: true,
    };
    // (gating, experts, top_k, bias scale, rows, blocks, N): softmax with and without a bias
    // (pruned experts among it), LLaDA2-like grouped sigmoid; blocks aligned with a phase, a tail
    // after exact rows, one block per row; N from top-k to most experts; E and T no tile sizes.
    let cases = [
        (
            Gating::Softmax { renormalize: true },
            12,
            3,
            None,
            13,
            BlockRouting::aligned(3, 6, 5, 0),
        ),
        (
            Gating::Softmax { renormalize: false },
            60,
            8,
            Some(0.5),
            37,
            BlockRouting::aligned(11, 3, 16, 0),
        ),
        (
            Gating::Softmax { renormalize: true },
            60,
            4,
            Some(0.5),
            9,
            BlockRouting::tail(5, 4),
        ),
        (
            grouped,
            256,
            8,
            Some(0.1),
            21,
            BlockRouting::aligned(8, 0, 16, 0),
        ),
        (
            grouped,
            256,
            8,
            Some(0.1),
            19,
            BlockRouting::aligned(40, 5, 7, 2),
        ),
        (grouped, 256, 8, None, 5, BlockRouting::tail(17, 2)),
        (
            Gating::Softmax { renormalize: true },
            1000,
            6,
            None,
            3,
            BlockRouting::aligned(6, 0, 1, 0),
        ),
    ];
    let mut compared = 0;
    for (i, (g, e, k, bias, rows, blocks)) in cases.into_iter().enumerate() {
        for dt in [DType::F32, DType::Q8] {
            let mut bias_v = bias.map(|s| rng.vec(e, s));
            if let Some(b) = bias_v.as_mut() {
                b[1] = -1e30; // a pruned expert: never routed, no mass
            }
            let case = Case {
                c: router_config(g, e, k),
                rows,
                dtype: dt,
                router: rng.vec(e * HIDDEN, 1.0),
                bias: bias_v,
                x: rng.vec(rows * HIDDEN, 1.0),
                blocks,
            };
            let (want_ids, want_w) = route_on(&CpuBackend, &case);
            if case.bias.is_some() {
                assert!(
                    want_ids.iter().all(|&id| id != 1),
                    "case {i}: pruned expert routed"
                );
            }
            for (label, gpu) in &gpus {
                let (ids, w) = route_on(gpu, &case);
                assert_eq!(ids, want_ids, "case {i} {dt} on {label}: ids");
                let err = rel_l2(&w, &want_w);
                assert!(
                    err <= 1e-4,
                    "case {i} {dt} on {label}: weights rel L2 {err:e}"
                );
                compared += 1;
            }
        }
    }
    assert!(gpus.is_empty() || compared == 14 * gpus.len());
}

fn write_synth(dir: &Path, arch: Architecture, experts: usize) -> PathBuf {
    let spec = SynthSpec {
        experts,
        ..SynthSpec::tiny(arch)
    };
    let path = dir.join(format!("{arch}-{experts}.edm"));
    synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::F32, &|_, _| {}).unwrap();
    path
}

const TOKENS: [u32; 21] = [
    1, 40, 77, 300, 12, 3, 3, 3, 90, 41, 7, 250, 33, 100, 200, 5, 6, 501, 17, 18, 19,
];

/// One block-causal pass at position 3 (the first block of 8 is cut short, as after a prompt).
fn pass<B: Backend>(b: &B, m: &Model<B>, blocks: Option<BlockRouting>) -> ForwardOutput {
    let mut kv = m.new_kv(b, 32).unwrap();
    let want = ForwardRequest {
        logits: true,
        routing: true,
        blocks,
        ..Default::default()
    };
    let window = Window::block(3, TOKENS.len(), AttnMask::BlockCausal(8));
    m.forward(b, &mut kv, &TOKENS, window, &want).unwrap()
}

/// Every family with routed experts, linear routers and ZAYA1's MLP router alike.
fn moe_archs() -> Vec<Architecture> {
    Architecture::ALL
        .into_iter()
        .filter(|&a| {
            let c = synth::build(&SynthSpec::tiny(a)).unwrap().meta.config;
            c.moe.num_experts > 0 && c.block.canvas.is_none()
        })
        .collect()
}

/// Whether `arch` routes through an MLP router (which has a skip class: a token may use fewer
/// than top-k experts).
fn mlp_router(arch: Architecture) -> bool {
    synth::build(&SynthSpec::tiny(arch))
        .unwrap()
        .meta
        .config
        .router
        != RouterKind::Linear
}

/// Loads `path` on `b`.
fn load<B: Backend>(b: &B, path: &Path) -> Model<B> {
    Model::load(b, Arc::new(EdmFile::open(path).unwrap()), &|_, _| true).unwrap()
}

#[test]
fn block_experts_at_least_the_expert_count_is_exact_routing() {
    let dir = tempfile::tempdir().unwrap();
    let archs = moe_archs();
    assert!(
        archs.len() >= 4 && archs.iter().any(|&a| mlp_router(a)),
        "{archs:?}"
    );
    fn body<B: Backend>(label: &str, b: &B, archs: &[Architecture], dir: &Path) {
        for &arch in archs {
            let m = load(b, &write_synth(dir, arch, 16));
            let exact = pass(b, &m, None);
            for n in [16, 17, 1000] {
                for blocks in [BlockRouting::aligned(n, 3, 8, 0), BlockRouting::tail(n, 5)] {
                    let got = pass(b, &m, Some(blocks));
                    assert_eq!(
                        got.logits, exact.logits,
                        "{arch} {label} {blocks:?}: logits"
                    );
                    assert_eq!(got.routing, exact.routing, "{arch} {label} {blocks:?}");
                }
            }
        }
    }
    body("cpu", &CpuBackend, &archs, dir.path());
    for (label, g) in backends(None) {
        body(&label, &g, &archs, dir.path());
    }
}

/// Distinct experts of each block, per MoE layer of a pass (an MLP router's skip class, id
/// `experts`, is no expert).
fn distinct_per_block(
    out: &ForwardOutput,
    blocks: &BlockRouting,
    rows: usize,
    experts: usize,
) -> Vec<usize> {
    let mut counts = Vec::new();
    for (_, ids, _) in &out.routing {
        let k = ids.len() / rows;
        for g in 0..blocks.blocks(rows) {
            let mut e: Vec<u32> = (0..rows)
                .filter(|&t| blocks.block_of(t) == Some(g))
                .flat_map(|t| ids[t * k..(t + 1) * k].iter().copied())
                .filter(|&e| (e as usize) < experts)
                .collect();
            e.sort_unstable();
            e.dedup();
            counts.push(e.len());
        }
    }
    counts
}

#[test]
fn a_block_routes_within_its_n_experts() {
    let dir = tempfile::tempdir().unwrap();
    fn body<B: Backend>(label: &str, b: &B, dir: &Path) {
        for arch in moe_archs() {
            let m = load(b, &write_synth(dir, arch, 16));
            let (top_k, ne) = (m.config.moe.top_k, m.config.moe.num_experts);
            // A token of an MLP router may take the skip class instead of an expert.
            let least = if mlp_router(arch) { 0 } else { top_k };
            for n in [top_k, top_k + 1, 5] {
                let blocks = BlockRouting::aligned(n, 3, 8, 0);
                let exact = distinct_per_block(&pass(b, &m, None), &blocks, TOKENS.len(), ne);
                let got = distinct_per_block(&pass(b, &m, Some(blocks)), &blocks, TOKENS.len(), ne);
                // The bound binds: exact routing of some block reaches more than N.
                if n == top_k {
                    assert!(
                        exact.iter().any(|&d| d > n),
                        "{arch}: exact {exact:?} ≤ {n}"
                    );
                }
                assert!(
                    got.iter().all(|&d| d <= n && d >= least),
                    "{arch} on {label}, N = {n}: distinct experts per block {got:?}"
                );
            }
        }
    }
    body("cpu", &CpuBackend, dir.path());
    for (label, g) in backends(None) {
        body(&label, &g, dir.path());
    }
}

#[test]
fn fewer_block_experts_than_top_k_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_synth(dir.path(), Architecture::Qwen3Moe, 16);
    let file = Arc::new(EdmFile::open(&path).unwrap());
    let top_k = file.header.metadata.config.moe.top_k;
    let m = Model::load(&CpuBackend, file.clone(), &|_, _| true).unwrap();
    let mut kv = m.new_kv(&CpuBackend, 32).unwrap();
    let want = ForwardRequest {
        blocks: Some(BlockRouting::tail(top_k - 1, 0)),
        ..Default::default()
    };
    let r = m.forward(
        &CpuBackend,
        &mut kv,
        &TOKENS,
        Window::block(0, TOKENS.len(), AttnMask::Causal),
        &want,
    );
    assert!(
        matches!(r, Err(ModelError::BlockExperts { experts, top_k: k }) if experts == top_k - 1 && k == top_k),
        "{r:?}"
    );
    // Through the engine: at load, per request, and N = 0.
    let config = EngineConfig {
        block_experts: Some(top_k - 1),
        ..Default::default()
    };
    let e = Engine::open(CpuBackend, file.clone(), &config);
    assert!(matches!(
        e,
        Err(EngineError::Model(ModelError::BlockExperts { .. }))
    ));
    let e = Engine::open(CpuBackend, file, &EngineConfig::default()).unwrap();
    for (n, zero) in [(top_k - 1, false), (0, true)] {
        let mut req = e.request(Prompt::Tokens(vec![1, 40, 77]));
        req.decoding = DecodeParams {
            block_experts: Some(n),
            max_new_tokens: 8,
            ..req.decoding
        };
        let r = e.generate(&req, &mut |_| {});
        match r {
            Err(EngineError::Decode(DecodeError::InvalidParameter { name, .. })) if zero => {
                assert_eq!(name, "block_experts")
            }
            Err(EngineError::Decode(DecodeError::Model(ModelError::BlockExperts { .. })))
                if !zero => {}
            other => panic!("N = {n}: {:?}", other.map(|o| o.tokens)),
        }
    }
}

#[test]
fn decoding_with_block_experts_of_every_expert_equals_exact_decoding() {
    let dir = tempfile::tempdir().unwrap();
    for arch in moe_archs() {
        let path = write_synth(dir.path(), arch, 16);
        let e = Engine::open(
            CpuBackend,
            Arc::new(EdmFile::open(&path).unwrap()),
            &EngineConfig::default(),
        )
        .unwrap();
        let tokens = |n: Option<usize>| {
            let mut req = e.request(Prompt::Tokens(vec![1, 40, 77, 300, 12]));
            req.decoding = DecodeParams {
                block_experts: n,
                max_new_tokens: 20,
                ignore_eos: true,
                ..req.decoding
            };
            e.generate(&req, &mut |_| {}).unwrap().tokens
        };
        assert_eq!(tokens(Some(16)), tokens(None), "{arch}");
        // And a restricting N decodes (the tokens may differ).
        assert_eq!(tokens(Some(2)).len(), 20, "{arch}");
    }
}

/// Tokens of a 24-token block decode through an engine on `b`, experts paged or not.
fn decode_with<B: edgediff::experts::paging::PagedLoad>(
    b: B,
    file: &Arc<EdmFile>,
    memory: Option<edgediff::experts::ExpertMemory>,
    block_experts: usize,
) -> (Vec<u32>, Option<edgediff::experts::PagerStats>) {
    let config = EngineConfig {
        expert_memory: memory,
        block_experts: Some(block_experts),
        ..Default::default()
    };
    let e = Engine::open(b, file.clone(), &config).unwrap();
    let mut r = e.request(Prompt::Tokens(vec![1, 40, 77, 300, 12, 3, 90, 41]));
    r.decoding.max_new_tokens = 24;
    r.decoding.ignore_eos = true;
    (
        e.generate(&r, &mut |_| {}).unwrap().tokens,
        e.expert_stats(),
    )
}

#[test]
fn paged_experts_under_block_routing_give_the_resident_tokens() {
    // Paging stays exact with the block's set in the router: the GPU's optimistic pass and its
    // re-runs, and the CPU's expert-major loop, page what the restricted routing picks.
    let dir = tempfile::tempdir().unwrap();
    let file =
        Arc::new(EdmFile::open(write_synth(dir.path(), Architecture::Llada2Moe, 16)).unwrap());
    let quarter = Some(edgediff::experts::ExpertMemory::Fraction(0.25));
    let (all, _) = decode_with(CpuBackend, &file, None, 3);
    let (paged, stats) = decode_with(CpuBackend, &file, quarter, 3);
    assert_eq!(paged, all, "cpu");
    assert!(stats.unwrap().misses > 0);
    let (exact, _) = {
        let e = Engine::open(CpuBackend, file.clone(), &EngineConfig::default()).unwrap();
        let mut r = e.request(Prompt::Tokens(vec![1, 40, 77, 300, 12, 3, 90, 41]));
        r.decoding.max_new_tokens = 24;
        r.decoding.ignore_eos = true;
        (e.generate(&r, &mut |_| {}).unwrap().tokens, ())
    };
    assert_ne!(
        all, exact,
        "N = 3 of 16 changes nothing: the test cannot tell"
    );
    for (name, _) in backends(None) {
        let pick = || {
            backends(None)
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
        };
        let (gpu_all, _) = decode_with(pick(), &file, None, 3);
        let (gpu_paged, stats) = decode_with(pick(), &file, quarter, 3);
        assert_eq!(gpu_paged, gpu_all, "{name}");
        assert!(stats.unwrap().misses > 0, "{name}");
    }
}
