//! Kernel choices and tuning where more than one kernel or setting serves an op. The defaults are
//! the measured best (docs/PERF.md); the others stay selectable so a before/after comparison runs
//! side by side from one binary. Read once, with the device's other options
//! ([`super::GpuOptions::from_env`]), and carried by the device: no op reads the environment.
//!
//! | variable | field |
//! |---|---|
//! | `EDGEDIFF_COOP_MIN_T=<tokens>` | [`KernelChoice::coop_min_t`] |
//! | `EDGEDIFF_COOP_SPLIT_K=0` | [`KernelChoice::coop_split_k`] |
//! | `EDGEDIFF_GEMV_MAX_T=<tokens>` | [`KernelChoice::gemv_max_t`] |
//! | `EDGEDIFF_SHARED_MAX_T=<tokens>` | [`KernelChoice::shared_max_t`] |
//! | `EDGEDIFF_GEMV_F32_MAX_T=<tokens>` | [`KernelChoice::gemv_f32_max_t`] |
//! | `EDGEDIFF_GEMV_BLOCKED_MAX_MB=<MiB>` | [`KernelChoice::gemv_blocked_max_bytes`] |
//! | `EDGEDIFF_GEMV1_LANES=16\|32\|64` | [`KernelChoice::gemv1_lanes`] |
//! | `EDGEDIFF_GEMV_MAX_GROUPS=<n>` | [`KernelChoice::gemv_max_groups`] |
//! | `EDGEDIFF_GEMV_WIDE_MIN_T=<rows>\|off` | [`KernelChoice::gemv_wide_min_t`] |
//! | `EDGEDIFF_GEMV_WIDE_F32=0` | [`KernelChoice::gemv_wide_f32`] |
//! | `EDGEDIFF_WIDE_F32_LANES1=64\|128` | [`KernelChoice::wide_f32_lanes1`] |
//! | `EDGEDIFF_WIDE_LANES=4\|8\|16\|32\|64` | [`KernelChoice::wide_lanes`] |
//! | `EDGEDIFF_WIDE_HEAD1=1\|0` | [`KernelChoice::wide_head1`] |
//! | `EDGEDIFF_WIDE_LONG=1\|0` | [`KernelChoice::wide_long`] |
//! | `EDGEDIFF_WIDE_ROW_SETS=1\|2\|4` | [`KernelChoice::wide_row_sets`] |
//! | `EDGEDIFF_MOE_ROW_SETS=1\|2\|4` | [`KernelChoice::moe_row_sets`] |
//! | `EDGEDIFF_WIDE_DENSE_LANES=0\|4\|8\|16\|32\|64` | [`KernelChoice::wide_dense_lanes`] |
//! | `EDGEDIFF_WIDE_Q8ACT=1\|0` | [`KernelChoice::wide_q8_act`] |
//! | `EDGEDIFF_WIDE_MIN_CHUNKS=<n>` | [`KernelChoice::wide_min_chunks`] |
//! | `EDGEDIFF_WIDE_TARGET_GROUPS=<n>` | [`KernelChoice::wide_target_groups`] |
//! | `EDGEDIFF_WIDE_Q8_ONCE=1\|0` | [`KernelChoice::wide_q8_once`] |
//! | `EDGEDIFF_MOE_Q8_ONCE=1\|0` | [`KernelChoice::moe_q8_once`] |
//! | `EDGEDIFF_FUSE_SWIGLU=0` | [`KernelChoice::fuse_swiglu`] |
//! | `EDGEDIFF_FUSE_COMBINE_NORM=1\|0` | [`KernelChoice::fuse_combine_norm`] |
//! | `EDGEDIFF_FUSE_NORMS_MAX_T=<rows>` | [`KernelChoice::fuse_norms_max_t`] |
//! | `EDGEDIFF_MOE_KERNEL=gemv\|tiled` | [`KernelChoice::moe`] |
//! | `EDGEDIFF_MOE_GEMV_BLOCKS=<n>` | [`KernelChoice::moe_gemv_blocks`] |
//! | `EDGEDIFF_MOE_GEMV1_LANES=16\|32` | [`KernelChoice::moe_gemv1_lanes`] |
//! | `EDGEDIFF_MOE_WIDE=0\|down\|blocks\|all` | [`KernelChoice::moe_wide`] |
//! | `EDGEDIFF_MOE_CHUNK=1\|2\|4` | [`KernelChoice::moe_chunk`] |
//! | `EDGEDIFF_LEAN_ONE=0` | [`KernelChoice::lean_one`] |
//! | `EDGEDIFF_GEMV_DEPTH=4\|8` | [`KernelChoice::gemv_depth`] |
//! | `EDGEDIFF_MOE_DIRECT_MAX_T=<rows>` | [`KernelChoice::moe_direct_max_t`] |
//! | `EDGEDIFF_ATTN_KERNEL=heads\|gqa` | [`KernelChoice::attention`] |
//! | `EDGEDIFF_ATTN_CLAMP=0\|1` | [`KernelChoice::attn_clamp`] |
//! | `EDGEDIFF_ATTN_GROUPS=<n>` | [`KernelChoice::attn_groups`] |
//! | `EDGEDIFF_STATS_CHUNK=<logits>` | [`KernelChoice::stats_chunk`] |
//! | `EDGEDIFF_EXPERT_POOL_BINDING=<bytes>` | [`KernelChoice::expert_pool_binding`] |
//! | `EDGEDIFF_BATCH_BLOCKS=0` | [`KernelChoice::batch_blocks`] |
//! | `EDGEDIFF_SHADER_CHECKS=all\|no-loop-bound\|none` | [`KernelChoice::shader_checks`] |
//! | `EDGEDIFF_PROBE=<bits>` | [`KernelChoice::probe`] |

/// Which expert kernels serve a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertKernel {
    /// The GEMV expert kernels (shaders/moe_gemv.wgsl).
    Gemv,
    /// The tiled expert kernels (shaders/matmul.wgsl).
    Tiled,
}

