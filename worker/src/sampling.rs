//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::request::{SamplingParams, TokenLogprob};

/// One request's sampler. Its random stream depends only on the seed, so a seeded request gives
/// the same output whatever else is in the batch.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Whether this sampler only ever takes the largest logit and reports nothing else, so the
    /// backend can choose the token where the logits are.
    pub fn is_plain_greedy(&self) -> bool {
        (self.params.temperature == 0.0 || self.params.top_k == 1) && self.params.logprobs.is_none()
    }

    /// Picks a token from one row of logits and, if asked, its log-probability under the model
    /// (before temperature and cuts, as OpenAI reports it) with the top alternatives.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprob>) {
        let greedy = self.params.temperature == 0.0 || self.params.top_k == 1;
        let id = if greedy {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let logprob = self.params.logprobs.map(|n| token_logprob(logits, id, n));
        (id, logprob)
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit_desc);
        let m = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - m).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    mass += x;
                    mass >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (c, x) in cand.iter().zip(&probs) {
            if u < *x {
                return c.0;
            }
            u -= x;
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest logit; the lowest index wins a tie, so greedy output is deterministic.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = top.min(idx.len());
    let desc = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, desc);
    }
    idx.truncate(k);
    idx.sort_unstable_by(desc);
    TokenLogprob {
        logprob: logits[id as usize] - lse,
        top: idx.iter().map(|&i| (i, logits[i as usize] - lse)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    const LOGITS: [f32; 6] = [1.0, 3.0, 2.5, -1.0, 3.0, 0.0];

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 1));
        assert_eq!(s.sample(&LOGITS).0, 1);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seeds_differ() {
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..64).map(|_| s.sample(&LOGITS).0).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut s = Sampler::new(params(2.0, 2, 1.0, 3));
        for _ in 0..200 {
            assert!([1, 4].contains(&s.sample(&LOGITS).0), "top-2 is {{1, 4}}");
        }
        // Tokens 1 and 4 carry about 0.71 of the mass at temperature 1: top_p 0.5 keeps them only.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 3));
        for _ in 0..200 {
            assert!([1, 4].contains(&s.sample(&LOGITS).0));
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 11));
        let ones = (0..4000).filter(|_| s.sample(&logits).0 == 1).count();
        let frac = ones as f64 / 4000.0;
        assert!(
            (frac - 0.75).abs() < 0.03,
            "expected about 0.75, got {frac}"
        );
    }

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let mut p = params(0.0, 0, 1.0, 0);
        p.logprobs = Some(2);
        let mut s = Sampler::new(p);
        let (id, lp) = s.sample(&LOGITS);
        let lp = lp.unwrap();
        let z: f32 = LOGITS.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (LOGITS[id as usize].exp() / z).ln()).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4]);
    }
}
