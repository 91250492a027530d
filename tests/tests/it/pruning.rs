//! Pruned models (EMO-style resident subsets): only resident experts are stored and routed to,
//! keeping all of them changes nothing, and bad profiles or budgets are clear errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::AttnMask;
use edgediff::experts::{prune, ExpertsError, KeepSpec, Profile, ResidentSet, Selector};
use edgediff::format::{DType, EdmFile};
use edgediff::model::{Architecture, ForwardOutput, ForwardRequest, Model, Window};
use edgediff::synth::{self, SynthSpec};

const TOKENS: [u32; 10] = [1, 40, 77, 300, 12, 90, 41, 7, 250, 33];

fn synth_model(dir: &Path, arch: Architecture, seed: u64) -> PathBuf {
    let spec = SynthSpec {
        experts: 16,
        seed,
        ..SynthSpec::tiny(arch)
    };
    let path = dir.join(format!("{arch}-{seed}.edm"));
    synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::F32, &|_, _| {}).unwrap();
    path
}

fn profile_of(path: &Path) -> Profile {
    let file = Arc::new(EdmFile::open(path).unwrap());
    let model = Model::load(&CpuBackend, file.clone(), &|_, _| true).unwrap();
    let mut p = Profile::empty(&file).unwrap();
    p.add_document(&CpuBackend, &model, &TOKENS, 8).unwrap();
    p
}

fn run(path: &Path) -> ForwardOutput {
    let file = Arc::new(EdmFile::open(path).unwrap());
    let model = Model::load(&CpuBackend, file, &|_, _| true).unwrap();
    let mut kv = model.new_kv(&CpuBackend, 32).unwrap();
    let want = ForwardRequest {
        rows: None,
        logits: true,
        routing: true,
        ..Default::default()
    };
    model
        .forward(
            &CpuBackend,
            &mut kv,
            &TOKENS,
            Window::block(0, TOKENS.len(), AttnMask::BlockCausal(4)),
            &want,
        )
        .unwrap()
}

fn prune_to(input: &Path, out: &Path, keep: &str, selector: Selector) -> ResidentSet {
    let file = EdmFile::open(input).unwrap();
    let count = prune::keep_count(&file, keep.parse().unwrap()).unwrap();
    let profile = profile_of(input);
    let layers = file
        .header
        .experts
        .iter()
        .map(|t| {
            (
                t.layer,
                prune::select_layer(&profile, t.layer, count, selector).unwrap(),
            )
        })
        .collect();
    let set = ResidentSet { layers };
    prune::prune_file(&file, out, &set, serde_json::json!({})).unwrap();
    set
}

#[test]
fn pruned_models_route_only_to_resident_experts_and_store_no_others() {
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let input = synth_model(dir.path(), arch, 1);
        let out = dir.path().join(format!("{arch}-25.edm"));
        let set = prune_to(&input, &out, "25%", Selector::Mass);
        let pruned = EdmFile::open(&out).unwrap();
        for t in &pruned.header.experts {
            for e in 0..16 {
                assert_eq!(
                    pruned.expert_range(t.layer, e).is_some(),
                    set.is_resident(t.layer, e)
                );
            }
            assert_eq!(
                t.offsets.iter().flatten().count(),
                4,
                "{arch}: 25 % of 16 experts"
            );
        }
        assert!(pruned.file_len() < EdmFile::open(&input).unwrap().file_len());
        let routing = run(&out).routing;
        assert!(!routing.is_empty());
        for (layer, ids, _) in routing {
            for e in ids {
                assert!(
                    set.is_resident(layer, e as usize),
                    "{arch}: layer {layer} routed to pruned expert {e}"
                );
            }
        }
    }
}

#[test]
fn keeping_every_expert_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // ZAYA1 included: its MLP router's skip class (id num_experts) is no expert and stays
    // selectable in a pruned file.
    for arch in Architecture::ALL {
        let input = synth_model(dir.path(), arch, 2);
        let out = dir.path().join(format!("{arch}-all.edm"));
        prune_to(&input, &out, "100%", Selector::Frequency);
        assert_eq!(run(&out).logits, run(&input).logits, "{arch}");
    }
}

#[test]
fn keep_specs_parse_fractions_counts_and_budgets() {
    assert_eq!(
        "12.5%".parse::<KeepSpec>().unwrap(),
        KeepSpec::Fraction(0.125)
    );
    assert_eq!("32".parse::<KeepSpec>().unwrap(), KeepSpec::PerLayer(32));
    assert_eq!(
        "1.5GB".parse::<KeepSpec>().unwrap(),
        KeepSpec::Bytes(1_500_000_000)
    );
    assert_eq!(
        "2MiB".parse::<KeepSpec>().unwrap(),
        KeepSpec::Bytes(2 << 20)
    );
    for bad in ["0%", "120%", "-3", "lots", "0"] {
        assert!(
            matches!(bad.parse::<KeepSpec>(), Err(ExpertsError::BadKeep(_))),
            "{bad}"
        );
    }
}

#[test]
fn budgets_below_the_dense_weights_or_top_k_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = EdmFile::open(synth_model(dir.path(), Architecture::Olmoe, 3)).unwrap();
    for keep in [
        KeepSpec::Bytes(1000),
        KeepSpec::PerLayer(1),
        KeepSpec::Fraction(0.01),
    ] {
        assert!(
            matches!(
                prune::keep_count(&file, keep),
                Err(ExpertsError::BudgetTooSmall(_))
            ),
            "{keep:?}"
        );
    }
}

