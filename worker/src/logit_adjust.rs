//! Changes to a row of logits before its token is drawn: the OpenAI and vLLM request fields
//! beyond temperature, top-k and top-p. They run on the host, over the row's logits (a request
//! that uses any of them brings its logits back from the GPU), in vLLM's order: stop tokens
//! masked until `min_tokens`, `logit_bias`, the penalties, then `min_p` (after temperature).

use std::collections::HashMap;

/// One request's adjustments. `Default` changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitAdjust {
    /// Added to the logit of each token (OpenAI's `logit_bias`, -100 to 100).
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's: logits of tokens already in the prompt or the output are divided by it when
    /// positive and multiplied by it when negative (1 is off).
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted per occurrence of a token already generated.
    pub frequency_penalty: f32,
    /// vLLM's: tokens whose probability (at the temperature) is below `min_p` times the most
    /// likely one's are cut (0 is off).
    pub min_p: f32,
    /// vLLM's: the request's stop tokens cannot be drawn before this many tokens.
    pub min_tokens: usize,
    /// The stop tokens `min_tokens` holds back (end-of-sequence unless ignored, `stop_token_ids`).
    pub stops: Vec<u32>,
    /// The prompt's distinct tokens, for the repetition penalty.
    pub prompt: Vec<u32>,
}

impl Default for LogitAdjust {
    fn default() -> Self {
        Self {
            logit_bias: Vec::new(),
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            min_p: 0.0,
            min_tokens: 0,
            stops: Vec::new(),
            prompt: Vec::new(),
        }
    }
}

impl LogitAdjust {
    /// Whether it changes nothing at all, so the token can be picked where the logits are.
    pub fn is_noop(&self) -> bool {
        (self.min_tokens == 0 || self.stops.is_empty())
            && self.logit_bias.is_empty()
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.min_p == 0.0
    }

    /// Adjusts one row of logits, given the tokens generated so far (`output`, by count) and
    /// the request's temperature (for `min_p`).
    pub fn apply(
        &self,
        logits: &mut [f32],
        output: &HashMap<u32, u32>,
        generated: usize,
        temperature: f32,
    ) {
        let mut each = |ids: &mut dyn Iterator<Item = u32>, f: &dyn Fn(f32) -> f32| {
            for id in ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f(*l);
                }
            }
        };
        if generated < self.min_tokens {
            each(&mut self.stops.iter().copied(), &|_| f32::NEG_INFINITY);
        }
        for &(id, bias) in &self.logit_bias {
            each(&mut std::iter::once(id), &|l| l + bias);
        }
        if self.repetition_penalty != 1.0 {
            let p = self.repetition_penalty;
            let mut seen: Vec<u32> = self.prompt.iter().chain(output.keys()).copied().collect();
            seen.sort_unstable();
            seen.dedup();
            each(&mut seen.into_iter(), &|l| {
                if l > 0.0 { l / p } else { l * p }
            });
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (&id, &n) in output {
                let by = self.presence_penalty + self.frequency_penalty * n as f32;
                each(&mut std::iter::once(id), &|l| l - by);
            }
        }
        if self.min_p > 0.0 && temperature > 0.0 {
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // p_i / p_max = exp((l_i - m) / T) >= min_p  <=>  l_i >= m + T ln(min_p)
            let cut = m + temperature * self.min_p.ln();
            logits
                .iter_mut()
                .filter(|l| **l < cut)
                .for_each(|l| *l = f32::NEG_INFINITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adjusted(a: &LogitAdjust, output: &[(u32, u32)], generated: usize) -> Vec<f32> {
        let mut logits = vec![1.0, 2.0, -1.0, 0.5];
        a.apply(
            &mut logits,
            &output.iter().copied().collect(),
            generated,
            1.0,
        );
        logits
    }

    #[test]
    fn each_adjustment_does_what_its_field_says() {
        assert!(LogitAdjust::default().is_noop());
        let bias = LogitAdjust {
            logit_bias: vec![(2, 100.0), (9, 5.0)],
            ..LogitAdjust::default()
        };
        assert_eq!(adjusted(&bias, &[], 0), [1.0, 2.0, 99.0, 0.5]);
        let rep = LogitAdjust {
            repetition_penalty: 2.0,
            prompt: vec![0, 2],
            ..LogitAdjust::default()
        };
        assert_eq!(adjusted(&rep, &[(1, 3)], 0), [0.5, 1.0, -2.0, 0.5]);
        let pen = LogitAdjust {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..LogitAdjust::default()
        };
        assert_eq!(adjusted(&pen, &[(1, 2)], 2), [1.0, 1.0, -1.0, 0.5]);
        let min = LogitAdjust {
            min_tokens: 2,
            stops: vec![1],
            ..LogitAdjust::default()
        };
        assert!(!min.is_noop());
        assert_eq!(adjusted(&min, &[], 1)[1], f32::NEG_INFINITY);
        assert_eq!(adjusted(&min, &[], 2)[1], 2.0);
        // p(0)/p(1) = e^-1 ~ 0.37: kept at min_p 0.3, cut at 0.5.
        let min_p = |p| LogitAdjust {
            min_p: p,
            ..LogitAdjust::default()
        };
        assert_eq!(adjusted(&min_p(0.3), &[], 0)[0], 1.0);
        assert_eq!(adjusted(&min_p(0.5), &[], 0)[0], f32::NEG_INFINITY);
        assert_eq!(adjusted(&min_p(0.5), &[], 0)[1], 2.0);
    }
}
