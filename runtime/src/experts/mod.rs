//! Expert residency: routing profiles over a domain corpus, resident-set selection, and pruned model
//! files that hold only the experts a deployment keeps.
//!
//! Pruning writes a new model file (never modifying the input): non-resident experts have no bytes in
//! it, so they cannot be mapped or read, and the router gets a selection mask (−1e30 on pruned
//! experts, through `moe.router_bias`) so it never picks them. A separate manifest beside the model
//! was the alternative; one self-contained file is what a phone app ships, and the size on disk
//! drops with the experts. The same selection and mask also apply at load time from a profile
//! (`EngineConfig::resident`, `--resident-profile`), for trying a keep ratio without a new file.

pub mod pager;
pub mod paging;
pub mod profile;
pub mod prune;
pub mod reader;
pub mod trace;

use std::path::PathBuf;

pub use pager::{Eviction, ExpertMemory, Pager, PagerStats};
pub use paging::{load_paged, ExpertPaging};
pub use profile::{fingerprint, LayerProfile, Profile};
pub use prune::{prune_file, KeepSpec, ResidentSet, Selector};

use crate::format::FormatError;
use crate::model::ModelError;

/// One expert of one layer: what the pager places, the reader stages and a slot table maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    pub layer: usize,
    pub expert: usize,
}

impl ExpertKey {
    pub fn new(layer: usize, expert: usize) -> Self {
        ExpertKey { layer, expert }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExpertsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid profile: {0}")]
    BadProfile(String),
    #[error("the profile was recorded on another model (profile {profile}, this model {model})")]
    ProfileMismatch { profile: String, model: String },
    #[error("keep spec '{0}': expected a percentage (12.5%), a count per layer (32) or a byte budget (1.5GB, 800MiB, 123456789B)")]
    BadKeep(String),
    #[error("{0}")]
    BudgetTooSmall(String),
    #[error("expert memory '{0}': expected bytes (1.5GB, 800MiB, 123456789) or a percentage of all experts (12.5%)")]
    BadExpertMemory(String),
    #[error("an expert memory of {budget} holds {slots} experts of {slot_bytes} bytes, but one layer routes each token to {top_k} experts: give it at least {need} bytes")]
    PoolTooSmall {
        budget: String,
        slots: usize,
        slot_bytes: u64,
        top_k: usize,
        need: u64,
    },
    #[error("model file is already pruned; prune the original model instead")]
    AlreadyPruned,
}

impl From<crate::backend::BackendError> for ExpertsError {
    fn from(e: crate::backend::BackendError) -> Self {
        ExpertsError::Model(ModelError::Backend(e))
    }
}