/// Which attention kernels serve a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// One workgroup per (q head, token, split): attend + attend_combine.
    Heads,
    /// Octets over GQA groups: attend_gqa + attend_merge.
    Gqa,
}

/// Which GEMV expert kernels run wide (moe_gemv_wide.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeWide {
    Off,
    /// The down projection only (rows of the expert width: the wide kernel's 32 rows a
    /// workgroup amortise its staging), in passes of at least `gemv_wide_min_t` rows (the
    /// word-a-lane kernel is faster below them).
    Down,
    /// Both projections, in passes of at least `gemv_wide_min_t` rows (the default since the wide
    /// kernels' weight loads left their per-row branches: H100, one call, gate/up 4,889 → 4,419
    /// µs a 32-token pass, 3,485 → 3,335 at 16; below those rows the word-a-lane kernels stay
    /// faster, 328 against 453 µs at one token).
    Blocks,
    /// Both projections at every row count.
    All,
}

/// What naga adds to every kernel as it translates it (wgpu's `ShaderRuntimeChecks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShaderChecks {
    /// wgpu's default: index clamps on arrays and vectors indexed at run time (buffers too where
    /// the driver has no robust buffer access of its own) and a counter in every loop.
    All,
    /// The clamps, without the loop counters (a kernel whose loop never ends hangs the device
    /// instead of ending with wrong values; none of ours can: every loop is counted).
    NoLoopBound,
    /// Neither: the kernels as written, which index in bounds by construction (the tests poison
    /// every output). On Vulkan the driver's robust buffer access, which wgpu turns on, still
    /// guards buffer reads; elsewhere (Metal) nothing does, hence the default there.
    None,
}

