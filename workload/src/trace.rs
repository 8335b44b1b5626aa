//! Request traces: Poisson arrivals, prompt lengths short (log-uniform from 1 to 60K tokens) or
//! long (Pareto, heavy-tailed, capped at 2M tokens), seeded so every policy sees the same trace.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    pub arrival_s: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    pub name: &'static str,
    /// Mean arrivals per second per instance.
    pub rate_per_instance: f64,
    pub duration_s: f64,
    /// Share of requests drawn from the long distribution.
    pub long_share: f64,
    pub short_max_tokens: u64,
    /// Pareto scale and shape of long prompts, and their cap.
    pub long_min_tokens: u64,
    pub long_alpha: f64,
    pub long_max_tokens: u64,
    /// Output tokens, uniform in this range.
    pub output_tokens: (u64, u64),
    pub seed: u64,
}

impl TraceConfig {
    /// Chat-like traffic: every prompt between 1 and 60K tokens.
    pub fn short() -> Self {
        TraceConfig {
            name: "short",
            rate_per_instance: 2.0,
            duration_s: 600.0,
            long_share: 0.0,
            short_max_tokens: 60_000,
            long_min_tokens: 60_000,
            long_alpha: 1.0,
            long_max_tokens: 2_000_000,
            output_tokens: (32, 1024),
            seed: 1,
        }
    }

    /// Long-context traffic: a quarter of the prompts from a Pareto tail starting at 60K
    /// tokens, up to 2M, the rest short. The rate keeps the pooled cluster below saturation.
    pub fn long() -> Self {
        TraceConfig {
            name: "long",
            rate_per_instance: 0.05,
            long_share: 0.25,
            ..TraceConfig::short()
        }
    }

    /// The long trace at twice the rate: more work than either policy can do.
    pub fn long_overload() -> Self {
        TraceConfig {
            name: "long2x",
            rate_per_instance: 0.1,
            ..TraceConfig::long()
        }
    }

    /// The requests arriving within `duration_s`.
    pub fn generate(&self, instances: usize) -> Vec<Request> {
        self.arrivals(instances)
            .take_while(|r| r.arrival_s < self.duration_s)
            .collect()
    }

    /// The endless arrival process `generate` cuts at `duration_s`; a prefix of it does not
    /// depend on where it is cut, so a replay can take its first N requests instead.
    pub fn arrivals(&self, instances: usize) -> impl Iterator<Item = Request> + use<> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let rate = self.rate_per_instance * instances as f64;
        let cfg = self.clone();
        let mut t = 0.0;
        std::iter::from_fn(move || {
            // Exponential gaps make a Poisson process.
            t += -(1.0 - rng.random::<f64>()).ln() / rate;
            let prompt_tokens = if rng.random_bool(cfg.long_share) {
                let u = 1.0 - rng.random::<f64>();
                let x = cfg.long_min_tokens as f64 / u.powf(1.0 / cfg.long_alpha);
                (x as u64).min(cfg.long_max_tokens)
            } else {
                let x = (cfg.short_max_tokens as f64).ln() * rng.random::<f64>();
                (x.exp() as u64).clamp(1, cfg.short_max_tokens)
            };
            let (lo, hi) = cfg.output_tokens;
            Some(Request {
                arrival_s: t,
                prompt_tokens,
                output_tokens: rng.random_range(lo..=hi),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_have_the_configured_shape() {
        let short = TraceConfig::short().generate(8);
        let expected = 2.0 * 8.0 * 600.0;
        assert!((short.len() as f64 - expected).abs() < 0.1 * expected);
        assert!(
            short
                .iter()
                .all(|r| (1..=60_000).contains(&r.prompt_tokens))
        );
        assert!(short.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));

        let mut cfg = TraceConfig::long();
        cfg.rate_per_instance = 20.0;
        let long = cfg.generate(8);
        let tail = long.iter().filter(|r| r.prompt_tokens > 60_000).count();
        let share = tail as f64 / long.len() as f64;
        assert!((0.2..0.3).contains(&share), "{share}");
        assert!(long.iter().all(|r| r.prompt_tokens <= 2_000_000));
        assert!(
            long.iter().any(|r| r.prompt_tokens > 1_000_000),
            "heavy tail"
        );
        assert_eq!(cfg.generate(8), long, "seeded");
        let first: Vec<Request> = cfg.arrivals(8).take(10).collect();
        assert_eq!(first, long[..10], "generate is a prefix of arrivals");
    }
}
