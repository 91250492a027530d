// Measurement probes (`EDGEDIFF_PROBE`, KernelChoice::probe; benchmarks only): each bit leaves one
// stage out of the kernels that read it, so that the time a stage costs is the difference of two
// timed passes. Any bit makes the values wrong; 0, the default, is every real run.
//   1  q4/q8 weights are not decoded: a word's bits become one float with two operations and no
//      scale is read (lib/dequant.wgsl's w_oct, lib/wide_gemv.wgsl's word_dot and chunk_scale);
//   2  activations are not loaded (lib/act_dot.wgsl, the wide kernels' staging);
//   4  the GEMV expert kernels stop right after finding their expert (expert_begin);
//   8  attention loads no K/V rows (attend_gqa);
//  16  (host side) the other bits reach only the expert kernels (moe_gemv*.wgsl), so the routing
//      of a probed block stays the real one.
override PROBE: u32 = 0u;

// A finite float from a word's bits, ±[1, 2) signed by its top bit: the probes' stand-in for
// decoded weights (signed, so that hidden states and routing stay as varied as the real ones').
fn probe_float(w: u32) -> f32 {
    return bitcast<f32>((w & 0x807fffffu) | 0x3f800000u);
}