/// Activation rows from which f16, q8 and q4 matmuls take the tensor cores.
pub const COOP_MIN_T: usize = 16;
/// Activation rows up to which f32 weights that stay in L2 (the routers) take the gemv in token
/// blocks: they have no tensor-core kernel, and the tiled one gives a router [256 × 2048] only
/// n/64 × t/16 workgroups (8 at 32 tokens: 160 µs a layer on the H200).
pub const GEMV_F32_MAX_T: usize = 64;
/// Workgroups (8 slots of 8 invocations each) the GQA attention kernel aims at. Splits stop at
/// 16 keys each, so one- and two-row passes over 1024 cached positions split the same (65) for
/// 512 and 2048; blocks split more with 2048: H100, 20-layer LLaDA2.0-mini q4, one call,
/// attention 1,529 → 1,362 µs a 16-token pass and 2,745 → 2,252 at 32 (2026-12-06; 512 before).
pub const GQA_TARGET_GROUPS: usize = 2048;
/// Workgroups the dense wide gemv aims at ([`KernelChoice::wide_target_groups`]): about two
/// waves of its 128-invocation, 113-register workgroups on a 132-SM GPU (four an SM). The LM head
/// (157,184 rows: 4,912 row groups) loops over its token blocks; the attention matrices (96 and 64
/// row groups) spread as before. H200, 20-layer LLaDA2.0-mini q4, one call: the 16-row LM head
/// 844 µs on the tensor-core tiles → ≈ 512 on the looping wide gemv, the pass 7.58 → 7.25 ms
/// (docs/PERF.md, 2026-12-06 night).
pub const WIDE_TARGET_GROUPS: usize = 1024;
/// Chunks a lane of the wide q4/q8 kernels holds at least ([`KernelChoice::wide_min_chunks`]):
/// rows of 512 (the experts' down projection, 16 chunks) take 4 lanes, rows of 2048 (64 chunks)
/// 8. H200, same model, one call (with [`WIDE_TARGET_GROUPS`]): 16 rows 7.25 → 6.52 ms, 32 rows
/// 11.86 → 10.26 (expert down 2,491 → 1,388 µs at 32 rows, gate/up 2,811 → 2,320); 4 gave 6.70 /
/// 10.76, 2 6.77 / 11.05, 16 7.26 / 10.39.
pub const WIDE_MIN_CHUNKS: u32 = 8;
/// Logits per LM-head statistics workgroup (a row splits into `vocab.div_ceil(chunk)` parts).
pub const STATS_CHUNK: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelChoice {
    /// Activation rows from which f16/q8/q4 matmuls run on the tensor cores.
    pub coop_min_t: usize,
    /// Split K of tensor-core matmuls with too few tiles to fill the GPU.
    pub coop_split_k: bool,
    /// Activation rows up to which weights of L2 size take the token-blocked gemv (the wide one
    /// for q4/q8) rather than the tiles: 32 since 2026-12-07 (H100, 20-layer LLaDA2.0-mini q4,
    /// one run: a 32-row pass 10.48 → 9.10 GPU ms, once the shared expert stopped riding along
    /// past [`Self::shared_max_t`]; 16 before).
    pub gemv_max_t: usize,
    /// Rows up to which the shared expert runs inside the GEMV expert kernels (as one more expert
    /// column), also bounded by `gemv_max_t`; past them it runs as a dense MLP beside them. Its
    /// column walks the pass's tokens a block at a time, so at 32 rows the dense MLP's gemvs are
    /// faster (H200, 2026-12-06: gate/up 3,569 against 2,814 µs with it inside).
    pub shared_max_t: usize,
    /// Activation rows up to which small f32 weights take the token-blocked gemv.
    pub gemv_f32_max_t: usize,
    /// Weight bytes up to which passes of 5–16 rows take the gemv in token blocks (each block
    /// re-reads the weight) rather than the tiles.
    pub gemv_blocked_max_bytes: u64,
    /// Invocations per weight row of the word-a-lane gemv (shaders/gemv.wgsl) for passes of one
    /// row (16, 32 or 64; blocks of rows keep 16). 32 since 2026-12-07: two rounds of four octets
    /// a lane at 2048 wide where 16 take four; the 1-token pass's 42 gemvs 744 → 699 µs, the pass
    /// 2.60 → 2.55 GPU ms (H200, docs/results/pass21-gemv-cap-lanes.h200.md; 777 → 715 on an H100
    /// the day before). Its old cost, a batch class of its own (bit 25), is gone: one-row passes
    /// are a class of their own anyway (ops/batch_class.rs bit 24).
    pub gemv1_lanes: u32,
    /// Workgroups at most along the word-a-lane gemv's rows (0: one a row group): past them each
    /// workgroup works several row groups in turn (shaders/gemv.wgsl), the same sums. A one-row
    /// LM head [157,184 × 2048] is otherwise 39,296 workgroups of 64 invocations, each of which
    /// lives for one row group's four rounds of loads. Measured slower (H200, 2026-12-07: the
    /// 1-token pass's gemvs 744 µs uncapped, 795 / 774 / 758 / 749 at 1024 / 2048 / 4096 / 8192;
    /// docs/results/pass21-gemv-cap-lanes.h200.md): off.
    pub gemv_max_groups: usize,
    /// Passes of at least this many rows (`None`: none) take the wide q4/q8 gemv
    /// (shaders/gemv_wide.wgsl: 16-byte chunks, activations staged in shared memory) where the
    /// row fits, in place of gemv.wgsl's word-a-lane kernel. H100, 20-layer LLaDA2.0-mini q4, one
    /// run: at 16 rows 2,081 → 1,512 µs a pass (16 lanes a row), at one row 730 → 898 (slower).
    /// From 2 rows since 2026-12-07 (3 before, so that 1- and 2-row passes shared a batch class):
    /// an in-place AR pass is 2 rows, and 16 of them batched (32 rows) took 6.54 ms on the word-a-
    /// lane gemv and 2.83 on the wide one (H100, 4-layer LLaDA2.0-mini q4, `bench batch`);
    /// `edgediff serve` at 16 AR streams 2,960 → 4,176 tokens/s, one stream 1,029 → 1,085; a 2-row
    /// pass alone 3.47 → 3.34 GPU ms (20 layers). One-row passes (next-token AR) are now a class
    /// of their own (ops/batch_class.rs bit 24) and batch among themselves.
    pub gemv_wide_min_t: Option<usize>,
    /// f32 weights (the routers) take the wide gemv (64 lanes a row) at every row count where the
    /// gemv serves them; off: the word-a-lane gemv.
    pub gemv_wide_f32: bool,
    /// Lanes a row of the wide gemv's f32 weights (the routers) takes in passes of one row (64 or
    /// 128; more rows keep 64). At one row a router [256 × 2048] at 64 lanes is 32 workgroups of
    /// 8 rows, each lane eight rounds of loads: far too few workgroups for 2 MB. 128 lanes make it
    /// 64 workgroups of 4 rows with four rounds: the 19 routers 265 → 229 µs a 1-token pass, the
    /// pass 2.60 → 2.56 GPU ms (H200, docs/results/pass21-gemv-cap-lanes.h200.md); 128 since.
    /// One-row passes are a batch class of their own (ops/batch_class.rs bit 24; bit 28 where
    /// that bit is off), so this changes no batched bits.
    pub wide_f32_lanes1: u32,
    /// Invocations per weight row of the wide q4/q8 kernels (4, 8, 16, 32 or 64; 64 measured
    /// slower: 2,520 µs at 16 rows, 7,449 vs 4,994 µs for the experts' gate/up), the most a row
    /// takes where [`Self::wide_min_chunks`] gives short rows fewer.
    pub wide_lanes: u32,
    /// Lanes a row of the dense wide q4/q8 gemv takes (0: as the experts', [`Self::wide_lanes`]
    /// and [`Self::wide_min_chunks`]). The two were tuned together, where the experts' rows
    /// dominated: the dense rows of 2048 got 8 lanes, so each lane loads 8 chunks of 4 rows in 8
    /// dependent rounds, and the 16–32-row passes' attention and router gemvs, small matrices
    /// spread over few workgroups, wait on those rounds (≈ 22 µs a dispatch for 2–4 MB, H100).
    /// More lanes a row mean fewer rounds and more workgroups. The same lanes for every row count
    /// of 2 or more, so batched passes keep their bits (ops/batch_class.rs). Measured (H100,
    /// 20-layer LLaDA2.0-mini q4, one call, 2026-12-07 night): the gemvs at 2 rows 1,199 → 1,075
    /// (16) → 1,050 µs (32), at 32 rows 2,505 → 3,168 → 4,260, where the LM head's more, smaller
    /// workgroups each stage every token block again. A choice by row count would break the
    /// batched bits (16 two-row AR steps batch into 32 rows), so off. Since then the matrices the
    /// gemv reads once (the LM head) keep the experts' lanes, so the knob moves only the attention,
    /// router and dense-MLP matrices; untimed that way.
    pub wide_dense_lanes: u32,
    /// One-row passes take the wide gemv (8-bit activations for q4) for the matrices it reads
    /// once ([`super::ops::matmul::wide_reads_once`]: the LM head), where the rest of the pass
    /// keeps the word-a-lane gemv. The LM head [157,184 × 2048] q4 of a 2-row pass took 101 µs on
    /// the wide gemv and the one-row pass's 224 on the word-a-lane one (H100, 20-layer
    /// LLaDA2.0-mini q4, one run): 65,535 × 2 workgroups of 64 invocations against 2,456 of 128
    /// whose lanes load 16 bytes at a time. An AR step on a diffusion model wants one row's
    /// logits, so its head is a one-row matmul too. One-row passes are a batch class of their own
    /// (ops/batch_class.rs bit 24), and the wide sums do not depend on the rows beside them.
    /// On since 2026-12-08 (H100, one call): the one-row head 225 → 95 µs, the 1-row pass 2.56 →
    /// 2.42 GPU ms; a batched AR pass of 16 sequences that each want their last row's logits
    /// (16 one-row heads gathered into one) 3.94 → 2.55 ms, because its head had taken the
    /// word-a-lane gemv (1,862 µs) by each sequence's one row.
    pub wide_head1: bool,
    /// Dense q4 rows longer than the float staging holds (past 4,096 values, up to 10,912:
    /// ops/matmul.rs `WIDE_Q8_STAGE`) take the wide gemv with 8-bit activations, two tokens a
    /// block at 5,120, rather than the word-a-lane gemv. The one such matrix in the models we
    /// run is LLaDA2.0-mini's dense first layer's down projection [2048 × 5120]: 134 µs of a
    /// 2.99 ms batched 32-row pass on the 4-layer shape (H100, 2026-12-07), 145 of the 20-layer
    /// 32-row pass's 8.9 ms, on the word-a-lane gemv in 8 token blocks. On since 2026-12-08
    /// (H100, one call): that matrix 146 → ≈ 39 µs at 32 rows, the pass 8.93 → 8.78 GPU ms
    /// (16 rows 6.72 → 6.64).
    pub wide_long: bool,
    /// Row sets a dense wide gemv workgroup works against each staged token block (1, 2 or 4;
    /// ops/matmul.rs `wide_row_sets`), for the matrices the grid reads once (the LM head) in
    /// passes of more than one block. The LM head of a 32-row pass is 2,456 workgroups that each
    /// stage all 8 blocks' codes (12 KB a block at 2048 wide: ≈ 240 MB from cache for 90 MB of
    /// weights); with more lanes a row it got slower still (H100: 32 lanes a dense row, the
    /// 32-row pass's gemvs 2.5 → 4.3 ms). More rows a staging cut that traffic. Same sums.
    pub wide_row_sets: u32,
    /// Row sets a wide expert workgroup works against its staged tokens (1, 2 or 4;
    /// moe_gemv_wide.wgsl `ROW_SETS`): gate/up 256 / L columns a set, down 512 / L rows. Each
    /// workgroup first finds its expert (a chain of dependent loads) and stages its tokens' codes,
    /// which the probes put at ≈ 20 % of these kernels at 16 rows (docs/PERF.md); more sets pay
    /// for that once for more rows, in fewer workgroups. Same sums.
    pub moe_row_sets: u32,
    /// The wide q4 kernels (the dense gemvs, and the experts) take 8-bit
    /// activations: a code per value and a power-of-two scale per 32 (backend/q8_act.rs), a
    /// weight chunk's sum integer dot products (dot4I8Packed) instead of 32 floats made from its
    /// nibbles. Changes the sums by the codes' rounding (≤ half a code a value); on since timed
    /// and its quality measured (docs/PERF.md, "8-bit activations in the wide q4 kernels").
    pub wide_q8_act: bool,
    /// Short rows take fewer lanes in the wide q4/q8 kernels, down to 4, so that each lane has at
    /// least this many 16-byte chunks (ops/matmul.rs `row_lanes`; 0: every row `wide_lanes`).
    pub wide_min_chunks: u32,
    /// Workgroups the dense wide gemv aims at (ops/matmul.rs `wide_grid`): a matrix with at least
    /// this many row groups runs one workgroup per row group that loops over the pass's token
    /// blocks, reading its weights from memory once (the others from cache), and so serves up to
    /// `gemv_max_t` rows past `gemv_blocked_max_bytes` (the LM head); a smaller one spreads its
    /// blocks over workgroups until about this many. 0: every block its own workgroup, and the
    /// byte bound for all (before 2026-12-06, night).
    pub wide_target_groups: usize,
    /// The dense wide q4 gemvs with 8-bit activations read codes made once per matmul (one small
    /// dispatch, gemv_wide.wgsl `q8_codes`) instead of every workgroup norming and quantizing the
    /// same float rows: the same bits. Off: slower (H200, 16 rows: the gemvs 1,153 → 904 µs, but
    /// 41 `q8_codes` dispatches 495 µs; the pass 7.58 → 7.80 ms).
    pub wide_q8_once: bool,
    /// The wide q4 expert kernels with 8-bit activations read codes made once a stage instead of
    /// every workgroup quantizing the rows of its expert's tokens: the same bits. A `q8_codes`
    /// dispatch makes the tokens' codes before gate/up; gate/up writes down's codes itself where
    /// its workgroups' columns are whole chunks (else a second `q8_codes` dispatch makes them).
    pub moe_q8_once: bool,
    /// SwiGLU fused into the dense gate_up gemv.
    pub fuse_swiglu: bool,
    /// The MoE combine carries the residual add and the next norm (moe_combine_norm, one
    /// dispatch); off (the default): the combine and add_rms_norm as two. The pair is faster on
    /// an H100 (20-layer LLaDA2.0-mini q4, same run: 350 vs 391 µs a 1-token pass, 412 vs 474 at
    /// 16 tokens; docs/PERF.md): the fused kernel is one latency-bound workgroup per token.
    pub fuse_combine_norm: bool,
    /// Passes whose sequences have at most this many rows run the fused-norm forward
    /// ([`crate::backend::Backend::fuses_norms`]): the qkv and router gemvs norm the residual as
    /// they read it, the o projection and the MoE combine add into it, and the layer's two
    /// add_rms_norm dispatches go (0: off). Up to the gemv's rows (32), where those gemvs serve;
    /// past them the tiles would need the norm and the add back as dispatches of their own (they
    /// fall back to them). 16 before 2026-12-07: at 32 rows 40 dispatches fewer, 9.08 → 8.91 GPU
    /// ms, wall unchanged (H100, 20-layer LLaDA2.0-mini q4; docs/PERF.md).
    pub fuse_norms_max_t: usize,
    /// The routed-expert kernel, forced (`None`: chosen by tokens per expert).
    pub moe: Option<ExpertKernel>,
    /// Weight-row blocks (4 rows each) a GEMV expert workgroup works in turn: more amortise
    /// its expert lookup (a chain of dependent loads before any weight moves), fewer spread
    /// the rows over more workgroups. 1 until a GPU machine measures otherwise.
    pub moe_gemv_blocks: usize,
    /// Invocations a weight row of the GEMV expert kernels (moe_gemv.wgsl) takes in one-row
    /// passes (16 or 32; more rows keep 16): 32 halves each lane's rounds of loads, as 32 lanes
    /// did for the one-row dense gemv ([`Self::gemv1_lanes`]). One-row passes are a batch class
    /// of their own (ops/batch_class.rs bit 24; bit 29 where it is off). Measured slower (H100,
    /// 2026-12-07 night: gate/up 315 → 328 µs a 1-token pass, down 237 → 267): 16.
    pub moe_gemv1_lanes: u32,
    /// Which q4/q8 GEMV expert kernels read 16-byte chunks with the expert's tokens staged in
    /// shared memory (shaders/moe_gemv_wide.wgsl) where the rows fit, in place of moe_gemv.wgsl's.
    /// H100, same run: down 2,942 → 2,557 µs a 16-token pass, gate/up 4,489 → 4,994 (slower;
    /// measured again after 2026-12-06's branch-free loads: see [`MoeWide::Blocks`]).
    pub moe_wide: MoeWide,
    /// Tokens a pass of the list-path GEMV expert kernels holds in registers (1, 2 or 4; the
    /// `CHUNK_T` override of moe_gemv.wgsl): fewer registers let more workgroups share an SM, more
    /// tokens read an expert's rows once for more of its tokens. Same sums either way. H100: with
    /// naga's runtime checks 2 and 4 tied; without them 2 is faster (gate/up 4,084 → 3,387 µs a
    /// 16-token pass, 5,918 → 4,925 at 32; 1 is slower again), so 2 since 2026-12-06.
    pub moe_chunk: u32,
    /// One- and two-row work compiles for its rows (`CHUNK_T` = 1 or 2): the 1-token direct path
    /// of the GEMV expert kernels and the 1- and 2-row dense gemv (two rows also in four-octet
    /// rounds), whose pipelines otherwise hold registers for four. Same sums either way. H100, one
    /// run, with the direct path below: 1 token 3.57 → 3.48 ms, 2 rows 5.05 → 4.44.
    pub lean_one: bool,
    /// Octets a word-a-lane gemv lane (dense at one row, GEMV experts) loads before their
    /// arithmetic: 4, or 8 (fewer dependent rounds, more registers). Same sums. Not yet timed.
    pub gemv_depth: u32,
    /// Passes of at most this many rows over resident experts skip the MoE dispatch lists: the
    /// GEMV expert kernels read the router's ids (a column an assignment). 1 before 2026-12-05.
    pub moe_direct_max_t: usize,
    /// The attention kernel, forced where both apply (`None`: GQA where the head fits it).
    pub attention: Option<AttnKernel>,
    /// The GQA attention kernel loads its K/V rows unconditionally (clamped to the cached rows;
    /// shaders/attention.wgsl `GQA_CLAMP`, where the measurement is): the same values, no branch
    /// around the loads. 0: the loads under the key and column tests, as before 2026-12-06.
    pub attn_clamp: bool,
    /// Workgroups the GQA attention kernel aims at.
    pub attn_groups: usize,
    /// Logits per LM-head statistics workgroup (≥ 64).
    pub stats_chunk: usize,
    /// Expert pool buffers at most this many bytes, below the device's binding limit (the
    /// 128 MiB of many phones on a large GPU: 134217728).
    pub expert_pool_binding: Option<u64>,
    /// Passes of more rows than the gemv's (diffusion blocks, prefill) share batched passes with
    /// passes whose row counts choose the same kernels (ops/batch_class.rs); off: they run alone.
    pub batch_blocks: bool,
    /// The runtime checks naga compiles into the kernels, forced (`None`: [`Self::checks_on`]
    /// picks by backend).
    pub shader_checks: Option<ShaderChecks>,
    /// Measurement probes (shaders/lib/probe.wgsl): bits that leave one stage out of the kernels
    /// that read them, so a timing difference places that stage's cost. Any bit makes every
    /// value wrong; for `bench forward` on the GPU machine only. 0: none. Bit 16
    /// ([`PROBE_EXPERTS_ONLY`]) keeps the others to the expert kernels, so the router's and the
    /// dense matmuls' values stay real and a block's routing stays what it is.
    pub probe: u32,
}

