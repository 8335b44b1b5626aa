//! A simulator of a whole cluster (pure logic, no servers) that compares `static` workers
//! (each alone, like independent vLLM instances) with `pooled` ones (KV borrowed across the
//! cluster, placed by the gManager's placement code) on the same traces, with the same cost
//! model and hardware figures. `make simulate` prints its report.

pub mod cluster;

use std::io::Write;

use cluster::{ClusterConfig, Outcome, Policy};
use infinite_llm_policy::StepRule;
use infinite_llm_workload::trace::TraceConfig;

use crate::gmanager::placement::{Measured, PlacementConfig};

/// GPU counts `make simulate` reports on.
pub const SCALES: [usize; 5] = [4, 16, 64, 256, 1024];

/// GPUs per instance of the configurations compared, static and pooled alike: one GPU each
/// (independent vLLM instances), or tensor-parallel groups of two or four. A pool spans
/// instances of any size, as in the paper, where each instance is itself model-parallel.
pub const INSTANCE_GPUS: [usize; 3] = [1, 2, 4];

impl ClusterConfig {
    /// `gpus` GPUs of the `measured` figures (`Measured::default()`: an H100 with a Llama-3-8B
    /// shape, DESIGN.md §6) as instances of `per_instance` GPUs each, the CRD's kvCache
    /// defaults (16-token blocks, lend fraction 0.5, high watermark 0.9), the worker's step
    /// rule at a GPU's budget, and the gManager's default placement policy over that cost model.
    ///
    /// An instance of several GPUs is tensor parallel (Megatron style): each GPU holds
    /// 1/`per_instance` of the weights, so the pool holds what all their memory leaves; dense
    /// work and attention split over the GPUs; each layer adds two all-reduces of the step's
    /// rows (after attention and after the MLP), each a one-way link latency (half the measured
    /// round trip) plus a ring's 2(g-1)/g of the rows' activations at the link rate.
    pub fn measured(gpus: usize, per_instance: usize, measured: &Measured) -> Self {
        let g = per_instance.max(1) as f64;
        let m = Measured {
            hbm_bytes: measured.hbm_bytes * g,
            activation_bytes: measured.activation_bytes * g,
            ..measured.clone()
        };
        let mut placement = PlacementConfig::for_measured(measured);
        let c = &mut placement.cost;
        c.weight_read_s /= g;
        c.dense_token_s /= g;
        c.attn_token_s /= g;
        c.attn_pair_s /= g;
        let allreduces = 2.0 * m.layers;
        let step_overhead = if per_instance > 1 {
            (
                allreduces * m.layer_round_trip_s / 2.0,
                allreduces * 2.0 * (g - 1.0) / g * m.hidden_size * m.bytes_per_param
                    / m.link_bytes_per_s,
            )
        } else {
            (0.0, 0.0)
        };
        ClusterConfig {
            instances: gpus / per_instance.max(1),
            gpus_per_instance: per_instance.max(1),
            kv_tokens_per_worker: m.kv_capacity_tokens(),
            block_tokens: 16,
            lend_fraction: 0.5,
            rule: StepRule {
                max_batched_tokens: 2048,
                long_prefill_tokens: 2048,
                long_prefill_share: 0.5,
                long_prefill_pairs: StepRule::default().long_prefill_pairs,
            },
            max_num_seqs: 256,
            step_overhead,
            tick_s: 0.1,
            placement_interval_s: 1.0,
            queue_timeout_s: 60.0,
            placement,
            seed: 7,
        }
    }

    /// How the configuration is named in the report.
    pub fn name(&self, policy: Policy) -> String {
        match self.gpus_per_instance {
            1 => policy.name().into(),
            g => format!("{}-tp{g}", policy.name()),
        }
    }
}

/// Every policy on one trace at one GPU count.
pub struct Comparison {
    pub trace: &'static str,
    pub gpus: usize,
    /// Each configuration that fits the GPU count, per policy: its name and outcome.
    pub pooled: Vec<(String, Outcome)>,
    pub statics: Vec<(String, Outcome)>,
}

/// The configuration with the most tokens/s; one-GPU instances always fit.
fn best(runs: &[(String, Outcome)]) -> &(String, Outcome) {
    runs.iter()
        .max_by(|a, b| a.1.tokens_per_s.total_cmp(&b.1.tokens_per_s))
        .expect("one-GPU instances always fit")
}

impl Comparison {
    pub fn best_pooled(&self) -> &(String, Outcome) {
        best(&self.pooled)
    }

    pub fn best_static(&self) -> &(String, Outcome) {
        best(&self.statics)
    }

