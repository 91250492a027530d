//! `edgediff bench forward` on the GPU (lavapipe here): `--shapes` lays each pass's GPU time out
//! by dispatch shape, as many dispatches as the pass counted, and the JSON says so.

use std::process::Command;

#[test]
fn bench_forward_shapes_cover_every_dispatch_of_a_pass() {
    if std::env::var("EDGEDIFF_SKIP_GPU_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("EDGEDIFF_SKIP_GPU_TESTS=1: skipped");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_edgediff");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("llada2.edm");
    let model = model.to_str().unwrap();
    let synth = Command::new(bin)
        .args([
            "synth",
            "--arch",
            "llada2_moe",
            "--dtype",
            "q4",
            "-o",
            model,
        ])
        .output()
        .unwrap();
    assert!(synth.status.success());
    let out = Command::new(bin)
        .args([
            "bench",
            "forward",
            "--model",
            model,
            "--tokens",
            "1,5",
            "--iters",
            "1",
            "--context",
            "9",
            "--copy-mib",
            "0",
            "--json",
            "--shapes",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let passes = v["passes"].as_array().unwrap();
    let shapes = v["shapes"].as_array().unwrap();
    assert_eq!(passes.len(), 2);
    assert_eq!(shapes.len(), 2);
    if v["passes"][0]["gpu_ms"].is_null() {
        return; // no timestamps on this device: nothing to lay out
    }
    for (p, s) in passes.iter().zip(shapes) {
        assert_eq!(p["tokens"], s["tokens"]);
        let parts = s["dispatches"].as_array().unwrap();
        let n: u64 = parts
            .iter()
            .map(|e| e["dispatches"].as_u64().unwrap())
            .sum();
        assert_eq!(Some(n), p["dispatches"].as_u64(), "{s}");
        let us: f64 = parts.iter().map(|e| e["gpu_us"].as_f64().unwrap()).sum();
        let ms = p["gpu_ms"].as_f64().unwrap();
        assert!(
            (us / 1e3 - ms).abs() <= 1e-6 * ms.max(1.0) + 1e-9,
            "{us} µs against {ms} ms"
        );
        // A direct grid has no empty dimension (an indirect one is null).
        for grid in parts.iter().filter_map(|e| e["grid"].as_array()) {
            assert!(grid.iter().all(|d| d.as_u64().unwrap() > 0), "{grid:?}");
        }
    }
}
