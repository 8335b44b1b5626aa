//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.
//!
//! The rule, which the CUDA kernel (`sample_rows` in kernels/llama.cu) follows too, so that a
//! seeded request gives the same tokens wherever its logits are: keep the logits at or above
//! the k-th largest (top-k; ties at the cut stay), then, among those, the largest ones whose
//! probability at the temperature reaches `top_p` (the cut's ties stay too), and draw by
//! inverse CDF in token-id order with one uniform number from the request's own generator.
//! A request with logit adjustments (`logit_adjust`) draws on the host, from adjusted logits.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::request::{SamplingParams, TokenLogprob};

/// What picking one row's token takes, once the sampler's random number is drawn: the backend
/// applies it where the logits are.
#[repr(C)] // the layout of `RowDraw` in kernels/llama.cu
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowDraw {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    /// Uniform in [0, 1).
    pub u: f32,
}

impl RowDraw {
    pub fn greedy() -> Self {
        RowDraw {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            u: 0.0,
        }
    }

    fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// One request's sampler. Its random stream depends only on the seed, so a seeded request gives
/// the same output whatever else is in the batch.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// The number of the draw not yet used by an emitted token.
    pending_u: Option<f32>,
    /// Tokens drawn so far, by count (for the penalties), and how many.
    output: HashMap<u32, u32>,
    generated: usize,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            pending_u: None,
            output: HashMap::new(),
            generated: 0,
        }
    }

    /// Whether the token alone is wanted (no log-probabilities, no logit adjustments), so the
    /// backend can pick it where the logits are.
    pub fn wants_token_only(&self) -> bool {
        self.params.logprobs.is_none()
            && self.params.adjust.as_ref().is_none_or(|a| a.is_noop())
            && !self.params.panic_for_test
    }

    /// The next token's draw; takes one number from the generator unless greedy. It stays the
    /// same until a token is emitted with it (`taken`), so a step that runs again (a creditor
    /// was lost) draws what it drew the first time, and a seeded stream does not shift.
    pub fn next_draw(&mut self) -> RowDraw {
        let p = &self.params;
        let mut d = RowDraw {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            u: 0.0,
        };
        if !d.is_greedy() {
            d.u = *self
                .pending_u
                .get_or_insert_with(|| self.rng.random::<f32>());
        }
        d
    }

    /// The token of the last `next_draw` was emitted: the next draw takes a fresh number.
    pub fn taken(&mut self) {
        self.pending_u = None;
    }

    /// Picks a token from one row of logits and, if asked, its log-probability under the model
    /// (before temperature and cuts, as OpenAI reports it) with the top alternatives.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprob>) {
        assert!(
            !self.params.panic_for_test,
            "test hook: an engine panic was asked for"
        );
        let d = self.next_draw();
        let id = match self.params.adjust.as_deref().filter(|a| !a.is_noop()) {
            Some(a) => {
                let mut adjusted = logits.to_vec();
                a.apply(&mut adjusted, &self.output, self.generated, d.temperature);
                draw(&adjusted, &d)
            }
            None => draw(logits, &d),
        };
        self.taken();
        *self.output.entry(id).or_default() += 1;
        self.generated += 1;
        let logprob = self.params.logprobs.map(|n| token_logprob(logits, id, n));
        (id, logprob)
    }
}

/// The token `d` picks from one row of logits (the rule in this module's header).
pub fn draw(logits: &[f32], d: &RowDraw) -> u32 {
    if d.is_greedy() {
        return argmax(logits);
    }
    let weight = weights(logits, d);
    let cut = kept_cut(logits, d);
    let total: f32 = logits
        .iter()
        .filter(|&&l| l >= cut)
        .map(|&l| weight(l))
        .sum();
    let target = d.u * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l >= cut {
            acc += weight(l);
            last = i;
            if acc > target {
                return i as u32;
            }
        }
    }
    last as u32
}

/// exp((l - max) / temperature), the unnormalised probability of a logit.
fn weights(logits: &[f32], d: &RowDraw) -> impl Fn(f32) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / d.temperature;
    move |l: f32| ((l - m) * inv_t).exp()
}

/// The smallest logit a non-greedy draw keeps, after its top-k and top-p cuts.
pub fn kept_cut(logits: &[f32], d: &RowDraw) -> f32 {
    let weight = weights(logits, d);
    let mut cut = f32::NEG_INFINITY;
    let k = d.top_k as usize;
    let cuts_k = k > 0 && k < logits.len();
    if !cuts_k && d.top_p >= 1.0 {
        return cut;
    }
    let mut sorted = logits.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    if cuts_k {
        cut = sorted[k - 1];
        sorted.truncate(k);
    }
    if d.top_p < 1.0 {
        let kept: f32 = logits
            .iter()
            .filter(|&&l| l >= cut)
            .map(|&l| weight(l))
            .sum();
        let mut mass = 0.0;
        for &l in &sorted {
            mass += weight(l);
            if mass >= d.top_p * kept {
                return cut.max(l);
            }
        }
    }
    cut
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
    fn a_draw_stays_until_its_token_is_taken() {
        let mut s = Sampler::new(params(1.0, 0, 1.0, 9));
        let first = s.next_draw();
        assert_eq!(s.next_draw(), first, "a step run again draws the same");
        s.taken();
        assert_ne!(s.next_draw(), first);
        // The device path (draw, then taken) and the host path (sample) give one stream.
        let mut device = Sampler::new(params(1.0, 0, 1.0, 9));
        let mut host = Sampler::new(params(1.0, 0, 1.0, 9));
        for _ in 0..32 {
            let d = device.next_draw();
            device.next_draw();
            device.taken();
            assert_eq!(draw(&LOGITS, &d), host.sample(&LOGITS).0);
        }
    }

    #[test]
    fn ties_at_a_cut_stay() {
        let logits = [2.0, 2.0, 2.0, 0.0];
        for (top_k, top_p) in [(2, 1.0), (0, 0.1)] {
            let mut s = Sampler::new(params(1.0, top_k, top_p, 5));
            let seen: std::collections::BTreeSet<u32> =
                (0..300).map(|_| s.sample(&logits).0).collect();
            assert_eq!(seen, [0, 1, 2].into(), "top_k {top_k} top_p {top_p}");
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
