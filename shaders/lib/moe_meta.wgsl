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
