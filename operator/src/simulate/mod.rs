//! A simulator of a whole cluster (pure logic, no servers) that compares `static` workers
//! (each alone, like independent vLLM instances) with `pooled` ones (KV borrowed across the
//! cluster, placed by the gManager's placement code) on the same traces, with the same cost
//! model and hardware figures. `make simulate` prints its report.

pub mod cluster;

use std::io::Write;

use cluster::{ClusterConfig, Outcome, Policy};
use infinite_llm_workload::trace::TraceConfig;

use crate::gmanager::placement::{Measured, PlacementConfig};

/// Instance counts `make simulate` reports on.
pub const SCALES: [usize; 5] = [4, 16, 64, 256, 1024];

impl ClusterConfig {
    /// Workers of the `measured` figures (`Measured::default()`: an H100 with a Llama-3-8B
    /// shape, DESIGN.md §6), the CRD's kvCache defaults (16-token blocks, lend fraction 0.5,
    /// high watermark 0.9), and the gManager's default placement policy over that cost model.
    pub fn measured(instances: usize, measured: &Measured) -> Self {
        ClusterConfig {
            instances,
            kv_tokens_per_worker: measured.kv_capacity_tokens(),
            block_tokens: 16,
            lend_fraction: 0.5,
            prefill_chunk_tokens: 2048,
            tick_s: 0.1,
            placement_interval_s: 1.0,
            queue_timeout_s: 60.0,
            placement: PlacementConfig::for_measured(measured),
            seed: 7,
        }
    }
}

/// Both policies on one trace at one scale.
pub struct Comparison {
    pub trace: &'static str,
    pub instances: usize,
    pub static_: Outcome,
    pub pooled: Outcome,
}

impl Comparison {
    pub fn ratio(&self) -> f64 {
        self.pooled.tokens_per_s / self.static_.tokens_per_s.max(f64::MIN_POSITIVE)
    }
}

/// Runs both policies on the same generated trace, side by side on two threads.
pub fn compare(trace: &TraceConfig, cluster: &ClusterConfig) -> Comparison {
    let requests = trace.generate(cluster.instances);
    let run = |policy| cluster::run(cluster, policy, &requests, trace.duration_s);
    let (static_, pooled) = std::thread::scope(|s| {
        let pooled = s.spawn(|| run(Policy::Pooled));
        let static_ = run(Policy::Static);
        (static_, pooled.join().expect("the pooled run panicked"))
    });
    Comparison {
        trace: trace.name,
        instances: cluster.instances,
        static_,
        pooled,
    }
}

