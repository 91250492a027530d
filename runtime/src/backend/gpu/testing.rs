//! Test support shared by the unit tests and `tests/tests/gpu_*.rs`: the GPU configurations every
//! GPU test runs on. No adapter is a loud failure (CI has lavapipe); only
//! `EDGEDIFF_SKIP_GPU_TESTS=1` skips, and says so.

use super::{GpuBackend, GpuOptions};

/// Whether GPU tests were explicitly switched off.
pub fn skip_requested() -> bool {
    std::env::var("EDGEDIFF_SKIP_GPU_TESTS").is_ok_and(|v| v == "1")
}

/// The configurations to test: the device with its optional features, and (when it has any) the
/// same device with SHADER_F16, SUBGROUP and cooperative matrices switched off. Outputs are
/// poisoned with NaN. The second configuration also submits after every dispatch and gives every
/// dispatch its own compute pass, so both recording modes meet every test.
/// `max_binding` caps storage bindings (tests of weight splitting).
pub fn backends(max_binding: Option<u64>) -> Vec<(String, GpuBackend)> {
    backends_with(GpuOptions {
        poison: true,
        max_binding,
        ..GpuOptions::from_env()
    })
}

/// [`backends`] from `base` (a kernel choice other than the default, say); the second
/// configuration switches off what [`backends`]' does.
pub fn backends_with(base: GpuOptions) -> Vec<(String, GpuBackend)> {
    if skip_requested() {
        eprintln!("EDGEDIFF_SKIP_GPU_TESTS=1: GPU tests skipped");
        return Vec::new();
    }
    let first = GpuBackend::new(&base).unwrap_or_else(|e| {
        panic!("GPU tests need an adapter ({e}); set EDGEDIFF_SKIP_GPU_TESTS=1 to skip them")
    });
    let caps = first.caps();
    let mut out = vec![(
        format!(
            "{} [f16 {}, subgroups {}, coop {}]",
            first.device_name(),
            caps.f16,
            caps.subgroups,
            caps.coop
        ),
        first,
    )];
    if caps.f16 || caps.subgroups || caps.coop {
        let off = GpuOptions {
            disable_f16: true,
            disable_subgroups: true,
            disable_coop: true,
            submit_every: 1,
            pass_per_dispatch: true,
            ..base
        };
        let b = GpuBackend::new(&off).expect("the same adapter without optional features");
        out.push((
            format!("{} [no f16, no subgroups, no coop]", b.device_name()),
            b,
        ));
    }
    out
}

/// ‖a − b‖ / ‖b‖ (0 when both are 0); NaN anywhere gives NaN.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if num == 0.0 {
        return if a.iter().any(|v| v.is_nan()) {
            f32::NAN
        } else {
            0.0
        };
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt() as f32
}
