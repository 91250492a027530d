// Layout of the MoE dispatch metadata (u32 words), written by moe_dispatch and read by the expert
// and combine kernels. E experts, A = tokens · top_k assignments.
//   [0..3)  indirect dispatch args of expert_gate_up   [3..6) those of expert_down
//   [6]     experts with at least one token             [7]    unused
//   counts[E]   tokens per expert                       offsets[E] first list entry of each expert
//   cursor[E]   scatter cursors                         active[E]  experts with tokens, ascending
//   list[A]     assignments (t · top_k + j) grouped by expert
//   slot_of[A]  list position of each assignment
const META_HEAD: u32 = 8u;

fn meta_counts(ne: u32) -> u32 {
    return META_HEAD;
}
fn meta_offsets(ne: u32) -> u32 {
    return META_HEAD + ne;
}
fn meta_cursor(ne: u32) -> u32 {
    return META_HEAD + 2u * ne;
}
fn meta_active(ne: u32) -> u32 {
    return META_HEAD + 3u * ne;
}
fn meta_list(ne: u32) -> u32 {
    return META_HEAD + 4u * ne;
}
// `na`: the number of assignments (the list's length).
fn meta_slot_of(ne: u32, na: u32) -> u32 {
    return META_HEAD + 4u * ne + na;
}

// Uniform of the grouped expert kernels (matmul.wgsl's tiled ones, moe_gemv.wgsl's GEMV ones);
// ops/matmul.rs ExpertParams on the host.
struct ExpertParams {
    slot0: u32,
    num_experts: u32,
    pool: u32,
    top_k: u32,
    k: u32,
    n: u32,
    part: u32,
    scales: u32,
    assignments: u32,
    // The GEMV kernels' shared expert (moe_gemv.wgsl): the grid column that computes it (NONE:
    // none), its scales' word in the shared weight binding, the tokens it serves (all of them).
    shared_x: u32,
    shared_scales: u32,
    tokens: u32,
    // The GEMV kernels' direct path (one token over resident experts, ops/moe.rs): grid column a
    // is assignment a, and route_meta holds the router's ids [top_k] instead of the lists.
    direct: u32,
    // The GEMV kernels' weight-row blocks per workgroup (EDGEDIFF_MOE_GEMV_BLOCKS): a workgroup
    // works blocks wid.y · row_blocks + 0.. in turn, paying the expert lookup once for them.
    row_blocks: u32,
    // The wide GEMV expert kernels (moe_gemv_wide.wgsl): invocations per weight row (16 or 64),
    // tokens a staged block.
    lanes: u32,
    tile_t: u32,
}