/// Writes the report for workers of the `m` figures: parameters, one row per trace, scale and
/// policy, and the summary line.
pub fn report(out: &mut impl Write, scales: &[usize], m: &Measured) -> std::io::Result<()> {
    let c = m.cost_model();
    let base = ClusterConfig::measured(1, m);
    writeln!(
        out,
        "worker: KV {} tokens ({} blocks of {}), weight read {:.2} ms/step, dense {:.1} us/token, \
         decode attention {:.1} ns/token, prefill attention {:.3} ps/pair, remote wait {:.2} ms/step",
        base.kv_tokens_per_worker,
        base.kv_tokens_per_worker / base.block_tokens,
        base.block_tokens,
        c.weight_read_s * 1e3,
        c.dense_token_s * 1e6,
        c.attn_token_s * 1e9,
        c.attn_pair_s * 1e12,
        c.remote_step_s * 1e3,
    )?;
    let traces = [
        TraceConfig::short(),
        TraceConfig::long(),
        TraceConfig::long_overload(),
    ];
    for t in &traces {
        writeln!(
            out,
            "trace {}: {:.2} req/s per instance for {} s, {:.0}% long (Pareto a={} from {} to {} tokens), \
             short 1-{} tokens, output {}-{} tokens",
            t.name,
            t.rate_per_instance,
            t.duration_s,
            t.long_share * 100.0,
            t.long_alpha,
            t.long_min_tokens,
            t.long_max_tokens,
            t.short_max_tokens,
            t.output_tokens.0,
            t.output_tokens.1,
        )?;
    }
    writeln!(
        out,
        "{:<6} {:>9} {:<7} {:>13} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "trace",
        "instances",
        "policy",
        "tokens/s",
        "output/s",
        "arrived",
        "rejected",
        "p50 s",
        "p99 s",
        "pooled/st",
        "round ms",
        "moved"
    )?;
    let largest = scales.iter().copied().max().unwrap_or(0);
    let mut summary_ratio = None;
    // The slowest round at the largest scale over all traces.
    let mut summary_round = None;
    for t in &traces {
        for &n in scales {
            let cmp = compare(t, &ClusterConfig::measured(n, m));
            for (policy, o) in [
                (Policy::Static, &cmp.static_),
                (Policy::Pooled, &cmp.pooled),
            ] {
                let (ratio, round, moved) = if policy == Policy::Pooled {
                    (
                        format!("{:.2}x", cmp.ratio()),
                        format!("{:.3}", o.placement_round_ms),
                        o.moved_blocks.to_string(),
                    )
                } else {
                    ("".into(), "".into(), "".into())
                };
                writeln!(
                    out,
                    "{:<6} {:>9} {:<7} {:>13.0} {:>12.0} {:>9} {:>9} {:>9.1} {:>9.1} {:>9} {:>10} {:>9}",
                    t.name,
                    n,
                    policy.name(),
                    o.tokens_per_s,
                    o.output_tokens_per_s,
                    o.arrived,
                    o.rejected,
                    o.p50_latency_s,
                    o.p99_latency_s,
                    ratio,
                    round,
                    moved
                )?;
            }
            out.flush()?;
            if t.name == "long" && n == 16 {
                summary_ratio = Some(cmp.ratio());
            }
            let slowest = summary_round.map_or(0.0, |(_, ms): (usize, f64)| ms);
            if n == largest {
                summary_round = Some((n, slowest.max(cmp.pooled.placement_round_ms)));
            }
        }
    }
    let ratio = summary_ratio.map_or("n/a".into(), |r| format!("{r:.2}x"));
    let (n, ms) = summary_round.unwrap_or((0, 0.0));
    writeln!(
        out,
        "summary: pooled/static throughput {ratio} (long trace, 16 instances); placement round at {n} instances {ms:.2} ms"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long requests larger than one worker's pool: static can never serve them, pooled must.
    #[test]
    fn pooled_serves_long_requests_that_static_cannot() {
        let mut cluster = ClusterConfig::measured(4, &Measured::default());
        cluster.kv_tokens_per_worker = 32_768;
        let trace = TraceConfig {
            name: "oversized",
            rate_per_instance: 0.05,
            duration_s: 120.0,
            long_share: 0.5,
            short_max_tokens: 4_000,
            long_min_tokens: 40_000,
            long_alpha: 2.0,
            long_max_tokens: 60_000,
            output_tokens: (16, 64),
            seed: 3,
        };
        let cmp = compare(&trace, &cluster);
        let (s, p) = (&cmp.static_, &cmp.pooled);
        assert_eq!(s.completed_oversized, 0, "static cannot hold them");
        assert!(
            p.completed_oversized > 0,
            "pooled served no oversized request: {p:?}"
        );
        assert!(p.rejected < s.rejected, "{s:?} {p:?}");
        assert!(p.tokens_per_s > s.tokens_per_s, "{s:?} {p:?}");
        assert_eq!(s.arrived, p.arrived, "the same trace");
    }

    /// Simulated workers take the figures given: more memory holds more KV, a faster one
    /// reads the weights sooner.
    #[test]
    fn workers_are_simulated_with_the_figures_given() {
        let m = Measured {
            hbm_bytes: 1.41e11,
            mem_bytes_per_s: 4.8e12,
            ..Measured::default()
        };
        let (h200, h100) = (
            ClusterConfig::measured(4, &m),
            ClusterConfig::measured(4, &Measured::default()),
        );
        assert!(h200.kv_tokens_per_worker > h100.kv_tokens_per_worker);
        assert!(h200.placement.cost.weight_read_s < h100.placement.cost.weight_read_s);
        let mut out = Vec::new();
        report(&mut out, &[4], &m).unwrap();
        let text = String::from_utf8(out).unwrap();
        let first = text.lines().next().unwrap();
        assert!(
            first.contains(&format!("KV {} tokens", m.kv_capacity_tokens())),
            "{first}"
        );
    }

    /// One request alone on one worker decodes at the cost model's step time.
    #[test]
    fn a_lone_request_takes_the_cost_models_time() {
        let cluster = ClusterConfig::measured(1, &Measured::default());
        let requests = [infinite_llm_workload::trace::Request {
            arrival_s: 0.0,
            prompt_tokens: 16,
            output_tokens: 2_000,
        }];
        let cost = &cluster.placement.cost;
        // One prefill step, then a step per output token over a growing context.
        let expected: f64 = cost.decode_step_s(16.0, 0.0, false)
            + (0..2_000u32)
                .map(|i| cost.decode_step_s(1.0, 16.0 + f64::from(i), false))
                .sum::<f64>();
        for policy in [Policy::Static, Policy::Pooled] {
            let out = cluster::run(&cluster, policy, &requests, 60.0);
            assert_eq!(out.completed, 1);
            let error = (out.p50_latency_s - expected).abs() / expected;
            assert!(
                error < 0.02,
                "{}: {} s against {expected} s",
                policy.name(),
                out.p50_latency_s
            );
        }
    }
}