    /// `o`'s tokens/s over the best static configuration's.
    pub fn ratio_of(&self, o: &Outcome) -> f64 {
        o.tokens_per_s / self.best_static().1.tokens_per_s.max(f64::MIN_POSITIVE)
    }

    /// The best pooled configuration's tokens/s over the best static one's.
    pub fn ratio(&self) -> f64 {
        self.ratio_of(&self.best_pooled().1)
    }

    /// Pooled over static tokens/s with one-GPU instances on both sides: the workers the
    /// operator deploys (one GPU each) against independent one-GPU vLLM-style instances.
    pub fn one_gpu_ratio(&self) -> f64 {
        let one = |runs: &[(String, Outcome)], policy: Policy| {
            runs.iter()
                .find(|(name, _)| name == policy.name())
                .map_or(0.0, |(_, o)| o.tokens_per_s)
        };
        one(&self.pooled, Policy::Pooled)
            / one(&self.statics, Policy::Static).max(f64::MIN_POSITIVE)
    }
}

/// Runs every policy and instance size that fits the GPU count on the same generated trace
/// (the same arrivals for the same GPUs), side by side on threads.
pub fn compare(trace: &TraceConfig, gpus: usize, m: &Measured) -> Comparison {
    let requests = trace.generate(gpus);
    let configs: Vec<ClusterConfig> = INSTANCE_GPUS
        .iter()
        .filter(|&&g| gpus.is_multiple_of(g))
        .map(|&g| ClusterConfig::measured(gpus, g, m))
        .collect();
    let runs = |policy| {
        std::thread::scope(|s| {
            let handles: Vec<_> = configs
                .iter()
                .map(|c| {
                    let requests = &requests;
                    s.spawn(move || {
                        let out = cluster::run(c, policy, requests, trace.duration_s);
                        (c.name(policy), out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a simulated run panicked"))
                .collect::<Vec<_>>()
        })
    };
    Comparison {
        trace: trace.name,
        gpus,
        pooled: runs(Policy::Pooled),
        statics: runs(Policy::Static),
    }
}

/// Writes the report for GPUs of the `m` figures: parameters, one row per trace, GPU count and
/// configuration, and the summary line.
pub fn report(out: &mut impl Write, scales: &[usize], m: &Measured) -> std::io::Result<()> {
    let c = m.cost_model();
    let base = ClusterConfig::measured(1, 1, m);
    writeln!(
        out,
        "GPU: KV {} tokens ({} blocks of {}), weight read {:.2} ms/step, dense {:.1} us/token, \
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
    let r = base.rule;
    writeln!(
        out,
        "step rule: {} tokens, decodes first, prompts over {} tokens after shorter ones and at most {:.0}% of a shared step \
         and {} attention pairs; \
         KV grows as tokens arrive (a batch of {} blocks borrowed at once); {} requests per instance; queue limit {} s",
        r.max_batched_tokens,
        r.long_prefill_tokens,
        r.long_prefill_share * 100.0,
        r.long_prefill_pairs,
        infinite_llm_policy::BORROW_BATCH_BLOCKS,
        base.max_num_seqs,
        base.queue_timeout_s,
    )?;
    let traces = [
        TraceConfig::short(),
        TraceConfig::long(),
        TraceConfig::long_overload(),
    ];
    for t in &traces {
        writeln!(
            out,
            "trace {}: {:.2} req/s per GPU for {} s, {:.0}% long (Pareto a={} from {} to {} tokens), \
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
        "{:<6} {:>5} {:<12} {:>11} {:>8} {:>10} {:>8} {:>8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "trace",
        "GPUs",
        "config",
        "tokens/s",
        "offered",
        "output/s",
        "arrived",
        "rejected",
        "p50 s",
        "p99 s",
        "ttft50 s",
        "ttft99 s",
        "pooled/st",
        "round ms",
        "moved"
    )?;
    let largest = scales.iter().copied().max().unwrap_or(0);
    let mut summary = Summary::default();
    for t in &traces {
        for &n in scales {
            let cmp = compare(t, n, m);
            let rows = cmp
                .pooled
                .iter()
                .map(|r| (true, r))
                .chain(cmp.statics.iter().map(|r| (false, r)));
            for (pooled, (name, o)) in rows {
                let (ratio, round, moved) = if pooled {
                    (
                        format!("{:.2}x", cmp.ratio_of(o)),
                        format!("{:.3}", o.placement_round_ms),
                        o.moved_blocks.to_string(),
                    )
                } else {
                    Default::default()
                };
                writeln!(
                    out,
                    "{:<6} {:>5} {:<12} {:>11.0} {:>7.0}% {:>10.0} {:>8} {:>8} {:>7.1} {:>7.1} {:>8.2} {:>8.2} {:>9} {:>9} {:>8}",
                    t.name,
                    n,
                    name,
                    o.tokens_per_s,
                    100.0 * o.tokens_per_s / o.offered_tokens_per_s.max(f64::MIN_POSITIVE),
                    o.output_tokens_per_s,
                    o.arrived,
                    o.rejected,
                    o.p50_latency_s,
                    o.p99_latency_s,
                    o.short_ttft_p50_s,
                    o.short_ttft_p99_s,
                    ratio,
                    round,
                    moved
                )?;
            }
            out.flush()?;
            summary.add(&cmp, n == largest);
        }
    }
    writeln!(out, "{}", summary.line(largest))
}

/// What the summary line reports, gathered row by row.
#[derive(Default)]
struct Summary {
    /// Long trace at 16 and at the largest GPU count: ratio, the best configurations' names
    /// (pooled, static), and the ratio's ceiling (the offered load over the best static).
    long: Vec<(usize, f64, String, String, f64)>,
    /// The lowest pooled/best-static ratio over every row, and where.
    worst: Option<(f64, &'static str, usize)>,
    /// The highest pooled/best-static short TTFT ratios (p50, p99), and where.
    ttft50: Option<(f64, &'static str, usize)>,
    ttft99: Option<(f64, &'static str, usize)>,
    /// One-GPU pooled over one-GPU static on the long trace at 16 and the largest count, and
    /// the lowest over every row.
    one_gpu_long: Vec<(usize, f64)>,
    one_gpu_worst: Option<(f64, &'static str, usize)>,
    round_ms: f64,
}

impl Summary {
    fn add(&mut self, cmp: &Comparison, largest: bool) {
        let ratio = cmp.ratio();
        let (pooled, best) = (&cmp.best_pooled().1, cmp.best_static());
        if cmp.trace == "long" && (cmp.gpus == 16 || largest) {
            let pooled_name = cmp.best_pooled().0.clone();
            let ceiling = best.1.offered_tokens_per_s / best.1.tokens_per_s.max(f64::MIN_POSITIVE);
            self.long
                .push((cmp.gpus, ratio, pooled_name, best.0.clone(), ceiling));
        }
        let keep_min = |slot: &mut Option<(f64, &'static str, usize)>, v: f64| {
            if slot.is_none_or(|(w, _, _)| v < w) {
                *slot = Some((v, cmp.trace, cmp.gpus));
            }
        };
        keep_min(&mut self.worst, ratio);
        let one_gpu = cmp.one_gpu_ratio();
        keep_min(&mut self.one_gpu_worst, one_gpu);
        if cmp.trace == "long" && (cmp.gpus == 16 || largest) {
            self.one_gpu_long.push((cmp.gpus, one_gpu));
        }
        let ttft = |p: f64, s: f64| if s > 0.0 { p / s } else { 1.0 };
        let keep_max = |slot: &mut Option<(f64, &'static str, usize)>, v: f64| {
            if slot.is_none_or(|(w, _, _)| v > w) {
                *slot = Some((v, cmp.trace, cmp.gpus));
            }
        };
        keep_max(
            &mut self.ttft50,
            ttft(pooled.short_ttft_p50_s, best.1.short_ttft_p50_s),
        );
        keep_max(
            &mut self.ttft99,
            ttft(pooled.short_ttft_p99_s, best.1.short_ttft_p99_s),
        );
        if largest {
            for (_, o) in &cmp.pooled {
                self.round_ms = self.round_ms.max(o.placement_round_ms);
            }
        }
    }

    fn line(&self, largest: usize) -> String {
        let long: Vec<String> = self
            .long
            .iter()
            .map(|(n, r, pooled, name, ceiling)| {
                format!(
                    "{r:.2}x at {n} GPUs ({pooled} against {name}; all offered tokens would be {ceiling:.2}x)"
                )
            })
            .collect();
        let at = |s: &Option<(f64, &'static str, usize)>| {
            s.map_or("n/a".into(), |(v, t, n)| format!("{v:.2}x ({t}, {n} GPUs)"))
        };
        let one_gpu: Vec<String> = self
            .one_gpu_long
            .iter()
            .map(|(n, r)| format!("{r:.2}x at {n} GPUs"))
            .collect();
        format!(
            "summary: best pooled/best static tokens/s on the long trace {}; lowest over all rows {}; \
             short-prompt TTFT best pooled/best static at worst p50 {} p99 {}; placement round at {largest} GPUs {:.2} ms; \
             one-GPU workers (what the operator deploys), pooled/static tokens/s on the long trace {}, lowest over all rows {}",
            long.join(", "),
            at(&self.worst),
            at(&self.ttft50),
            at(&self.ttft99),
            self.round_ms,
            one_gpu.join(", "),
            at(&self.one_gpu_worst),
        )
    }
}

#[cfg(test)]
mod tests {
    use infinite_llm_workload::trace::Request;

    use super::*;

    /// GPUs with about 32K tokens of KV each.
    fn small_gpu() -> Measured {
        Measured {
            hbm_bytes: 25e9,
            ..Measured::default()
        }
    }

    /// Long requests larger than one GPU's pool: one-GPU static instances can never serve
    /// them, pooled ones must.
    #[test]
    fn pooled_serves_long_requests_that_static_cannot() {
        let cluster = ClusterConfig::measured(4, 1, &small_gpu());
        assert!(cluster.kv_tokens_per_worker < 40_000);
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
        let requests = trace.generate(4);
        let run = |policy| cluster::run(&cluster, policy, &requests, trace.duration_s);
        let (s, p) = (run(Policy::Static), run(Policy::Pooled));
        assert_eq!(s.completed_oversized, 0, "static cannot hold them");
        assert!(
            p.completed_oversized > 0,
            "pooled served no oversized request: {p:?}"
        );
        assert!(p.rejected < s.rejected, "{s:?} {p:?}");
        assert!(p.tokens_per_s > s.tokens_per_s, "{s:?} {p:?}");
        assert_eq!(
            s.offered_tokens_per_s, p.offered_tokens_per_s,
            "the same trace"
        );
        assert!(
            p.tokens_per_s <= p.offered_tokens_per_s * (1.0 + 1e-9),
            "{p:?}"
        );
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
            ClusterConfig::measured(4, 1, &m),
            ClusterConfig::measured(4, 1, &Measured::default()),
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
        for config in [
            "pooled ",
            "pooled-tp2",
            "pooled-tp4",
            "static ",
            "static-tp2",
            "static-tp4",
        ] {
            assert!(text.contains(config), "no {config} row:\n{text}");
        }
        assert!(text.contains("summary: "), "{text}");
    }

    /// Tensor parallel instances hold the KV all their GPUs' memory leaves once the weights
    /// are split, and pay all-reduces per step.
    #[test]
    fn tensor_parallel_instances_pool_their_gpus_and_pay_all_reduces() {
        let m = Measured::default();
        let (one, tp2) = (
            ClusterConfig::measured(8, 1, &m),
            ClusterConfig::measured(8, 2, &m),
        );
        assert_eq!((one.instances, tp2.instances), (8, 4));
        assert!(
            tp2.kv_tokens_per_worker > 2 * one.kv_tokens_per_worker,
            "the weights are stored once per instance"
        );
        assert_eq!(one.step_overhead, (0.0, 0.0));
        let (fixed, per_row) = tp2.step_overhead;
        assert!(fixed > 0.0 && per_row > 0.0);
        assert!(tp2.placement.cost.weight_read_s < one.placement.cost.weight_read_s);
    }

    /// One request alone on one worker decodes at the cost model's step time.
    #[test]
    fn a_lone_request_takes_the_cost_models_time() {
        let cluster = ClusterConfig::measured(1, 1, &Measured::default());
        let requests = [Request {
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
            let served = out.tokens_per_s / out.offered_tokens_per_s;
            assert!(
                (served - 1.0).abs() < 1e-9,
                "all it was offered is served: {out:?}"
            );
            let error = (out.p50_latency_s - expected).abs() / expected;
            assert!(
                error < 0.02,
                "{}: {} s against {expected} s",
                policy.name(),
                out.p50_latency_s
            );
        }
    }

    /// A request grows by the blocks its tokens need: two requests whose prompts and outputs
    /// together outgrow the pool start at once, and the newest yields (recomputed later)
    /// rather than either waiting for a reservation.
    #[test]
    fn requests_start_with_their_first_chunk_and_the_newest_yields_when_full() {
        let cluster = ClusterConfig::measured(1, 1, &small_gpu());
        let kv = cluster.kv_tokens_per_worker;
        let requests = [0.0, 0.01].map(|arrival_s| Request {
            arrival_s,
            prompt_tokens: kv / 4,
            output_tokens: kv / 3,
        });
        let out = cluster::run(&cluster, Policy::Static, &requests, 600.0);
        assert_eq!(out.completed, 2, "{out:?}");
        assert!(out.preemptions >= 1, "{out:?}");
    }
}
