//! What a Hugging Face family is to the converter: one [`Family`] value, exported as `FAMILY` by
//! `import/<family>.rs` and listed once in [`super::FAMILIES`]. The converter, `synth` and the
//! `model_type` lookup read these fields and never match on a family's name, so a family's
//! knowledge (its names, its config.json, its exceptions) stays in its own file.

use super::hf::{HfConfig, HfLayout};
use super::{ImportError, PlannedTensor};
use crate::model::{Architecture, ModelConfig};

/// What a checkpoint tensor is, for synthetic initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Embedding,
    Linear,
    /// Values around 1 (norm weights, scales, temperatures).
    Scale,
    /// Values around 0 (biases).
    Bias,
}

/// One checkpoint tensor a family's layout holds: name, shape, role.
pub type CheckpointTensor = (String, Vec<usize>, Role);

/// One import family. Only `model_types`, `layout` and `config` are required; the optional hooks
/// are for families whose checkpoints the shared layout cannot describe.
pub struct Family {
    /// The config.json `model_type`s the family reads, each with the architecture it imports as.
    /// Every architecture's own name ([`Architecture::hf_name`]) is among its family's.
    pub model_types: &'static [(&'static str, Architecture)],
    /// Checkpoint names the shared converter reads (embedding, norms, attention, experts, …).
    pub layout: &'static HfLayout,
    /// config.json → [`ModelConfig`]; the registry validates the result.
    pub config: fn(&HfConfig, Architecture) -> Result<ModelConfig, ImportError>,
    /// The model file's dense tensors and their sources, for a family that plans its own (ZAYA1);
    /// `None`: the plan the shared converter derives from `layout`.
    pub plan: Option<fn(&ModelConfig) -> Vec<PlannedTensor>>,
    /// Every checkpoint tensor (synthetic checkpoints), for a family that plans its own;
    /// `None`: derived from `layout`.
    pub checkpoint_tensors: Option<fn(&ModelConfig) -> Vec<CheckpointTensor>>,
    /// A better message than "unexpected tensor" for a checkpoint name the converter does not
    /// read (a legacy layout, say); `None` from the hook keeps the generic error.
    pub explain_unexpected: Option<fn(&str) -> Option<String>>,
    /// The default block size when config.json names none (`None`: the format's default).
    pub block_size: Option<usize>,
    /// Checkpoint tensors the family deliberately leaves out of the model file (DiffusionGemma's
    /// vision tower: edgediff imports the text model); every other unread name is an error.
    pub ignored: Option<fn(&str) -> bool>,
}

impl Family {
    /// A family with the required fields and no hooks, for struct-update syntax
    /// (`Family { block_size: Some(16), ..Family::new(…) }`).
    pub const fn new(
        model_types: &'static [(&'static str, Architecture)],
        layout: &'static HfLayout,
        config: fn(&HfConfig, Architecture) -> Result<ModelConfig, ImportError>,
    ) -> Self {
        Family {
            model_types,
            layout,
            config,
            plan: None,
            checkpoint_tensors: None,
            explain_unexpected: None,
            block_size: None,
            ignored: None,
        }
    }

    /// The architectures this family imports.
    pub fn architectures(&self) -> impl Iterator<Item = Architecture> + '_ {
        self.model_types.iter().map(|&(_, a)| a)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{architecture, family, family_of_model_type, FAMILIES};
    use crate::model::Architecture;

    /// Every architecture; the match makes a new variant a compile error here until it is listed.
    fn every_architecture() -> Vec<Architecture> {
        use Architecture as A;
        let all = vec![
            A::Qwen3Moe,
            A::Olmoe,
            A::Llada2Moe,
            A::Zaya,
            A::DiffusionGemma,
            A::Llama,
            A::Qwen2,
            A::Qwen3,
        ];
        for a in &all {
            match a {
                A::Qwen3Moe
                | A::Olmoe
                | A::Llada2Moe
                | A::Zaya
                | A::DiffusionGemma
                | A::Llama
                | A::Qwen2
                | A::Qwen3 => {}
            }
        }
        all
    }

    #[test]
    fn every_architecture_has_exactly_one_family_that_reads_its_own_name() {
        for arch in every_architecture() {
            let owners = FAMILIES
                .iter()
                .filter(|f| f.architectures().any(|a| a == arch))
                .count();
            assert_eq!(owners, 1, "{arch}: {owners} families");
            let (f, a) = family_of_model_type(arch.hf_name()).expect("its own name is read");
            assert_eq!(a, arch);
            assert!(std::ptr::eq(f, family(arch)), "{arch}");
        }
    }

    #[test]
    fn a_model_type_belongs_to_one_family() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            for (t, _) in f.model_types {
                assert!(seen.insert(*t), "'{t}' is registered twice");
            }
        }
        assert_eq!(
            architecture("bailing_moe_v2"),
            Some(Architecture::Llada2Moe)
        );
        assert_eq!(architecture("gpt_neox"), None);
    }
}
