//! What a replay sends: a trace's requests with their lengths shrunk to what the served model can
//! hold and their arrival times stretched or compressed.

use std::time::Duration;

use crate::trace::{Request, TraceConfig};

/// One request to send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    /// Position in the trace; also seeds the request's prompt.
    pub index: usize,
    /// When to send it, from the start of the replay.
    pub at: Duration,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
}

/// How trace lengths and times map onto the endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shaping {
    /// Multiplies both prompt and output lengths.
    pub scale_tokens: f64,
    pub max_prompt_tokens: Option<usize>,
    pub max_output_tokens: Option<usize>,
    /// Multiplies arrival times: 0.5 replays twice as fast.
    pub time_scale: f64,
}

impl Default for Shaping {
    fn default() -> Self {
        Shaping {
            scale_tokens: 1.0,
            max_prompt_tokens: None,
            max_output_tokens: None,
            time_scale: 1.0,
        }
    }
}

impl Shaping {
    /// Every length stays at least one token: an empty prompt or `max_tokens: 0` is an error,
    /// not a smaller request.
    pub fn shape(&self, index: usize, request: &Request) -> Planned {
        let scale = |tokens: u64, cap: Option<usize>| {
            let scaled = (tokens as f64 * self.scale_tokens).round() as usize;
            scaled.min(cap.unwrap_or(usize::MAX)).max(1)
        };
        Planned {
            index,
            at: Duration::from_secs_f64(request.arrival_s * self.time_scale),
            prompt_tokens: scale(request.prompt_tokens, self.max_prompt_tokens),
            max_tokens: scale(request.output_tokens, self.max_output_tokens),
        }
    }
}

/// The trace's requests arriving within its duration, at most `requests` of them, shaped. The
/// trace is generated for one endpoint: its rate is the endpoint's.
pub fn plan(trace: &TraceConfig, requests: Option<usize>, shaping: &Shaping) -> Vec<Planned> {
    trace
        .arrivals(1)
        .take_while(|r| r.arrival_s < trace.duration_s)
        .take(requests.unwrap_or(usize::MAX))
        .enumerate()
        .map(|(i, r)| shaping.shape(i, &r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_scaled_capped_and_at_least_one() {
        let shaping = Shaping {
            scale_tokens: 0.01,
            max_prompt_tokens: Some(500),
            max_output_tokens: Some(8),
            time_scale: 0.5,
        };
        let request = |prompt_tokens, output_tokens| Request {
            arrival_s: 3.0,
            prompt_tokens,
            output_tokens,
        };
        assert_eq!(
            shaping.shape(4, &request(20_000, 1000)),
            Planned {
                index: 4,
                at: Duration::from_millis(1500),
                prompt_tokens: 200,
                max_tokens: 8,
            }
        );
        let capped = shaping.shape(0, &request(2_000_000, 40));
        assert_eq!((capped.prompt_tokens, capped.max_tokens), (500, 1));
        let tiny = shaping.shape(0, &request(3, 20));
        assert_eq!((tiny.prompt_tokens, tiny.max_tokens), (1, 1));
    }

    #[test]
    fn plan_cuts_by_count_or_duration() {
        let mut trace = TraceConfig::long();
        trace.rate_per_instance = 10.0;
        trace.duration_s = 5.0;
        let all = plan(&trace, None, &Shaping::default());
        assert!((30..80).contains(&all.len()), "{}", all.len());
        assert!(all.iter().all(|p| p.at < Duration::from_secs(5)));
        assert!(all.iter().enumerate().all(|(i, p)| p.index == i));
        assert_eq!(plan(&trace, Some(7), &Shaping::default()), all[..7]);
        // Unscaled, the lengths are the trace's own.
        let raw = trace.generate(1);
        assert_eq!(all.len(), raw.len());
        assert_eq!(all[3].prompt_tokens as u64, raw[3].prompt_tokens);
        assert_eq!(all[3].max_tokens as u64, raw[3].output_tokens);
    }
}
