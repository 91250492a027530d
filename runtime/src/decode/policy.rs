//! Commit policies: which masked positions of a block become tokens in a denoising step.
//!
//! Each rule is a small pure function over per-position statistics (REFERENCES.md, "Commit
//! rules"); [`CommitPolicy::select`] dispatches to it. Every rule commits at least one position
//! per step while any is masked, so a block always finishes.

use std::collections::HashMap;

use crate::backend::{CommitRule, PositionStats};

use super::DecodeError;

/// One masked position that could commit this step.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Absolute position.
    pub pos: usize,
    /// The token it would become (the sampler's choice).
    pub token: u32,
    /// The model's probability of `token`.
    pub confidence: f32,
    /// Entropy of the position's distribution, in nats.
    pub entropy: f32,
    /// p(top-1) − p(top-2).
    pub margin: f32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CommitPolicy {
    /// Fast-dLLM / dInfer / SGLang LowConfidence: commit every position with confidence
    /// c ≥ min(τ, max c) — all above τ, and always at least the most confident.
    Threshold { threshold: f32 },
    /// LLaDA's low-confidence remasking: a fixed number of steps per block; each step commits the
    /// k most confident, k = ⌈masked / remaining steps⌉ (the remainder goes to early steps).
    FixedSteps { steps: usize },
    /// EB-sampler (SGLang γ 0.15): sort by entropy ascending and accept the k lowest while
    /// Σᵢ Hᵢ − max(H₁..H_k) ≤ γ.
    EntropyBound { gamma: f32 },
    /// Confidence = p₁ − p₂: commit every position with margin ≥ the bound, at least the best.
    Margin { margin: f32 },
    /// dInfer's credit decoding: confidences accumulate credit over a block's steps
    /// ([`CreditLedger`]), then the threshold rule runs on the fused distribution.
    Credit { threshold: f32 },
}

impl Default for CommitPolicy {
    fn default() -> Self {
        CommitPolicy::Threshold { threshold: 0.9 }
    }
}

impl CommitPolicy {
    pub fn name(&self) -> &'static str {
        match self {
            CommitPolicy::Threshold { .. } => "threshold",
            CommitPolicy::FixedSteps { .. } => "fixed",
            CommitPolicy::EntropyBound { .. } => "entropy",
            CommitPolicy::Margin { .. } => "margin",
            CommitPolicy::Credit { .. } => "credit",
        }
    }

    /// The policy with its parameter, for tables and logs.
    pub fn label(&self) -> String {
        match *self {
            CommitPolicy::Threshold { threshold } => format!("threshold τ={threshold}"),
            CommitPolicy::FixedSteps { steps } => format!("fixed {steps} steps"),
            CommitPolicy::EntropyBound { gamma } => format!("entropy γ={gamma}"),
            CommitPolicy::Margin { margin } => format!("margin ≥{margin}"),
            CommitPolicy::Credit { threshold } => format!("credit τ={threshold}"),
        }
    }

    pub fn validate(&self) -> Result<(), DecodeError> {
        match *self {
            CommitPolicy::Threshold { threshold } | CommitPolicy::Credit { threshold }
                if !(threshold > 0.0 && threshold <= 1.0) =>
            {
                Err(DecodeError::invalid(
                    "threshold",
                    threshold,
                    "within (0, 1]",
                ))
            }
            CommitPolicy::FixedSteps { steps: 0 } => {
                Err(DecodeError::invalid("steps", 0, "at least 1"))
            }
            CommitPolicy::EntropyBound { gamma } if !(gamma.is_finite() && gamma >= 0.0) => {
                Err(DecodeError::invalid("gamma", gamma, "a finite value >= 0"))
            }
            CommitPolicy::Margin { margin } if !(0.0..=1.0).contains(&margin) => {
                Err(DecodeError::invalid("margin", margin, "within [0, 1]"))
            }
            _ => Ok(()),
        }
    }

    /// Indices into `candidates` to commit, after `steps_done` earlier steps of this block.
    /// Non-empty whenever `candidates` is.
    pub fn select(&self, candidates: &[Candidate], steps_done: usize) -> Vec<usize> {
        if candidates.is_empty() {
            return Vec::new();
        }
        let conf: Vec<f32> = candidates.iter().map(|c| c.confidence).collect();
        let mut chosen = match *self {
            CommitPolicy::Threshold { threshold } | CommitPolicy::Credit { threshold } => {
                threshold_rule(&conf, threshold)
            }
            CommitPolicy::FixedSteps { steps } => {
                let k = fixed_steps_count(candidates.len(), steps.saturating_sub(steps_done));
                most_confident(&conf, k)
            }
            CommitPolicy::EntropyBound { gamma } => {
                let h: Vec<f32> = candidates.iter().map(|c| c.entropy).collect();
                entropy_bound(&h, gamma)
            }
            CommitPolicy::Margin { margin } => {
                let m: Vec<f32> = candidates.iter().map(|c| c.margin).collect();
                threshold_rule(&m, margin)
            }
        };
        chosen.sort_unstable();
        chosen
    }
}

