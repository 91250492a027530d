//! The `edgediff` command line: one subcommand per file, errors reported with context here at the
//! boundary (the library returns typed errors).

mod bench;
mod bench_batch;
mod bench_canvas;
mod bench_common;
mod bench_decode;
mod bench_experts;
mod chat;
mod convert;
mod devices;
mod eval;
mod forward;
mod generate;
mod inspect;
mod limits;
mod profile;
mod prune;
mod reason;
pub mod report;
mod serve;
mod synth;

use clap::{Parser, Subcommand};

/// Runs `$body` with `$b` bound to the backend `$choice` resolves to (see
/// [`crate::engine::BackendPick`]), for commands that drive a `Model` directly rather than an
/// engine. Auto's fallback to the CPU is announced in one line on stderr, as the engine does.
macro_rules! on_backend {
    ($choice:expr, $b:ident => $body:expr) => {
        match crate::engine::BackendPick::resolve($choice)? {
            crate::engine::BackendPick::Gpu($b) => {
                let $b = *$b;
                $body
            }
            crate::engine::BackendPick::Cpu { notice } => {
                if let Some(n) = notice {
                    eprintln!("edgediff: {n}");
                }
                let $b = crate::backend::cpu::CpuBackend;
                $body
            }
        }
    };
}
pub(crate) use on_backend;

#[derive(Parser)]
#[command(
    name = "edgediff",
    version,
    about = "On-device runtime for Mixture-of-Experts diffusion language models",
    long_about = "edgediff runs MoE diffusion language models from one model file (*.edm).\n\n\
        Typical flow: `edgediff convert <hf_dir> -o model.edm` (or `edgediff synth` for a random test \
        model), `edgediff inspect model.edm`, then `edgediff forward` to look at logits."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Convert a Hugging Face checkpoint directory into a model file.
    Convert(convert::Args),
    /// Write a deterministic random model (and optionally the same model as an HF checkpoint).
    Synth(Box<synth::Args>),
    /// Describe a model file: architecture, parameters, bytes by kind, expert layout, tokenizer.
    Inspect(inspect::Args),
    /// Run one forward pass and print logits (debugging, external checks).
    Forward(forward::Args),
    /// List GPU adapters with their features and limits, and the one the GPU backend would use.
    Devices(devices::Args),
    /// Generate text from a prompt, streamed as blocks commit.
    Generate(Box<generate::Args>),
    /// Multi-turn chat through the model's chat template (one user turn per stdin line).
    Chat(Box<chat::Args>),
    /// Benchmarks: `bench decode` compares every decoder and policy with AR.
    Bench(Box<bench_decode::Args>),
    /// Masked-token accuracy and likelihood bounds per domain (JSON, SVG curves).
    Eval(eval::Args),
    /// Record which experts a model routes to over a calibration corpus.
    Profile(profile::Args),
    /// Keep a resident subset of experts per layer (EMO-style), written as a new model file.
    Prune(prune::Args),
    /// Markovian RSA: N reasoning traces per round, recursive aggregation of K tails, bounded KV.
    Reason(Box<reason::Args>),
    /// An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, SSE streaming).
    Serve(Box<serve::Args>),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // Compiled GPU pipelines are kept between runs in the user's cache directory
    // (EDGEDIFF_PIPELINE_CACHE=<dir> moves it, =off keeps none).
    crate::backend::gpu::set_default_pipeline_cache(crate::backend::gpu::user_pipeline_cache());
    match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Synth(a) => synth::run(*a),
        Command::Inspect(a) => inspect::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Devices(a) => devices::run(a),
        Command::Generate(a) => generate::run(*a),
        Command::Chat(a) => chat::run(*a),
        Command::Bench(a) => bench_decode::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Profile(a) => profile::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Reason(a) => reason::run(*a),
        Command::Serve(a) => serve::run(*a),
    }
}

/// A progress bar over `total` steps, hidden when stderr is not a terminal.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Refuses to write over an input: nothing a user gave is modified in place.
pub fn check_output_differs(
    input: &std::path::Path,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            anyhow::bail!(
                "output {} is the input file; choose another path",
                output.display()
            );
        }
    }
    Ok(())
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