#[test]
fn profiles_of_other_models_and_corrupt_profiles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth_model(dir.path(), Architecture::Qwen3Moe, 4);
    let b = synth_model(dir.path(), Architecture::Qwen3Moe, 5);
    let pa = dir.path().join("a.profile.json");
    profile_of(&a).save(&pa).unwrap();
    let fb = EdmFile::open(&b).unwrap();
    assert!(matches!(
        Profile::load(&pa, &fb),
        Err(ExpertsError::ProfileMismatch { .. })
    ));
    let fa = EdmFile::open(&a).unwrap();
    assert!(Profile::load(&pa, &fa).is_ok());
    let text = std::fs::read_to_string(&pa).unwrap();
    std::fs::write(&pa, &text[..text.len() / 2]).unwrap();
    assert!(matches!(
        Profile::load(&pa, &fa),
        Err(ExpertsError::BadProfile(_))
    ));
    let mut p = profile_of(&a);
    p.layers[0].mass[0] = -1.0;
    p.save(&pa).unwrap();
    assert!(matches!(
        Profile::load(&pa, &fa),
        Err(ExpertsError::BadProfile(_))
    ));
}

#[test]
fn a_pruned_model_is_not_pruned_again() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_model(dir.path(), Architecture::Llada2Moe, 6);
    let once = dir.path().join("once.edm");
    let set = prune_to(&input, &once, "50%", Selector::Random { seed: 1 });
    let err = prune::prune_file(
        &EdmFile::open(&once).unwrap(),
        &dir.path().join("twice.edm"),
        &set,
        serde_json::json!({}),
    );
    assert!(matches!(err, Err(ExpertsError::AlreadyPruned)));
}

/// A profile applied at load time (`EngineConfig::resident`, `--resident-profile`) keeps the
/// experts `prune` keeps and masks the router the same way: the engine writes exactly the pruned
/// file's tokens, with every expert loaded or paged through a pool; a missing profile, another
/// model's profile and an already pruned file are typed errors.
#[test]
fn a_resident_profile_at_load_time_decodes_like_the_pruned_file() {
    use edgediff::decode::{DecodeParams, DecoderKind};
    use edgediff::engine::EngineError;
    use edgediff::engine::{Engine, EngineConfig, Prompt, ResidentProfile};
    use edgediff::experts::ExpertMemory;

    let dir = tempfile::tempdir().unwrap();
    let tokens = |path: &Path, config: &EngineConfig| -> Vec<u32> {
        let e = Engine::open(CpuBackend, Arc::new(EdmFile::open(path).unwrap()), config).unwrap();
        let mut r = e.request(Prompt::Text("the quick brown fox".into()));
        r.decoding = DecodeParams {
            decoder: DecoderKind::Ar,
            max_new_tokens: 12,
            ignore_eos: true,
            ..e.default_decoding()
        };
        e.generate(&r, &mut |_| {}).unwrap().tokens
    };
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        let path = synth_model(dir.path(), arch, 11);
        let profile_path = dir.path().join(format!("{arch}.profile.json"));
        profile_of(&path).save(&profile_path).unwrap();
        let keep: KeepSpec = "25%".parse().unwrap();
        let file = EdmFile::open(&path).unwrap();
        let set = prune::resident_from_profile(
            &file,
            &Profile::load(&profile_path, &file).unwrap(),
            keep,
        )
        .unwrap();
        let pruned = dir.path().join(format!("{arch}.pruned.edm"));
        prune::prune_file(&file, &pruned, &set, serde_json::json!({})).unwrap();
        let want = tokens(&pruned, &EngineConfig::default());
        let resident = Some(ResidentProfile {
            profile: profile_path.clone(),
            keep,
        });
        let loaded = EngineConfig {
            resident: resident.clone(),
            ..Default::default()
        };
        assert_eq!(
            tokens(&path, &loaded),
            want,
            "{arch}: resident profile at load"
        );
        let paged = EngineConfig {
            resident: resident.clone(),
            expert_memory: Some(ExpertMemory::Fraction(0.5)),
            ..Default::default()
        };
        assert_eq!(
            tokens(&path, &paged),
            want,
            "{arch}: resident profile, paged"
        );
        // The mask must matter, or this test proves nothing.
        assert_ne!(
            tokens(&path, &EngineConfig::default()),
            want,
            "{arch}: unpruned"
        );

        let open = |p: &Path, profile: &Path| {
            Engine::open(
                CpuBackend,
                Arc::new(EdmFile::open(p).unwrap()),
                &EngineConfig {
                    resident: Some(ResidentProfile {
                        profile: profile.to_path_buf(),
                        keep,
                    }),
                    ..Default::default()
                },
            )
            .err()
        };
        assert!(matches!(
            open(&path, &dir.path().join("missing.json")),
            Some(EngineError::Experts(ExpertsError::Io { .. }))
        ));
        // The pruned file is a different model to its profile check, or refused as pruned.
        let again = open(&pruned, &profile_path);
        assert!(
            matches!(
                again,
                Some(EngineError::Experts(
                    ExpertsError::ProfileMismatch { .. } | ExpertsError::AlreadyPruned
                ))
            ),
            "{again:?}"
        );
    }
}