/// [`KernelChoice::probe`]'s bits that reach the kernels (shaders/lib/probe.wgsl's `PROBE`).
pub const PROBE_STAGES: u32 = 15;
/// [`KernelChoice::probe`]'s bit that limits [`PROBE_STAGES`] to the expert kernels.
pub const PROBE_EXPERTS_ONLY: u32 = 16;

impl Default for KernelChoice {
    fn default() -> Self {
        KernelChoice {
            coop_min_t: COOP_MIN_T,
            coop_split_k: true,
            gemv_max_t: 32,
            shared_max_t: super::ops::matmul::GEMV_MAX_T,
            gemv_f32_max_t: GEMV_F32_MAX_T,
            gemv_blocked_max_bytes: super::ops::matmul::GEMV_BLOCKED_MAX_BYTES,
            gemv1_lanes: 32,
            gemv_max_groups: 0,
            gemv_wide_min_t: Some(2),
            gemv_wide_f32: true,
            wide_f32_lanes1: 128,
            wide_lanes: 16,
            wide_dense_lanes: 0,
            wide_head1: true,
            wide_long: true,
            wide_row_sets: 1,
            moe_row_sets: 1,
            wide_q8_act: true,
            wide_min_chunks: WIDE_MIN_CHUNKS,
            wide_target_groups: WIDE_TARGET_GROUPS,
            wide_q8_once: false,
            moe_q8_once: false,
            fuse_swiglu: true,
            fuse_combine_norm: false,
            fuse_norms_max_t: 32,
            moe: None,
            moe_gemv_blocks: 1,
            moe_gemv1_lanes: 16,
            moe_wide: MoeWide::Blocks,
            moe_chunk: 2,
            lean_one: true,
            gemv_depth: 4,
            moe_direct_max_t: 2,
            attention: None,
            attn_clamp: true,
            attn_groups: GQA_TARGET_GROUPS,
            stats_chunk: STATS_CHUNK,
            expert_pool_binding: None,
            batch_blocks: true,
            shader_checks: None,
            probe: 0,
        }
    }
}

