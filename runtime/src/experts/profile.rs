//! Routing profiles: how often, and with how much router probability, each expert of each layer is
//! chosen over a calibration corpus. A profile is tied to one model by a fingerprint of its config
//! and router weights, so a profile of another model is refused rather than silently applied.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ExpertsError;
use crate::backend::{AttnMask, Backend};
use crate::format::EdmFile;
use crate::model::{names, ForwardRequest, Model, Window};

pub const PROFILE_FORMAT: &str = "edgediff-profile";
pub const PROFILE_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub format: String,
    pub version: u32,
    /// Fingerprint of the profiled model (see [`fingerprint`]).
    pub model: String,
    pub num_experts: usize,
    pub documents: usize,
    pub tokens: usize,
    pub layers: Vec<LayerProfile>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerProfile {
    pub layer: usize,
    /// Tokens routed to each expert.
    pub tokens: Vec<u64>,
    /// Summed routing weight each expert received (the router probability mass it was given where it
    /// was chosen; the runtime reduces the router to top-k on the device, so the probability of
    /// experts not chosen is not observed).
    pub mass: Vec<f64>,
}

/// FNV-1a over the config JSON and the router weights of every MoE layer: cheap (routers are small)
/// and different for any two models that route differently.
pub fn fingerprint(file: &EdmFile) -> Result<String, ExpertsError> {
    let mut h = 0xcbf29ce484222325u64;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    };
    let c = &file.header.metadata.config;
    eat(serde_json::to_string(c).unwrap_or_default().as_bytes());
    for l in (0..c.num_layers).filter(|&l| c.is_moe_layer(l)) {
        eat(file.tensor(&names::layer(l, names::ROUTER))?.bytes);
    }
    Ok(format!("{h:016x}"))
}

impl Profile {
    pub fn empty(file: &EdmFile) -> Result<Self, ExpertsError> {
        let c = &file.header.metadata.config;
        let n = c.moe.num_experts;
        Ok(Profile {
            format: PROFILE_FORMAT.into(),
            version: PROFILE_VERSION,
            model: fingerprint(file)?,
            num_experts: n,
            documents: 0,
            tokens: 0,
            layers: (0..c.num_layers)
                .filter(|&l| c.is_moe_layer(l))
                .map(|layer| LayerProfile {
                    layer,
                    tokens: vec![0; n],
                    mass: vec![0.0; n],
                })
                .collect(),
        })
    }

    /// Reads a profile and checks it belongs to `file`.
    pub fn load(path: &Path, file: &EdmFile) -> Result<Self, ExpertsError> {
        let text = std::fs::read_to_string(path).map_err(|e| ExpertsError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let p: Profile = serde_json::from_str(&text)
            .map_err(|e| ExpertsError::BadProfile(format!("{}: {e}", path.display())))?;
        p.check(file)?;
        Ok(p)
    }

    pub fn check(&self, file: &EdmFile) -> Result<(), ExpertsError> {
        if self.format != PROFILE_FORMAT || self.version != PROFILE_VERSION {
            return Err(ExpertsError::BadProfile(format!(
                "format {} v{} (expected {PROFILE_FORMAT} v{PROFILE_VERSION})",
                self.format, self.version
            )));
        }
        let expected = Profile::empty(file)?;
        if self.model != expected.model {
            return Err(ExpertsError::ProfileMismatch {
                profile: self.model.clone(),
                model: expected.model,
            });
        }
        let layers_ok = self.layers.len() == expected.layers.len()
            && self.layers.iter().zip(&expected.layers).all(|(a, b)| {
                a.layer == b.layer
                    && a.tokens.len() == self.num_experts
                    && a.mass.len() == self.num_experts
                    && a.mass.iter().all(|m| m.is_finite() && *m >= 0.0)
            });
        if self.num_experts != expected.num_experts || !layers_ok {
            return Err(ExpertsError::BadProfile(
                "layer or expert counts do not match the model, or a mass is negative / not finite"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<(), ExpertsError> {
        let json = serde_json::to_string_pretty(self).expect("profile serializes");
        std::fs::write(path, json).map_err(|e| ExpertsError::Io {
            path: path.to_path_buf(),
            source: e,
        })
    }

    pub fn layer(&self, layer: usize) -> Option<&LayerProfile> {
        self.layers.iter().find(|l| l.layer == layer)
    }

    /// Runs `tokens` (one document) through the model in windows of `window` tokens under the
    /// model's block-causal mask and adds its routing to the profile.
    pub fn add_document<B: Backend>(
        &mut self,
        backend: &B,
        model: &Model<B>,
        tokens: &[u32],
        window: usize,
    ) -> Result<(), ExpertsError> {
        let block = model.file.header.metadata.decoding.block_size.max(1);
        let window = window.clamp(1, model.config.max_position);
        let mut kv = model.new_kv(backend, window)?;
        let want = ForwardRequest {
            rows: Some(0..1),
            logits: false,
            routing: true,
            ..Default::default()
        };
        for chunk in tokens.chunks(window) {
            let out = model.forward(
                backend,
                &mut kv,
                chunk,
                Window::block(0, chunk.len(), AttnMask::BlockCausal(block)),
                &want,
            )?;
            for (layer, ids, weights) in out.routing {
                let Some(lp) = self.layers.iter_mut().find(|l| l.layer == layer) else {
                    continue;
                };
                // An MLP router's skip class (id num_experts) is no expert to keep resident.
                let experts = lp.tokens.len();
                for (&e, &w) in ids
                    .iter()
                    .zip(&weights)
                    .filter(|(&e, _)| (e as usize) < experts)
                {
                    lp.tokens[e as usize] += 1;
                    lp.mass[e as usize] += w as f64;
                }
            }
            self.tokens += chunk.len();
        }
        self.documents += 1;
        Ok(())
    }
}
