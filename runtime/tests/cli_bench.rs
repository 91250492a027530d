//! The GPU bench commands (lavapipe here). `bench batch`: each point times S sequences' passes
//! one after another and as one batched pass, and the batched pass gives every sequence its
//! statistics bit for bit; AR passes batch, and so do 7-token blocks unless
//! `EDGEDIFF_BATCH_BLOCKS=0` keeps them apart. Passes that want only their last row
//! (`--last-row`, as AR steps) batch exactly too. `bench forward --shapes` lays each pass's GPU time
//! out by dispatch shape, as many dispatches as the pass counted.

use std::process::{Command, Output};

fn edgediff(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgediff"));
    c.args(args).env_remove("EDGEDIFF_BATCH_BLOCKS");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running edgediff")
}

/// A small LLaDA2-shaped q4 model in a temporary directory (kept alive by the first), its path;
/// `None` under `EDGEDIFF_SKIP_GPU_TESTS=1`, saying so.
fn gpu_model() -> Option<(tempfile::TempDir, String)> {
    if std::env::var("EDGEDIFF_SKIP_GPU_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("EDGEDIFF_SKIP_GPU_TESTS=1: skipped");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("llada2.edm").to_str().unwrap().to_string();
    let args = [
        "synth",
        "--arch",
        "llada2_moe",
        "--dtype",
        "q4",
        "-o",
        &model,
    ];
    assert!(edgediff(&args, &[]).status.success());
    Some((dir, model))
}

/// `bench batch --json` with `flags` added: its whole report.
fn bench_batch(model: &str, env: &[(&str, &str)], flags: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "batch",
        "--model",
        model,
        "--tokens",
        "1,7",
        "--sequences",
        "1,3",
        "--context",
        "9",
        "--iters",
        "1",
        "--copy-mib",
        "0",
        "--json",
    ];
    args.extend_from_slice(flags);
    let out = edgediff(&args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench batch {env:?} {flags:?}: {stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_batch_times_batched_passes_and_checks_them_against_alone() {
    let Some((_dir, model)) = gpu_model() else {
        return;
    };
    let model = model.as_str();
    let shape = |p: &serde_json::Value| (p["tokens"].as_u64(), p["sequences"].as_u64());
    let report = bench_batch(model, &[], &["--shapes"]);
    assert_eq!(report["last_row"], false);
    let on = report["points"].as_array().unwrap();
    assert_eq!(
        on.iter().map(shape).collect::<Vec<_>>(),
        [(1, 1), (1, 3), (7, 1), (7, 3)].map(|(t, s)| (Some(t), Some(s)))
    );
    for p in on {
        assert!(p["alone_ms"].as_f64().unwrap() > 0.0);
        if p["sequences"] == 3 {
            assert_eq!(p["exact"], true, "{p}");
            let (alone, batched) = (&p["alone_dispatches"], &p["batched_dispatches"]);
            assert!(batched.as_u64().unwrap() < alone.as_u64().unwrap(), "{p}");
        } else {
            assert!(p["batched_ms"].is_null(), "{p}");
        }
    }
    // --shapes: one pass of each point laid out by dispatch shape, as many dispatches as the
    // timed passes counted (the arena's batched pass where sequences share one). Empty only on
    // a device without timestamps.
    let timed = on
        .iter()
        .any(|p| !p["shapes"].as_array().unwrap().is_empty());
    for p in on.iter().filter(|_| timed) {
        let n: u64 = p["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["dispatches"].as_u64().unwrap())
            .sum();
        let want = match p["sequences"].as_u64() {
            Some(1) => &p["alone_dispatches"],
            _ if p["arena_dispatches"].is_null() => &p["batched_dispatches"],
            _ => &p["arena_dispatches"],
        };
        assert_eq!(Some(n), want.as_u64(), "{p}");
    }
    let apart = bench_batch(model, &[("EDGEDIFF_BATCH_BLOCKS", "0")], &[])["points"].clone();
    assert_eq!(apart[1]["exact"], true, "AR passes still batch");
    assert!(apart[3]["batched_ms"].is_null(), "{}", apart[3]);
    // --last-row: each pass wants its last row's statistics (an AR step's), still exact.
    let last = bench_batch(model, &[], &["--last-row"]);
    assert_eq!(last["last_row"], true);
    for p in last["points"].as_array().unwrap() {
        if p["sequences"] == 3 {
            assert_eq!(p["exact"], true, "--last-row: {p}");
        }
    }
}

#[test]
fn bench_forward_shapes_cover_every_dispatch_of_a_pass() {
    let Some((_dir, model)) = gpu_model() else {
        return;
    };
    let args = [
        "bench",
        "forward",
        "--model",
        &model,
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
    ];
    let out = edgediff(&args, &[]);
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