impl KernelChoice {
    /// The runtime checks for kernels on `backend`: as forced, else none on Vulkan — whose
    /// robust buffer access (a core feature every driver has, which wgpu turns on) still guards
    /// every buffer read, so naga's clamps only repeat it — and all of them elsewhere (Metal has
    /// no such guard; DX12 binds some buffers without one). H100, 20-layer LLaDA2.0-mini q4, one
    /// run (docs/PERF.md): without them 3.34 → 3.03 ms GPU a 1-token pass, 13.11 → 11.93 at 16
    /// tokens, the tensor-core tiles 1,297 → 820 µs; the loop counters alone cost little, the
    /// index clamps most.
    pub fn checks_on(&self, backend: wgpu::Backend) -> ShaderChecks {
        self.shader_checks.unwrap_or(match backend {
            wgpu::Backend::Vulkan => ShaderChecks::None,
            _ => ShaderChecks::All,
        })
    }

    /// The defaults, overridden by the `EDGEDIFF_*` variables of the module table.
    pub fn from_env() -> Self {
        let k = Self::from_vars(&|name| std::env::var(name).ok());
        if k.probe != 0 {
            tracing::warn!(
                "EDGEDIFF_PROBE={}: the kernels leave stages out for measurement, every result is wrong",
                k.probe
            );
        }
        k
    }