impl CommitPolicy {
    /// The rule a backend can apply by itself (`Backend::commit_step`); `None` for credit, whose
    /// ledger and `powf` fusion stay on the host.
    pub fn device_rule(&self) -> Option<CommitRule> {
        match *self {
            CommitPolicy::Threshold { threshold } => Some(CommitRule::Threshold { threshold }),
            CommitPolicy::FixedSteps { steps } => Some(CommitRule::FixedSteps { steps }),
            CommitPolicy::EntropyBound { gamma } => Some(CommitRule::EntropyBound { gamma }),
            CommitPolicy::Margin { margin } => Some(CommitRule::Margin { margin }),
            CommitPolicy::Credit { .. } => None,
        }
    }
}

impl CommitPolicy {
    /// The policy whose greedy form `r` is ([`CommitPolicy::device_rule`] backwards); `None` for
    /// [`CommitRule::Next`], AR's step, which no block policy is.
    pub fn for_rule(r: CommitRule) -> Option<CommitPolicy> {
        match r {
            CommitRule::Threshold { threshold } => Some(CommitPolicy::Threshold { threshold }),
            CommitRule::FixedSteps { steps } => Some(CommitPolicy::FixedSteps { steps }),
            CommitRule::EntropyBound { gamma } => Some(CommitPolicy::EntropyBound { gamma }),
            CommitRule::Margin { margin } => Some(CommitPolicy::Margin { margin }),
            CommitRule::Next => None,
        }
    }
}

/// Positions with `score ≥ min(τ, max score)`.
pub fn threshold_rule(score: &[f32], tau: f32) -> Vec<usize> {
    let max = score.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let bar = tau.min(max);
    (0..score.len()).filter(|&i| score[i] >= bar).collect()
}

/// Tokens to commit this step when `masked` remain and `remaining_steps` are left (including
/// this one): ⌈masked / remaining⌉, everything on the last step or past it.
pub fn fixed_steps_count(masked: usize, remaining_steps: usize) -> usize {
    if remaining_steps <= 1 {
        masked
    } else {
        masked.div_ceil(remaining_steps)
    }
}

/// The `k` highest scores (at least one), ties broken by position.
pub fn most_confident(score: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    order.truncate(k.max(1));
    order
}

/// EB-sampler: the longest prefix of positions sorted by entropy ascending whose entropy sum,
/// less its largest member, stays within `gamma` (at least one position).
pub fn entropy_bound(entropy: &[f32], gamma: f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..entropy.len()).collect();
    order.sort_by(|&a, &b| entropy[a].total_cmp(&entropy[b]).then(a.cmp(&b)));
    let (mut sum, mut max, mut keep) = (0.0f32, 0.0f32, 0);
    for &i in &order {
        let h = entropy[i].max(0.0);
        sum += h;
        max = max.max(h);
        if keep > 0 && sum - max > gamma {
            break;
        }
        keep += 1;
    }
    order.truncate(keep.max(1));
    order
}

/// dInfer's credit decoding state for one block: per position, credit per token. Each step all
/// credit decays by 0.8, every masked position's top-1 token gains p_top1^0.2, and the position's
/// distribution is fused as `logits + 0.7 · log(1 + C)`. On top-8 statistics the fusion is exact
/// for the eight candidates (credit only ever sits on a top-1 token); a credited token that
/// dropped out of the eight is left in the tail.
#[derive(Clone, Debug, Default)]
pub struct CreditLedger {
    credit: HashMap<usize, Vec<(u32, f32)>>,
}

impl CreditLedger {
    pub const DECAY: f32 = 0.8;
    pub const BOOST_POWER: f32 = 0.2;
    pub const WEIGHT: f32 = 0.7;

    pub fn new() -> Self {
        Self::default()
    }

    /// One step over the masked positions' statistics: updates the credit and returns the fused
    /// statistics in the same order.
    pub fn step(&mut self, preds: &[(usize, PositionStats)]) -> Vec<(usize, PositionStats)> {
        for c in self.credit.values_mut() {
            for e in c.iter_mut() {
                e.1 *= Self::DECAY;
            }
        }
        preds
            .iter()
            .map(|(pos, s)| {
                let entry = self.credit.entry(*pos).or_default();
                let boost = s.p_max.max(0.0).powf(Self::BOOST_POWER);
                match entry.iter_mut().find(|e| e.0 == s.argmax) {
                    Some(e) => e.1 += boost,
                    None => entry.push((s.argmax, boost)),
                }
                (*pos, fuse(s, entry))
            })
            .collect()
    }
}

