//! The `edgediff` binary as a user meets it when something is wrong: one error line that says the
//! OS message once with the path, and options the model cannot satisfy refused before any work,
//! naming the limit and the flag to change.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn edgediff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgediff"))
        .args(args)
        .env_remove("EDGEDIFF_BACKEND")
        .output()
        .expect("running edgediff")
}

/// The stderr of a run that must fail.
fn failure(args: &[&str]) -> String {
    let out = edgediff(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "edgediff {args:?} succeeded; stderr: {stderr}"
    );
    stderr
}

/// The OS's message for a missing file, as `std::io::Error` prints it.
fn not_found_message(path: &Path) -> String {
    std::fs::File::open(path).unwrap_err().to_string()
}

/// A tiny synthetic model (context 512), written once for this test binary.
fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.edm");
        let out = edgediff(&[
            "synth",
            "--arch",
            "qwen3_moe",
            "--seed",
            "3",
            "-o",
            path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "synth: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, path)
    });
    path
}

#[test]
fn a_missing_model_file_says_the_os_message_once_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexistent.edm");
    let stderr = failure(&[
        "generate",
        "--backend",
        "cpu",
        "--model",
        missing.to_str().unwrap(),
        "hi",
    ]);
    let os = not_found_message(&missing);
    assert_eq!(stderr.matches(&os).count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches(missing.to_str().unwrap()).count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn converting_a_directory_without_config_json_says_the_os_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    std::fs::create_dir(&checkpoint).unwrap();
    let out = dir.path().join("out.edm");
    let stderr = failure(&[
        "convert",
        checkpoint.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let os = not_found_message(&checkpoint.join("config.json"));
    assert_eq!(stderr.matches(&os).count(), 1, "{stderr}");
    assert!(stderr.contains("config.json"), "{stderr}");
}

#[test]
fn bench_forward_past_the_model_context_is_refused_before_any_set_up() {
    let model = tiny_model().to_str().unwrap();
    for what in ["forward", "kernels"] {
        let stderr = failure(&[
            "bench",
            what,
            "--model",
            model,
            "--context",
            "1024",
            "--copy-mib",
            "0",
        ]);
        assert!(
            stderr.contains("--context 1024")
                && stderr.contains("the model's context is 512")
                && stderr.contains("lower --context to at most 448"),
            "bench {what}: {stderr}"
        );
        // Refused before a GPU was started (which announces "device: …").
        assert!(!stderr.contains("device:"), "bench {what}: {stderr}");
    }
    let stderr = failure(&["bench", "forward", "--model", model, "--tokens", "0,4"]);
    assert!(stderr.contains("--tokens 0"), "{stderr}");
}

#[test]
fn decoding_flags_past_the_model_context_name_the_flag() {
    let model = tiny_model().to_str().unwrap();
    let stderr = failure(&[
        "generate",
        "--backend",
        "cpu",
        "--model",
        model,
        "--max-tokens",
        "600",
        "hi",
    ]);
    assert!(
        stderr.contains("--max-tokens 600") && stderr.contains("at most 511"),
        "{stderr}"
    );
    let stderr = failure(&[
        "generate",
        "--backend",
        "cpu",
        "--model",
        model,
        "--block-size",
        "1024",
        "hi",
    ]);
    assert!(
        stderr.contains("--block-size 1024") && stderr.contains("512"),
        "{stderr}"
    );
    let long_prompt = "the quick brown fox jumps over the lazy dog ".repeat(100);
    let stderr = failure(&[
        "generate",
        "--backend",
        "cpu",
        "--model",
        model,
        "--max-tokens",
        "16",
        &long_prompt,
    ]);
    assert!(
        stderr.contains("the prompt is") && stderr.contains("lower --max-tokens"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, format!("short\n{long_prompt}\n")).unwrap();
    let stderr = failure(&[
        "bench",
        "decode",
        "--backend",
        "cpu",
        "--model",
        model,
        "--max-tokens",
        "16",
        "--prompts",
        prompts.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("prompt 2 is") && stderr.contains("lower --max-tokens"),
        "{stderr}"
    );
    let stderr = failure(&["bench", "experts", "--model", model, "--max-tokens", "512"]);
    assert!(stderr.contains("--max-tokens 512"), "{stderr}");
}
