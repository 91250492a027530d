//! The CPU reference forward pass: the KV cache is exact, the synthetic and the converted checkpoint
//! are the same model, and quantized files stay close to f32.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::AttnMask;
use edgediff::format::{DType, EdmFile};
use edgediff::model::{Architecture, ForwardRequest, Model, Window};
use edgediff::synth::{self, SynthSpec};

fn write_synth(dir: &Path, arch: Architecture, dtype: DType) -> PathBuf {
    let m = synth::build(&SynthSpec::tiny(arch)).unwrap();
    let path = dir.join(format!("{arch}-{dtype}.edm"));
    synth::write_edm(&m, &path, dtype, &|_, _| {}).unwrap();
    path
}

fn load(path: &Path) -> Model<CpuBackend> {
    let file = Arc::new(EdmFile::open(path).unwrap());
    Model::load(&CpuBackend, file, &|_, _| true).unwrap()
}

fn logits(m: &Model<CpuBackend>, tokens: &[u32], mask: AttnMask) -> Vec<f32> {
    let mut kv = m.new_kv(&CpuBackend, 64).unwrap();
    let want = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    m.forward(
        &CpuBackend,
        &mut kv,
        tokens,
        Window::block(0, tokens.len(), mask),
        &want,
    )
    .unwrap()
    .logits
    .unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

const TOKENS: [u32; 12] = [1, 40, 77, 300, 12, 3, 3, 3, 90, 41, 7, 250];

#[test]
fn cached_prefix_gives_the_same_logits_as_one_full_pass() {
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let m = load(&write_synth(dir.path(), arch, DType::F32));
        let vocab = m.config.vocab_size;
        for (mask, split) in [(AttnMask::Causal, 5), (AttnMask::BlockCausal(4), 8)] {
            let full = logits(&m, &TOKENS, mask);
            let mut kv = m.new_kv(&CpuBackend, 64).unwrap();
            let want = ForwardRequest {
                logits: true,
                ..Default::default()
            };
            m.forward(
                &CpuBackend,
                &mut kv,
                &TOKENS[..split],
                Window::block(0, split, mask),
                &want,
            )
            .unwrap();
            let rest = &TOKENS[split..];
            let tail = m
                .forward(
                    &CpuBackend,
                    &mut kv,
                    rest,
                    Window::block(split, rest.len(), mask),
                    &want,
                )
                .unwrap()
                .logits
                .unwrap();
            let err = rel_l2(&tail, &full[split * vocab..]);
            assert!(err < 1e-5, "{arch} {mask:?}: cached vs full rel L2 {err}");
        }
    }
}

#[test]
fn block_causal_masks_reduce_to_causal_and_bidirectional() {
    let dir = tempfile::tempdir().unwrap();
    let m = load(&write_synth(
        dir.path(),
        Architecture::Llada2Moe,
        DType::F32,
    ));
    let causal = logits(&m, &TOKENS, AttnMask::Causal);
    let bidir = logits(&m, &TOKENS, AttnMask::Bidirectional);
    assert_eq!(logits(&m, &TOKENS, AttnMask::BlockCausal(1)), causal);
    assert_eq!(
        logits(&m, &TOKENS, AttnMask::BlockCausal(TOKENS.len())),
        bidir
    );
    // A block sees its own future: the first position of a block differs from causal.
    let block = logits(&m, &TOKENS, AttnMask::BlockCausal(4));
    let v = m.config.vocab_size;
    assert!(rel_l2(&block[..v], &causal[..v]) > 1e-3);
    assert!(rel_l2(&block[4 * v..5 * v], &bidir[4 * v..5 * v]) > 1e-3);
}

#[test]
fn converted_hf_checkpoint_is_the_synthetic_model() {
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let m = synth::build(&SynthSpec::tiny(arch)).unwrap();
        let hf = dir.path().join(format!("hf-{arch}"));
        synth::write_hf(&m, &hf).unwrap();
        let converted = dir.path().join(format!("conv-{arch}.edm"));
        edgediff::import::convert(&hf, &converted, DType::F32, &|_, _| {}).unwrap();
        let direct = write_synth(dir.path(), arch, DType::F32);
        let a = logits(&load(&converted), &TOKENS, AttnMask::BlockCausal(4));
        let b = logits(&load(&direct), &TOKENS, AttnMask::BlockCausal(4));
        assert_eq!(
            a, b,
            "{arch}: converted checkpoint differs from the synthetic model"
        );
    }
}

#[test]
fn quantized_models_stay_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let reference = logits(
            &load(&write_synth(dir.path(), arch, DType::F32)),
            &TOKENS,
            AttnMask::Causal,
        );
        // Per matmul, weights uniform in ±a rounded to a grid of step s carry relative noise
        // (s/√12)/(a/√3) = s/2a: ≈0.03 % for f16, ≈0.4 % for q8 (s = a/127), ≈7 % for q4 (s = a/7).
        // About eight matmuls compound on the way to the logits, hence the bounds.
        for (dtype, bound) in [(DType::F16, 2e-3), (DType::Q8, 2e-2), (DType::Q4, 0.4)] {
            let q = logits(
                &load(&write_synth(dir.path(), arch, dtype)),
                &TOKENS,
                AttnMask::Causal,
            );
            let err = rel_l2(&q, &reference);
            assert!(err < bound, "{arch} {dtype}: rel L2 {err} ≥ {bound}");
            assert!(
                err > 0.0,
                "{arch} {dtype}: identical to f32, the weights were not quantized"
            );
        }
    }
}
