//! The replay's summary: what succeeded and failed, throughput over the wall time, latency
//! percentiles of the successful requests.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::measure::{Outcome, Status};
use crate::percentiles::Summary;
use crate::replay::Replay;

/// `--json` prints this; the benches parse it, so fields are only ever added.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    /// 429 Too Many Requests and 503 Service Unavailable: the server's refusals under load.
    pub rejected_429: usize,
    pub unavailable_503: usize,
    /// Failed requests by how they failed: an HTTP status, `transport` or `stream`.
    pub failures: BTreeMap<String, usize>,
    pub wall_s: f64,
    /// Successful requests and their tokens per second of wall time.
    pub requests_per_s: f64,
    pub output_tokens: usize,
    pub output_tokens_per_s: f64,
    pub prompt_tokens: usize,
    pub ttft_ms: Summary,
    pub itl_ms: Summary,
    pub e2e_ms: Summary,
    /// Time to first token of the successful requests whose prompt plus `max_tokens` is at
    /// most `--fit-tokens`: those a cluster of smaller pools also serves, so that two clusters
    /// are compared on the same requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fitting_ttft_ms: Option<Summary>,
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Report {
    pub fn of(replay: &Replay) -> Self {
        let ok: Vec<&Outcome> = replay
            .outcomes
            .iter()
            .filter(|o| o.status == Status::Ok)
            .collect();
        let mut failures = BTreeMap::new();
        for outcome in &replay.outcomes {
            let key = match outcome.status {
                Status::Ok => continue,
                Status::Http(code) => code.to_string(),
                Status::Transport => "transport".to_owned(),
                Status::Stream => "stream".to_owned(),
            };
            *failures.entry(key).or_insert(0) += 1;
        }
        let count = |code: &str| failures.get(code).copied().unwrap_or(0);
        let wall_s = replay.wall.as_secs_f64();
        let per_s = |n: usize| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
        let output_tokens = ok.iter().map(|o| o.output_tokens).sum();
        Report {
            requests: replay.outcomes.len(),
            ok: ok.len(),
            failed: replay.outcomes.len() - ok.len(),
            rejected_429: count("429"),
            unavailable_503: count("503"),
            wall_s,
            requests_per_s: per_s(ok.len()),
            output_tokens,
            output_tokens_per_s: per_s(output_tokens),
            prompt_tokens: ok.iter().map(|o| o.prompt_tokens).sum(),
            ttft_ms: Summary::of(ok.iter().filter_map(|o| o.ttft.as_ref()).map(ms).collect()),
            itl_ms: Summary::of(ok.iter().flat_map(|o| &o.itl).map(ms).collect()),
            e2e_ms: Summary::of(ok.iter().map(|o| ms(&o.e2e)).collect()),
            failures,
            fitting_ttft_ms: None,
        }
    }

    /// Adds the TTFT of the successful requests of at most `fit_tokens` prompt and output.
    pub fn with_fitting(mut self, replay: &Replay, fit_tokens: usize) -> Self {
        let fitting = replay
            .outcomes
            .iter()
            .filter(|o| o.status == Status::Ok && o.prompt_tokens + o.max_tokens <= fit_tokens);
        self.fitting_ttft_ms = Some(Summary::of(
            fitting.filter_map(|o| o.ttft.as_ref()).map(ms).collect(),
        ));
        self
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failures: Vec<String> = self
            .failures
            .iter()
            .map(|(how, n)| format!("{how}: {n}"))
            .collect();
        writeln!(
            f,
            "requests        {} ok, {} failed ({})",
            self.ok,
            self.failed,
            if failures.is_empty() {
                "none".to_owned()
            } else {
                failures.join(", ")
            }
        )?;
        writeln!(
            f,
            "rejected        {} with 429, {} with 503",
            self.rejected_429, self.unavailable_503
        )?;
        writeln!(f, "wall time       {:.2} s", self.wall_s)?;
        writeln!(f, "throughput      {:.3} requests/s", self.requests_per_s)?;
        writeln!(
            f,
            "output          {} tokens, {:.1} tokens/s ({} prompt tokens)",
            self.output_tokens, self.output_tokens_per_s, self.prompt_tokens
        )?;
        writeln!(f, "latency (ms)         p50       p90       p99")?;
        for (name, s) in [
            ("TTFT", &self.ttft_ms),
            ("ITL", &self.itl_ms),
            ("end-to-end", &self.e2e_ms),
        ] {
            let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
            writeln!(
                f,
                "  {name:<12} {:>9} {:>9} {:>9}",
                cell(s.p50),
                cell(s.p90),
                cell(s.p99)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(index: usize, status: Status, ttft_ms: u64, itl_ms: &[u64]) -> Outcome {
        let itl: Vec<Duration> = itl_ms.iter().map(|&m| Duration::from_millis(m)).collect();
        let ttft = Duration::from_millis(ttft_ms);
        Outcome {
            index,
            prompt_tokens: 10,
            max_tokens: itl.len() + 1,
            sent: Duration::ZERO,
            status,
            ttft: (status == Status::Ok).then_some(ttft),
            e2e: ttft + itl.iter().sum::<Duration>(),
            output_tokens: if status == Status::Ok {
                itl.len() + 1
            } else {
                0
            },
            itl,
            usage_tokens: None,
        }
    }

    #[test]
    fn counts_throughput_and_percentiles_of_the_successful() {
        let replay = Replay {
            outcomes: vec![
                outcome(0, Status::Ok, 100, &[10, 20]),
                outcome(1, Status::Ok, 300, &[30]),
                outcome(2, Status::Http(429), 1, &[]),
                outcome(3, Status::Http(503), 1, &[]),
                outcome(4, Status::Http(429), 1, &[]),
                outcome(5, Status::Stream, 1, &[]),
            ],
            wall: Duration::from_secs(2),
        };
        let r = Report::of(&replay);
        assert_eq!((r.requests, r.ok, r.failed), (6, 2, 4));
        assert_eq!((r.rejected_429, r.unavailable_503), (2, 1));
        let failures: Vec<(&str, usize)> =
            r.failures.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(failures, [("429", 2), ("503", 1), ("stream", 1)]);
        assert_eq!((r.output_tokens, r.prompt_tokens), (5, 20));
        assert_eq!(r.output_tokens_per_s, 2.5);
        assert_eq!(r.requests_per_s, 1.0);
        let near = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < 1e-9;
        assert!(near(r.ttft_ms.p50, 200.0) && near(r.ttft_ms.p99, 298.0));
        assert!(near(r.itl_ms.p50, 20.0));
        assert!(near(r.e2e_ms.p50, 230.0));

        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["rejected_429"], 2);
        assert!((json["ttft_ms"]["p90"].as_f64().unwrap() - 280.0).abs() < 1e-9);
        let table = r.to_string();
        assert!(
            table.contains("2 ok, 4 failed (429: 2, 503: 1, stream: 1)"),
            "{table}"
        );
        assert!(table.contains("2.5 tokens/s"), "{table}");
        assert!(json.get("fitting_ttft_ms").is_none());
    }

    #[test]
    fn fitting_ttft_counts_only_the_successful_requests_that_fit() {
        let mut long = outcome(1, Status::Ok, 900, &[10]);
        long.prompt_tokens = 1000;
        let replay = Replay {
            outcomes: vec![
                outcome(0, Status::Ok, 100, &[10, 20]),
                long,
                outcome(2, Status::Http(503), 5, &[]),
            ],
            wall: Duration::from_secs(1),
        };
        let r = Report::of(&replay).with_fitting(&replay, 100);
        let fitting = r.fitting_ttft_ms.unwrap();
        assert_eq!((fitting.p50, fitting.p99), (Some(100.0), Some(100.0)));
        assert_eq!(r.ttft_ms.p99.map(|v| v > 800.0), Some(true));
    }
}
