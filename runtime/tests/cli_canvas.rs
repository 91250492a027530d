//! `edgediff generate` on a DiffusionGemma file as a user runs it: the canvas decoder is the
//! default, a seeded run repeats, and a decoder the model cannot run is one error line naming
//! the one it can.

use std::path::Path;
use std::process::{Command, Output};

fn edgediff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgediff"))
        .args(args)
        .env_remove("EDGEDIFF_BACKEND")
        .output()
        .expect("running edgediff")
}

fn ok(args: &[&str]) -> (String, String) {
    let out = edgediff(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "edgediff {args:?}: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn synth(dir: &Path, arch: &str) -> String {
    let path = dir.join(format!("{arch}.edm"));
    let path = path.to_str().unwrap().to_string();
    ok(&["synth", "--arch", arch, "--seed", "5", "-o", &path]);
    path
}

#[test]
fn generate_runs_a_diffusion_gemma_file_with_the_canvas_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth(dir.path(), "diffusion_gemma");
    let args = |seed: &'static str| {
        vec![
            "generate",
            "--backend",
            "cpu",
            "--model",
            &model,
            "--max-tokens",
            "12",
            "--steps",
            "4",
            "--seed",
            seed,
            "--ignore-eos",
            "--stats",
            "hello",
        ]
    };
    let (text, stats) = ok(&args("3"));
    assert!(
        stats.contains("decoder: canvas steps=4 γ=0.1 t=0.8→0.4"),
        "{stats}"
    );
    assert!(
        stats.contains("generated 12 tokens, finish: Length"),
        "{stats}"
    );
    assert_eq!(ok(&args("3")).0, text, "a seeded run repeats");
    assert_ne!(ok(&args("4")).0, text, "another seed draws other tokens");

    let wrong = edgediff(&[
        "generate",
        "--backend",
        "cpu",
        "--model",
        &model,
        "--decoder",
        "block",
        "hello",
    ]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(
        stderr.contains("the block decoder cannot run a diffusion_gemma model")
            && stderr.contains("canvas"),
        "{stderr}"
    );

    let masked = synth(dir.path(), "llada2_moe");
    let wrong = edgediff(&[
        "generate",
        "--backend",
        "cpu",
        "--model",
        &masked,
        "--decoder",
        "canvas",
        "--max-tokens",
        "4",
        "hello",
    ]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(
        stderr.contains("the canvas decoder cannot run a llada2_moe model"),
        "{stderr}"
    );
}

#[test]
fn bench_decode_times_the_canvas_decoder_without_an_ar_row() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth(dir.path(), "diffusion_gemma");
    let (table, _) = ok(&[
        "bench",
        "decode",
        "--backend",
        "cpu",
        "--model",
        &model,
        "--max-tokens",
        "6",
        "--steps",
        "2",
    ]);
    assert!(table.contains("No AR baseline"), "{table}");
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| canvas"))
        .collect();
    assert_eq!(rows.len(), 1, "one canvas row: {table}");
    // 4 built-in prompts × 6 tokens, and no speed-up against a baseline that does not exist.
    let cells: Vec<&str> = rows[0].split('|').map(str::trim).collect();
    assert_eq!(cells[3], "24", "{table}");
    assert_eq!(cells[9], "—", "{table}");
    assert!(!table.contains("| ar |"), "{table}");
}
