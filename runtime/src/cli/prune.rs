//! `edgediff prune`: keep a resident subset of experts per layer, written as a new model file.

use std::path::PathBuf;

use anyhow::Context;

use crate::experts::{prune, KeepSpec, Profile, ResidentSet, Selector};
use crate::format::EdmFile;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (not modified).
    #[arg(long)]
    pub model: PathBuf,
    /// Routing profile from `edgediff profile` (for the mass and frequency selectors).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Experts kept per MoE layer: a percentage (12.5%), a count (32) or a byte budget for the whole
    /// model (1.5GB, 800MiB).
    #[arg(long)]
    pub keep: String,
    /// mass: router probability mass (EMO); frequency: tokens routed; random: the control.
    #[arg(long, default_value = "mass", value_parser = ["mass", "frequency", "random"])]
    pub selector: String,
    /// EMO's layer-wise greedy selection: re-profile layer l+1 with layers ≤ l pruned (needs --corpus).
    #[arg(long, requires = "corpus")]
    pub greedy: bool,
    /// Corpus for --greedy (files or directories).
    #[arg(long, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output model file.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    super::check_output_differs(&a.model, &a.output)?;
    let file = EdmFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let keep: KeepSpec = a.keep.parse()?;
    let count = prune::keep_count(&file, keep)?;
    let selector = match a.selector.as_str() {
        "frequency" => Selector::Frequency,
        "random" => Selector::Random { seed: a.seed },
        _ => Selector::Mass,
    };
    let set = if a.greedy {
        if selector != Selector::Mass {
            anyhow::bail!("--greedy selects by router-probability mass; drop --selector");
        }
        let docs = super::profile::read_corpus(&file, &a.corpus, 4096)?;
        let mut scratch = a.output.clone().into_os_string();
        scratch.push(".greedy-scratch");
        let bar = super::progress_bar(file.header.experts.len() as u64, "greedy selection");
        let set = prune::select_greedy(
            &file,
            &docs,
            count,
            256,
            std::path::Path::new(&scratch),
            |d, _| bar.set_position(d as u64),
        )?;
        bar.finish_and_clear();
        set
    } else {
        let profile = match (&a.profile, selector) {
            (Some(p), _) => Profile::load(p, &file)?,
            (None, Selector::Random { .. }) => Profile::empty(&file)?,
            (None, _) => anyhow::bail!(
                "--selector {} needs --profile (or use --greedy --corpus)",
                a.selector
            ),
        };
        let layers = file
            .header
            .experts
            .iter()
            .map(|t| {
                Ok((
                    t.layer,
                    prune::select_layer(&profile, t.layer, count, selector)?,
                ))
            })
            .collect::<Result<Vec<_>, crate::experts::ExpertsError>>()?;
        ResidentSet { layers }
    };
    let provenance = serde_json::json!({
        "selector": if a.greedy { "mass-greedy" } else { a.selector.as_str() },
        "keep": a.keep,
        "per_layer": count,
        "profile": a.profile.as_ref().map(|p| p.display().to_string()),
        "seed": a.seed,
    });
    let bytes = prune::prune_file(&file, &a.output, &set, provenance)?;
    println!(
        "wrote {} ({}; {count} of {} experts per layer, was {})",
        a.output.display(),
        super::human_bytes(bytes),
        file.header.metadata.config.moe.num_experts,
        super::human_bytes(file.file_len())
    );
    Ok(())
}
