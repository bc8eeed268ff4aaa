//! Sampled decoding: temperature, top-k and nucleus (top-p) filtering, drawn from a seeded
//! ChaCha8 stream (`rand_chacha`, whose output is fixed by its specification), so a seed
//! gives the same tokens on every run and machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to sample: temperature 0 is greedy (the argmax).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep the most probable tokens whose probabilities sum to at least this (1: all).
    pub top_p: f32,
    /// Keep this many most probable tokens (0: all).
    pub top_k: usize,
    pub seed: u64,
}

pub struct Sampler {
    cfg: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Sampler {
        Sampler { cfg, rng: ChaCha8Rng::seed_from_u64(cfg.seed) }
    }

    /// The next token from one row of logits.
    pub fn pick(&mut self, logits: &[f32]) -> usize {
        if self.cfg.temperature <= 0.0 || logits.len() < 2 {
            return crate::argmax(logits);
        }
        // Most probable first; ties by id, so the order never depends on the sort.
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        let keep = if self.cfg.top_k > 0 { self.cfg.top_k.min(ids.len()) } else { ids.len() };
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if keep < ids.len() {
            ids.select_nth_unstable_by(keep - 1, by_logit);
            ids.truncate(keep);
        }
        ids.sort_by(by_logit);
        let top = logits[ids[0]];
        let mut weights: Vec<f64> =
            ids.iter().map(|i| (((logits[*i] - top) / self.cfg.temperature) as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        if self.cfg.top_p < 1.0 {
            let mut sum = 0.0;
            let cut = weights
                .iter()
                .position(|w| {
                    sum += w / total;
                    sum >= self.cfg.top_p as f64
                })
                .map_or(weights.len(), |p| p + 1);
            weights.truncate(cut);
        }
        let total: f64 = weights.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                return ids[i];
            }
            u -= w;
        }
        ids[weights.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampling {
        Sampling { temperature, top_p, top_k, seed }
    }

    #[test]
    fn zero_temperature_is_the_argmax() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(cfg(0.0, 1.0, 0, 7)).pick(&logits), 1);
    }

    #[test]
    fn a_seed_repeats_and_filters_bound_the_choice() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.5).collect();
        let draw = |c: Sampling| {
            let mut s = Sampler::new(c);
            (0..200).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        let a = draw(cfg(1.0, 1.0, 0, 42));
        assert_eq!(a, draw(cfg(1.0, 1.0, 0, 42)));
        assert_ne!(a, draw(cfg(1.0, 1.0, 0, 43)));
        assert!(a.iter().collect::<std::collections::BTreeSet<_>>().len() > 10, "full sampling spreads");
        // top_k 3: only the three largest logits (ties by id: 6, 13, 20 all have 3.0).
        assert!(draw(cfg(1.0, 1.0, 3, 1)).iter().all(|i| [6, 13, 20].contains(i)));
        // A tiny top_p keeps only the single most probable token (the lowest id among ties).
        assert!(draw(cfg(1.0, 0.01, 0, 1)).iter().all(|i| *i == 6));
    }
}
