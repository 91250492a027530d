// Flat invocation index of a 64-wide workgroup in a grid folded into x × y (ops' Grid::Linear
// folds past 65535 workgroups along x).

fn flat_index(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * 64u + lid;
}