    /// [`Self::from_env`] over any variable lookup. A value that does not parse leaves the
    /// default (these are measurement knobs, not user settings).
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Self {
        let d = Self::default();
        let num = |name: &str| var(name).and_then(|v| v.trim().parse::<u64>().ok());
        let off = |name: &str| var(name).is_some_and(|v| v.trim() == "0");
        KernelChoice {
            coop_min_t: num("EDGEDIFF_COOP_MIN_T").map_or(d.coop_min_t, |v| v as usize),
            coop_split_k: !off("EDGEDIFF_COOP_SPLIT_K"),
            gemv_max_t: num("EDGEDIFF_GEMV_MAX_T")
                .filter(|&n| (4..=64).contains(&n))
                .map_or(d.gemv_max_t, |v| v as usize),
            shared_max_t: num("EDGEDIFF_SHARED_MAX_T").map_or(d.shared_max_t, |v| v as usize),
            gemv_f32_max_t: num("EDGEDIFF_GEMV_F32_MAX_T").map_or(d.gemv_f32_max_t, |v| v as usize),
            gemv_blocked_max_bytes: num("EDGEDIFF_GEMV_BLOCKED_MAX_MB")
                .map_or(d.gemv_blocked_max_bytes, |m| m << 20),
            gemv1_lanes: num("EDGEDIFF_GEMV1_LANES")
                .filter(|&l| matches!(l, 16 | 32 | 64))
                .map_or(d.gemv1_lanes, |l| l as u32),
            gemv_max_groups: num("EDGEDIFF_GEMV_MAX_GROUPS")
                .map_or(d.gemv_max_groups, |n| n as usize),
            gemv_wide_min_t: match var("EDGEDIFF_GEMV_WIDE_MIN_T").as_deref().map(str::trim) {
                Some("off") => None,
                Some(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|&t| t >= 1)
                    .or(d.gemv_wide_min_t),
                None => d.gemv_wide_min_t,
            },
            gemv_wide_f32: !off("EDGEDIFF_GEMV_WIDE_F32"),
            wide_f32_lanes1: num("EDGEDIFF_WIDE_F32_LANES1")
                .filter(|&l| matches!(l, 64 | 128))
                .map_or(d.wide_f32_lanes1, |l| l as u32),
            wide_lanes: num("EDGEDIFF_WIDE_LANES")
                .filter(|&l| matches!(l, 4 | 8 | 16 | 32 | 64))
                .map_or(d.wide_lanes, |l| l as u32),
            moe_row_sets: num("EDGEDIFF_MOE_ROW_SETS")
                .filter(|&n| matches!(n, 1 | 2 | 4))
                .map_or(d.moe_row_sets, |n| n as u32),
            wide_row_sets: num("EDGEDIFF_WIDE_ROW_SETS")
                .filter(|&n| matches!(n, 1 | 2 | 4))
                .map_or(d.wide_row_sets, |n| n as u32),
            wide_head1: var("EDGEDIFF_WIDE_HEAD1").map_or(d.wide_head1, |v| v.trim() == "1"),
            wide_long: var("EDGEDIFF_WIDE_LONG").map_or(d.wide_long, |v| v.trim() == "1"),
            wide_dense_lanes: num("EDGEDIFF_WIDE_DENSE_LANES")
                .filter(|&l| matches!(l, 0 | 4 | 8 | 16 | 32 | 64))
                .map_or(d.wide_dense_lanes, |l| l as u32),
            wide_q8_act: var("EDGEDIFF_WIDE_Q8ACT").map_or(d.wide_q8_act, |v| v.trim() == "1"),
            wide_min_chunks: num("EDGEDIFF_WIDE_MIN_CHUNKS")
                .filter(|&n| n <= 64)
                .map_or(d.wide_min_chunks, |n| n as u32),
            wide_target_groups: num("EDGEDIFF_WIDE_TARGET_GROUPS")
                .map_or(d.wide_target_groups, |n| n as usize),
            wide_q8_once: var("EDGEDIFF_WIDE_Q8_ONCE").map_or(d.wide_q8_once, |v| v.trim() == "1"),
            moe_q8_once: var("EDGEDIFF_MOE_Q8_ONCE").map_or(d.moe_q8_once, |v| v.trim() == "1"),
            fuse_swiglu: !off("EDGEDIFF_FUSE_SWIGLU"),
            fuse_combine_norm: var("EDGEDIFF_FUSE_COMBINE_NORM")
                .map_or(d.fuse_combine_norm, |v| v.trim() == "1"),
            fuse_norms_max_t: num("EDGEDIFF_FUSE_NORMS_MAX_T")
                .filter(|&n| n <= 64)
                .map_or(d.fuse_norms_max_t, |n| n as usize),
            moe: match var("EDGEDIFF_MOE_KERNEL").as_deref().map(str::trim) {
                Some("gemv") => Some(ExpertKernel::Gemv),
                Some("tiled") => Some(ExpertKernel::Tiled),
                _ => None,
            },
            moe_gemv1_lanes: num("EDGEDIFF_MOE_GEMV1_LANES")
                .filter(|&l| matches!(l, 16 | 32))
                .map_or(d.moe_gemv1_lanes, |l| l as u32),
            moe_gemv_blocks: num("EDGEDIFF_MOE_GEMV_BLOCKS")
                .filter(|&n| (1..=256).contains(&n))
                .map_or(d.moe_gemv_blocks, |v| v as usize),
            moe_wide: match var("EDGEDIFF_MOE_WIDE").as_deref().map(str::trim) {
                Some("0") => MoeWide::Off,
                Some("down") => MoeWide::Down,
                Some("blocks") => MoeWide::Blocks,
                Some("all") => MoeWide::All,
                _ => d.moe_wide,
            },
            moe_chunk: num("EDGEDIFF_MOE_CHUNK")
                .filter(|&n| matches!(n, 1 | 2 | 4))
                .map_or(d.moe_chunk, |n| n as u32),
            lean_one: !off("EDGEDIFF_LEAN_ONE"),
            gemv_depth: num("EDGEDIFF_GEMV_DEPTH")
                .filter(|&n| matches!(n, 4 | 8))
                .map_or(d.gemv_depth, |n| n as u32),
            moe_direct_max_t: num("EDGEDIFF_MOE_DIRECT_MAX_T")
                .filter(|&n| (1..=64).contains(&n))
                .map_or(d.moe_direct_max_t, |n| n as usize),
            attention: match var("EDGEDIFF_ATTN_KERNEL").as_deref().map(str::trim) {
                Some("heads") => Some(AttnKernel::Heads),
                Some("gqa") => Some(AttnKernel::Gqa),
                _ => None,
            },
            attn_clamp: match var("EDGEDIFF_ATTN_CLAMP").as_deref().map(str::trim) {
                Some("0") => false,
                Some("1") => true,
                _ => d.attn_clamp,
            },
            attn_groups: num("EDGEDIFF_ATTN_GROUPS")
                .filter(|&n| n > 0)
                .map_or(d.attn_groups, |v| v as usize),
            stats_chunk: num("EDGEDIFF_STATS_CHUNK")
                .filter(|&c| c >= 64)
                .map_or(d.stats_chunk, |v| v as usize),
            expert_pool_binding: num("EDGEDIFF_EXPERT_POOL_BINDING"),
            batch_blocks: !off("EDGEDIFF_BATCH_BLOCKS"),
            shader_checks: match var("EDGEDIFF_SHADER_CHECKS").as_deref().map(str::trim) {
                Some("all") => Some(ShaderChecks::All),
                Some("no-loop-bound") => Some(ShaderChecks::NoLoopBound),
                Some("none") => Some(ShaderChecks::None),
                _ => d.shader_checks,
            },
            probe: num("EDGEDIFF_PROBE")
                .map_or(d.probe, |b| b as u32 & (PROBE_STAGES | PROBE_EXPERTS_ONLY)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> KernelChoice {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        KernelChoice::from_vars(&|name| {
            owned
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn no_variables_give_the_measured_defaults() {
        assert_eq!(from(&[]), KernelChoice::default());
        let d = KernelChoice::default();
        assert!(d.coop_split_k && d.fuse_swiglu && d.moe.is_none() && d.attention.is_none());
        assert!(d.batch_blocks && !d.fuse_combine_norm && d.moe_wide == MoeWide::Blocks);
        assert_eq!((d.gemv1_lanes, d.wide_f32_lanes1), (32, 128));
        assert_eq!(
            (d.gemv_max_t, d.shared_max_t, d.fuse_norms_max_t),
            (32, 16, 32)
        );
        assert_eq!(d.gemv_wide_min_t, Some(2));
    }

    #[test]
    fn runtime_checks_go_on_vulkan_unless_forced() {
        let d = KernelChoice::default();
        assert_eq!(d.checks_on(wgpu::Backend::Vulkan), ShaderChecks::None);
        for b in [wgpu::Backend::Metal, wgpu::Backend::Dx12, wgpu::Backend::Gl] {
            assert_eq!(d.checks_on(b), ShaderChecks::All, "{b:?}");
        }
        let forced = from(&[("EDGEDIFF_SHADER_CHECKS", "all")]);
        assert_eq!(forced.checks_on(wgpu::Backend::Vulkan), ShaderChecks::All);
        let loops = from(&[("EDGEDIFF_SHADER_CHECKS", "no-loop-bound")]);
        assert_eq!(
            loops.checks_on(wgpu::Backend::Metal),
            ShaderChecks::NoLoopBound
        );
    }

    #[test]
    fn each_variable_sets_its_field_and_bad_values_keep_the_default() {
        let k = from(&[
            ("EDGEDIFF_COOP_MIN_T", "32"),
            ("EDGEDIFF_COOP_SPLIT_K", "0"),
            ("EDGEDIFF_GEMV_MAX_T", "64"),
            ("EDGEDIFF_SHARED_MAX_T", "8"),
            ("EDGEDIFF_GEMV_F32_MAX_T", "16"),
            ("EDGEDIFF_GEMV_BLOCKED_MAX_MB", "256"),
            ("EDGEDIFF_GEMV1_LANES", "64"),
            ("EDGEDIFF_GEMV_MAX_GROUPS", "4096"),
            ("EDGEDIFF_GEMV_WIDE_MIN_T", "off"),
            ("EDGEDIFF_GEMV_WIDE_F32", "0"),
            ("EDGEDIFF_WIDE_F32_LANES1", "64"),
            ("EDGEDIFF_WIDE_LANES", "64"),
            ("EDGEDIFF_WIDE_DENSE_LANES", "32"),
            ("EDGEDIFF_WIDE_HEAD1", "0"),
            ("EDGEDIFF_WIDE_LONG", "0"),
            ("EDGEDIFF_WIDE_ROW_SETS", "4"),
            ("EDGEDIFF_MOE_ROW_SETS", "2"),
            ("EDGEDIFF_WIDE_Q8ACT", "1"),
            ("EDGEDIFF_WIDE_MIN_CHUNKS", "4"),
            ("EDGEDIFF_WIDE_TARGET_GROUPS", "0"),
            ("EDGEDIFF_WIDE_Q8_ONCE", "1"),
            ("EDGEDIFF_MOE_Q8_ONCE", "1"),
            ("EDGEDIFF_FUSE_SWIGLU", "0"),
            ("EDGEDIFF_FUSE_COMBINE_NORM", "1"),
            ("EDGEDIFF_FUSE_NORMS_MAX_T", "0"),
            ("EDGEDIFF_MOE_KERNEL", "tiled"),
            ("EDGEDIFF_MOE_GEMV_BLOCKS", "8"),
            ("EDGEDIFF_MOE_GEMV1_LANES", "32"),
            ("EDGEDIFF_MOE_WIDE", "all"),
            ("EDGEDIFF_MOE_CHUNK", "4"),
            ("EDGEDIFF_LEAN_ONE", "0"),
            ("EDGEDIFF_GEMV_DEPTH", "8"),
            ("EDGEDIFF_MOE_DIRECT_MAX_T", "4"),
            ("EDGEDIFF_ATTN_KERNEL", "heads"),
            ("EDGEDIFF_ATTN_GROUPS", "64"),
            ("EDGEDIFF_STATS_CHUNK", "4096"),
            ("EDGEDIFF_EXPERT_POOL_BINDING", "134217728"),
            ("EDGEDIFF_BATCH_BLOCKS", "0"),
            ("EDGEDIFF_SHADER_CHECKS", "none"),
            ("EDGEDIFF_PROBE", "5"),
            ("EDGEDIFF_ATTN_CLAMP", "0"),
        ]);
        assert_eq!(
            k,
            KernelChoice {
                coop_min_t: 32,
                coop_split_k: false,
                gemv_max_t: 64,
                shared_max_t: 8,
                gemv_f32_max_t: 16,
                gemv_blocked_max_bytes: 256 << 20,
                gemv1_lanes: 64,
                gemv_max_groups: 4096,
                gemv_wide_min_t: None,
                gemv_wide_f32: false,
                wide_f32_lanes1: 64,
                wide_lanes: 64,
                wide_dense_lanes: 32,
                wide_head1: false,
                wide_long: false,
                wide_row_sets: 4,
                moe_row_sets: 2,
                wide_q8_act: true,
                wide_min_chunks: 4,
                wide_target_groups: 0,
                wide_q8_once: true,
                moe_q8_once: true,
                fuse_swiglu: false,
                fuse_combine_norm: true,
                fuse_norms_max_t: 0,
                moe: Some(ExpertKernel::Tiled),
                moe_gemv_blocks: 8,
                moe_gemv1_lanes: 32,
                moe_wide: MoeWide::All,
                moe_chunk: 4,
                lean_one: false,
                gemv_depth: 8,
                moe_direct_max_t: 4,
                attention: Some(AttnKernel::Heads),
                attn_groups: 64,
                stats_chunk: 4096,
                expert_pool_binding: Some(134_217_728),
                batch_blocks: false,
                shader_checks: Some(ShaderChecks::None),
                probe: 5,
                attn_clamp: false,
            }
        );
        let k = from(&[
            ("EDGEDIFF_COOP_MIN_T", "many"),
            ("EDGEDIFF_COOP_SPLIT_K", "1"),
            ("EDGEDIFF_FUSE_COMBINE_NORM", "yes"),
            ("EDGEDIFF_FUSE_NORMS_MAX_T", "65"),
            ("EDGEDIFF_GEMV_MAX_T", "3"),
            ("EDGEDIFF_WIDE_DENSE_LANES", "24"),
            ("EDGEDIFF_WIDE_ROW_SETS", "3"),
            ("EDGEDIFF_MOE_KERNEL", "fast"),
            ("EDGEDIFF_MOE_GEMV_BLOCKS", "0"),
            ("EDGEDIFF_MOE_CHUNK", "3"),
            ("EDGEDIFF_ATTN_GROUPS", "0"),
            ("EDGEDIFF_STATS_CHUNK", "8"),
            ("EDGEDIFF_SHADER_CHECKS", "off"),
        ]);
        assert_eq!(k, KernelChoice::default());
        assert_eq!(
            from(&[
                ("EDGEDIFF_MOE_KERNEL", "gemv"),
                ("EDGEDIFF_ATTN_KERNEL", "gqa")
            ]),
            KernelChoice {
                moe: Some(ExpertKernel::Gemv),
                attention: Some(AttnKernel::Gqa),
                ..KernelChoice::default()
            }
        );
    }
}