fn fuse(s: &PositionStats, credit: &[(u32, f32)]) -> PositionStats {
    let tail = (1.0 - s.top.iter().map(|c| c.1).sum::<f32>()).max(0.0);
    let mut top: Vec<(u32, f32)> = s
        .top
        .iter()
        .map(|&(t, p)| {
            let c = credit.iter().find(|e| e.0 == t).map_or(0.0, |e| e.1);
            (t, p * (1.0 + c).powf(CreditLedger::WEIGHT))
        })
        .collect();
    let z: f32 = top.iter().map(|c| c.1).sum::<f32>() + tail;
    if z > 0.0 {
        for c in top.iter_mut() {
            c.1 /= z;
        }
    }
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let p1 = top.first().map_or(0.0, |c| c.1);
    let p2 = top.get(1).map_or(0.0, |c| c.1);
    PositionStats {
        argmax: top.first().map_or(s.argmax, |c| c.0),
        p_max: p1,
        entropy: s.entropy,
        margin: p1 - p2,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(conf: &[f32]) -> Vec<Candidate> {
        conf.iter()
            .enumerate()
            .map(|(i, &c)| Candidate {
                pos: 10 + i,
                token: i as u32,
                confidence: c,
                entropy: 1.0 - c,
                margin: c / 2.0,
            })
            .collect()
    }

    #[test]
    fn threshold_commits_all_above_tau() {
        let p = CommitPolicy::Threshold { threshold: 0.9 };
        assert_eq!(p.select(&cands(&[0.95, 0.2, 0.91, 0.9]), 0), [0, 2, 3]);
    }

    #[test]
    fn threshold_commits_the_most_confident_when_none_reaches_tau() {
        let p = CommitPolicy::Threshold { threshold: 0.9 };
        assert_eq!(p.select(&cands(&[0.3, 0.5, 0.4]), 0), [1]);
    }

    #[test]
    fn fixed_steps_commit_masked_over_remaining_with_remainder_first() {
        // 10 masked over 4 steps: 3, 3, 2, 2 (LLaDA's schedule).
        let mut masked = 10;
        let mut per_step = Vec::new();
        for step in 0..4 {
            let k = fixed_steps_count(masked, 4 - step);
            per_step.push(k);
            masked -= k;
        }
        assert_eq!(per_step, [3, 3, 2, 2]);
        assert_eq!(masked, 0);
        let p = CommitPolicy::FixedSteps { steps: 2 };
        assert_eq!(p.select(&cands(&[0.1, 0.7, 0.5, 0.9]), 0), [1, 3]);
        // Past the last step everything left commits.
        assert_eq!(p.select(&cands(&[0.1, 0.7, 0.5]), 5), [0, 1, 2]);
    }

    #[test]
    fn entropy_bound_accepts_while_sum_minus_max_stays_within_gamma() {
        // Sorted: 0.125 (pos 2), 0.25 (pos 0), 0.5 (pos 3), 2 (pos 1).
        // k=2: 0.375 − 0.25 = 0.125; k=3: 0.875 − 0.5 = 0.375; k=4: 2.875 − 2 = 0.875.
        let h = [0.25, 2.0, 0.125, 0.5];
        assert_eq!(entropy_bound(&h, 0.375), [2, 0, 3]);
        assert_eq!(entropy_bound(&h, 0.125), [2, 0]);
        assert_eq!(entropy_bound(&h, 0.1), [2]);
        assert_eq!(entropy_bound(&h, 1.0), [2, 0, 3, 1]);
    }

    #[test]
    fn margin_commits_positions_with_a_clear_winner() {
        let p = CommitPolicy::Margin { margin: 0.3 };
        // margins are conf / 2: 0.45, 0.1, 0.35
        assert_eq!(p.select(&cands(&[0.9, 0.2, 0.7]), 0), [0, 2]);
        assert_eq!(p.select(&cands(&[0.2, 0.4]), 0), [1]);
    }

    #[test]
    fn every_policy_commits_at_least_one() {
        let c = cands(&[0.01, 0.02]);
        for p in [
            CommitPolicy::Threshold { threshold: 1.0 },
            CommitPolicy::FixedSteps { steps: 100 },
            CommitPolicy::EntropyBound { gamma: 0.0 },
            CommitPolicy::Margin { margin: 1.0 },
            CommitPolicy::Credit { threshold: 1.0 },
        ] {
            assert!(!p.select(&c, 0).is_empty(), "{p:?}");
        }
    }

    #[test]
    fn credit_builds_up_on_a_stable_favourite() {
        let s = PositionStats {
            argmax: 5,
            p_max: 0.5,
            entropy: 1.0,
            margin: 0.2,
            top: vec![(5, 0.5), (6, 0.3), (7, 0.2)],
        };
        let mut ledger = CreditLedger::new();
        let first = ledger.step(&[(3, s.clone())])[0].1.p_max;
        let second = ledger.step(&[(3, s.clone())])[0].1.p_max;
        assert!(first > 0.5 && second > first, "{first} {second}");
        assert_eq!(ledger.step(&[(3, s)])[0].1.argmax, 5);
    }

    #[test]
    fn invalid_parameters_are_errors() {
        assert!(CommitPolicy::Threshold { threshold: 0.0 }
            .validate()
            .is_err());
        assert!(CommitPolicy::Threshold {
            threshold: f32::NAN
        }
        .validate()
        .is_err());
        assert!(CommitPolicy::FixedSteps { steps: 0 }.validate().is_err());
        assert!(CommitPolicy::EntropyBound { gamma: -1.0 }
            .validate()
            .is_err());
        assert!(CommitPolicy::Threshold { threshold: 0.9 }
            .validate()
            .is_ok());
    }
}
