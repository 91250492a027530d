//! Fixtures the integration tests share.

use std::path::{Path, PathBuf};

use edgediff::format::DType;
use edgediff::model::Architecture;
use edgediff::synth::{self, SynthSpec};

/// A tiny `arch` MoE written as q4 into `dir`, wide enough (hidden 1088, expert rows of 512) that
/// the GPU's passes of several rows take the wide kernels with 8-bit activation codes.
pub fn write_wide_q4(dir: &Path, arch: Architecture) -> PathBuf {
    let spec = SynthSpec {
        hidden: 1088,
        expert_ffn: 512,
        ..SynthSpec::tiny(arch)
    };
    let path = dir.join(format!("wide-{arch}-q4.edm"));
    synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::Q4, &|_, _| {}).unwrap();
    path
}
