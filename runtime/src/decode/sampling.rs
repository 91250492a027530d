//! Token choice: which token a position becomes once it is chosen to commit, and the
//! distributions the speculative decoder compares.
//!
//! The backend reduces each position's logits to [`PositionStats`] with the `TOP_K` (8) most
//! probable tokens. Sampling works on those candidates: temperature, top-k and top-p reshape the
//! eight probabilities and the tail beyond them is dropped — the same as sampling with top-k 8.
//! That keeps the host from ever reading a vocabulary row (DESIGN.md, "The host never reads
//! logits"); greedy choice is exact.

use crate::backend::PositionStats;

use super::DecodeError;

/// A small, seeded pseudo-random generator (SplitMix64): the same seed gives the same stream on
/// every platform, so the same request gives the same text.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A distribution over a few candidate tokens, most probable first. Probabilities need not sum
/// to 1 (the tail beyond the candidates is left out).
pub type Candidates = Vec<(u32, f32)>;

/// How a position's token is drawn from its candidates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most probable candidates (0 = all eight).
    pub top_k: usize,
    /// Keep the smallest prefix of candidates whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::greedy()
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), DecodeError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(DecodeError::invalid(
                "temperature",
                self.temperature,
                "a finite value >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(DecodeError::invalid("top_p", self.top_p, "within (0, 1]"));
        }
        Ok(())
    }

    /// The distribution tokens are drawn from: the candidates cut by top-k and top-p, sharpened or
    /// flattened by the temperature, normalised to sum 1. Greedy gives the argmax alone.
    pub fn shape(&self, candidates: &[(u32, f32)]) -> Candidates {
        let mut c: Candidates = candidates.to_vec();
        c.sort_by(|a, b| b.1.total_cmp(&a.1));
        if c.is_empty() {
            return c;
        }
        if self.is_greedy() {
            return vec![(c[0].0, 1.0)];
        }
        if self.top_k > 0 {
            c.truncate(self.top_k);
        }
        if self.top_p < 1.0 {
            let total: f32 = c.iter().map(|x| x.1).sum();
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, &(_, p)) in c.iter().enumerate() {
                acc += p;
                if acc >= self.top_p * total {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        // p^(1/T), computed in log space against the best candidate to stay finite.
        let inv_t = 1.0 / self.temperature;
        let top = c[0].1.max(f32::MIN_POSITIVE).ln();
        for x in c.iter_mut() {
            x.1 = ((x.1.max(f32::MIN_POSITIVE).ln() - top) * inv_t).exp();
        }
        normalize(&mut c);
        c
    }

    /// Draws a token for one position. Returns the token and the model's probability of it (the
    /// confidence commit policies rank by, as LLaDA does).
    pub fn choose(&self, stats: &PositionStats, rng: &mut Rng) -> (u32, f32) {
        if self.is_greedy() || stats.top.is_empty() {
            return (stats.argmax, stats.p_max);
        }
        let shaped = self.shape(&stats.top);
        let token = draw(&shaped, rng).unwrap_or(stats.argmax);
        let p = stats
            .top
            .iter()
            .find(|c| c.0 == token)
            .map_or(stats.p_max, |c| c.1);
        (token, p)
    }
}

/// Scales `c` to sum 1 (left as is when it sums to 0).
pub fn normalize(c: &mut [(u32, f32)]) {
    let sum: f32 = c.iter().map(|x| x.1).sum();
    if sum > 0.0 {
        for x in c.iter_mut() {
            x.1 /= sum;
        }
    }
}

/// Draws from a normalised distribution; `None` when it is empty.
pub fn draw(dist: &[(u32, f32)], rng: &mut Rng) -> Option<u32> {
    let last = dist.last()?.0;
    let u = rng.next_f32();
    let mut acc = 0.0;
    for &(t, p) in dist {
        acc += p;
        if u < acc {
            return Some(t);
        }
    }
    Some(last)
}

/// Probability of `token` in `dist`, 0 when absent.
pub fn prob_of(dist: &[(u32, f32)], token: u32) -> f32 {
    dist.iter().find(|c| c.0 == token).map_or(0.0, |c| c.1)
}

/// Log-probability floor for a token outside a position's top candidates: it is at most as
/// probable as the last candidate and at most the mass the candidates leave over.
fn tail_floor(top: &[(u32, f32)]) -> f32 {
    let last = top.last().map_or(1.0, |c| c.1);
    let rest = (1.0 - top.iter().map(|c| c.1).sum::<f32>()).max(0.0);
    last.min(rest).max(1e-30)
}

/// Logit mixing of the self-speculative decoder (REFERENCES.md, "Self-speculative"): the
/// distribution of `β · AR + (1 − β) · diffusion` logits, over the union of both positions'
/// candidates. Logits equal log-probabilities up to a per-row constant, so mixing log-probs and
/// renormalising is the same softmax. A token outside one list gets that list's tail floor
/// (`tail_floor`) — the approximation top-8 statistics force. β = 1 is the AR distribution
/// (renormalised over the union: same argmax, same ratios).
pub fn mix(beta: f32, ar: &PositionStats, diffusion: &PositionStats) -> Candidates {
    let mut ids: Vec<u32> = ar.top.iter().map(|c| c.0).collect();
    for c in &diffusion.top {
        if !ids.contains(&c.0) {
            ids.push(c.0);
        }
    }
    let (fa, fd) = (tail_floor(&ar.top), tail_floor(&diffusion.top));
    let log_p = |top: &[(u32, f32)], floor: f32, t: u32| {
        top.iter()
            .find(|c| c.0 == t)
            .map_or(floor, |c| c.1.max(1e-30))
            .ln()
    };
    let scores: Vec<(u32, f32)> = ids
        .into_iter()
        .map(|t| {
            let s = if beta >= 1.0 {
                log_p(&ar.top, fa, t)
            } else {
                beta * log_p(&ar.top, fa, t) + (1.0 - beta) * log_p(&diffusion.top, fd, t)
            };
            (t, s)
        })
        .collect();
    let max = scores.iter().map(|s| s.1).fold(f32::NEG_INFINITY, f32::max);
    let mut dist: Candidates = scores
        .into_iter()
        .map(|(t, s)| (t, (s - max).exp()))
        .collect();
    normalize(&mut dist);
    dist.sort_by(|a, b| b.1.total_cmp(&a.1));
    dist
}

/// Speculative acceptance (Leviathan et al., as TiDAR uses it): a draft token `d` proposed with
/// probability `q(d)` is kept with probability `min(1, p(d) / q(d))` under the target `p`;
/// otherwise the replacement is drawn from the residual `norm(max(0, p − q))`. Greedy (both
/// distributions one-hot) reduces to "keep `d` iff it is the target's argmax, else take the
/// argmax". Returns `Ok(())` when the draft is accepted, `Err(replacement)` when it is not.
pub fn accept_draft(
    target: &[(u32, f32)],
    draft: &[(u32, f32)],
    token: u32,
    rng: &mut Rng,
) -> Result<(), u32> {
    let (p, q) = (prob_of(target, token), prob_of(draft, token));
    let fallback = target.first().map_or(token, |c| c.0);
    if p > 0.0 && (q <= 0.0 || p >= q || rng.next_f32() < p / q) {
        return Ok(());
    }
    let mut residual: Candidates = target
        .iter()
        .map(|&(t, pt)| (t, (pt - prob_of(draft, t)).max(0.0)))
        .filter(|c| c.1 > 0.0)
        .collect();
    if residual.is_empty() {
        return Err(draw(target, rng).unwrap_or(fallback));
    }
    normalize(&mut residual);
    Err(draw(&residual, rng).unwrap_or(fallback))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::stats_from_logits;

    fn stats(top: &[(u32, f32)]) -> PositionStats {
        PositionStats {
            argmax: top[0].0,
            p_max: top[0].1,
            entropy: 0.0,
            margin: top[0].1 - top.get(1).map_or(0.0, |c| c.1),
            top: top.to_vec(),
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_its_probability() {
        let s = stats(&[(7, 0.6), (3, 0.3), (1, 0.1)]);
        let mut rng = Rng::new(1);
        assert_eq!(Sampling::greedy().choose(&s, &mut rng), (7, 0.6));
    }

    #[test]
    fn same_seed_draws_the_same_tokens() {
        let s = stats(&[(7, 0.4), (3, 0.35), (1, 0.25)]);
        let sampling = Sampling {
            temperature: 1.0,
            seed: 9,
            ..Sampling::greedy()
        };
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..64)
                .map(|_| sampling.choose(&s, &mut rng).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
        let drawn = run(9);
        assert!(drawn.contains(&7) && drawn.contains(&3) && drawn.contains(&1));
    }

    #[test]
    fn top_k_and_top_p_cut_the_candidates() {
        let c = [(7, 0.5), (3, 0.3), (1, 0.15), (2, 0.05)];
        let k2 = Sampling {
            temperature: 1.0,
            top_k: 2,
            ..Sampling::greedy()
        };
        assert_eq!(k2.shape(&c).iter().map(|x| x.0).collect::<Vec<_>>(), [7, 3]);
        let p = Sampling {
            temperature: 1.0,
            top_p: 0.75,
            ..Sampling::greedy()
        };
        let shaped = p.shape(&c);
        assert_eq!(shaped.iter().map(|x| x.0).collect::<Vec<_>>(), [7, 3]);
        assert!((shaped[0].1 - 0.625).abs() < 1e-6);
    }

    #[test]
    fn low_temperature_sharpens_high_temperature_flattens() {
        let c = [(7, 0.6), (3, 0.4)];
        let at = |t| {
            Sampling {
                temperature: t,
                ..Sampling::greedy()
            }
            .shape(&c)[0]
                .1
        };
        assert!(at(0.5) > 0.6 && at(2.0) < 0.6 && (at(1.0) - 0.6).abs() < 1e-6);
    }

    #[test]
    fn mixing_with_beta_one_is_the_ar_distribution() {
        let ar = stats_from_logits(&[0.0, 2.0, 1.0, -1.0]);
        let diff = stats_from_logits(&[3.0, 0.0, 0.0, 0.0]);
        let m = mix(1.0, &ar, &diff);
        assert_eq!(m[0].0, 1);
        for (t, p) in &ar.top {
            assert!((prob_of(&m, *t) - p).abs() < 1e-5);
        }
        // Halfway, the diffusion favourite can win.
        assert_eq!(mix(0.3, &ar, &diff)[0].0, 0);
    }

    #[test]
    fn greedy_acceptance_keeps_exactly_the_argmax() {
        let mut rng = Rng::new(0);
        let target = [(4, 1.0)];
        assert_eq!(accept_draft(&target, &[(4, 1.0)], 4, &mut rng), Ok(()));
        assert_eq!(accept_draft(&target, &[(5, 1.0)], 5, &mut rng), Err(4));
    }

    #[test]
    fn sampled_acceptance_follows_the_ratio_and_resamples_the_residual() {
        let target = [(1, 0.5), (2, 0.5)];
        let draft = [(1, 1.0)];
        let mut rng = Rng::new(3);
        let (mut kept, n) = (0, 4000);
        for _ in 0..n {
            match accept_draft(&target, &draft, 1, &mut rng) {
                Ok(()) => kept += 1,
                // The residual max(0, p − q) holds only token 2.
                Err(t) => assert_eq!(t, 2),
            }
        }
        let rate = kept as f32 / n as f32;
        assert!((rate - 0.5).abs() < 0.05, "acceptance rate {rate}");
    }
}
