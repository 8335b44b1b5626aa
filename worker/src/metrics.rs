//! The worker's Prometheus metrics. Request-level figures are recorded as requests run; pool and
//! queue gauges are read from the engine at scrape time, so they are never stale.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::engine::EngineStats;
use crate::peer::frame_checks::Rejects;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

// Bucket bounds follow vLLM's, so dashboards built for it read ours the same way.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishLabels {
    finished_reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests_running: Gauge,
    requests_waiting: Gauge,
    kv_blocks_total: Gauge,
    kv_blocks_used: Gauge,
    kv_cache_usage_ratio: Gauge<f64, AtomicU64>,
    kv_blocks_lent: Gauge,
    kv_blocks_borrowed: Gauge,
    num_preemptions: EngineCounter,
    kv_borrow: EngineCounter,
    kv_borrow_refusals: EngineCounter,
    kv_recomputed_blocks: EngineCounter,
    kv_migrated_blocks: EngineCounter,
    kv_migrations_in_flight: Gauge,
    peer_losses: EngineCounter,
    peer_direct_links: Gauge,
    draining: Gauge,
    generation_tokens: Counter,
    prompt_tokens: Counter,
    request_success: Family<FinishLabels, Counter>,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    e2e_request_latency: Histogram,
    remote_attention: Histogram,
    peer_rejects: Rejects,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ilm");
        let metrics = Self {
            requests_running: Gauge::default(),
            requests_waiting: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_cache_usage_ratio: Gauge::default(),
            kv_blocks_lent: Gauge::default(),
            kv_blocks_borrowed: Gauge::default(),
            num_preemptions: EngineCounter::default(),
            kv_borrow: EngineCounter::default(),
            kv_borrow_refusals: EngineCounter::default(),
            kv_recomputed_blocks: EngineCounter::default(),
            kv_migrated_blocks: EngineCounter::default(),
            kv_migrations_in_flight: Gauge::default(),
            peer_losses: EngineCounter::default(),
            peer_direct_links: Gauge::default(),
            draining: Gauge::default(),
            generation_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            request_success: Family::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(E2E_BUCKETS),
            remote_attention: Histogram::new(ITL_BUCKETS),
            peer_rejects: Rejects::default(),
            registry: Registry::default(),
        };
        // Counters get their `_total` suffix from the encoder, histograms their `_seconds` unit.
        registry.register(
            "requests_running",
            "Requests in the running batch",
            metrics.requests_running.clone(),
        );
        registry.register(
            "requests_waiting",
            "Requests queued for the running batch",
            metrics.requests_waiting.clone(),
        );
        registry.register(
            "kv_blocks_total",
            "rBlocks in this worker's KV pool",
            metrics.kv_blocks_total.clone(),
        );
        registry.register(
            "kv_blocks_used",
            "rBlocks of this worker's KV pool in use",
            metrics.kv_blocks_used.clone(),
        );
        registry.register(
            "kv_cache_usage_ratio",
            "Fraction of this worker's KV pool in use (0 to 1)",
            metrics.kv_cache_usage_ratio.clone(),
        );
        registry.register(
            "kv_blocks_lent",
            "rBlocks of this worker's pool held for other workers' requests",
            metrics.kv_blocks_lent.clone(),
        );
        registry.register(
            "kv_blocks_borrowed",
            "rBlocks other workers hold for this worker's requests",
            metrics.kv_blocks_borrowed.clone(),
        );
        registry.register(
            "kv_borrow",
            "rBlocks borrowed from other workers",
            metrics.kv_borrow.counter.clone(),
        );
        registry.register(
            "kv_borrow_refusals",
            "Reservations of rBlocks that creditors refused (full, or their lend cap reached)",
            metrics.kv_borrow_refusals.counter.clone(),
        );
        registry.register(
            "kv_recomputed_blocks",
            "rBlocks recomputed from token ids because the creditor holding them was lost, or drained with no room elsewhere",
            metrics.kv_recomputed_blocks.counter.clone(),
        );
        registry.register(
            "kv_migrated_blocks",
            "rBlocks of this worker's requests copied to another holder (drains, planned moves)",
            metrics.kv_migrated_blocks.counter.clone(),
        );
        registry.register(
            "kv_migrations_in_flight",
            "Requests of this worker whose rBlocks are being moved",
            metrics.kv_migrations_in_flight.clone(),
        );
        registry.register(
            "peer_losses",
            "Connections to creditors lost (closed, failed, or silent past the peer timeout)",
            metrics.peer_losses.counter.clone(),
        );
        registry.register(
            "peer_direct_links",
            "Creditor connections whose attention rows and partials travel over a direct device link (NCCL)",
            metrics.peer_direct_links.clone(),
        );
        registry.register(
            "peer_frames_rejected",
            "Frames refused on the peer port, by reason (bad values, out of turn, too large, not authenticated, blocks not lent to the sender)",
            metrics.peer_rejects.family(),
        );
        registry.register(
            "draining",
            "1 while this worker drains: no new requests, nothing more lent",
            metrics.draining.clone(),
        );
        registry.register(
            "num_preemptions",
            "Requests preempted because the KV pool was full",
            metrics.num_preemptions.counter.clone(),
        );
        registry.register(
            "generation_tokens",
            "Tokens generated",
            metrics.generation_tokens.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens prefilled",
            metrics.prompt_tokens.clone(),
        );
        registry.register(
            "request_success",
            "Requests that finished, by finish reason",
            metrics.request_success.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "Time from request arrival to its first generated token",
            Unit::Seconds,
            metrics.time_to_first_token.clone(),
        );
        registry.register_with_unit(
            "inter_token_latency",
            "Time between consecutive generated tokens of a request",
            Unit::Seconds,
            metrics.inter_token_latency.clone(),
        );
        registry.register_with_unit(
            "remote_attention",
            "Per layer, the wait for creditors' partial attention after local attention is done",
            Unit::Seconds,
            metrics.remote_attention.clone(),
        );
        registry.register_with_unit(
            "e2e_request_latency",
            "Time from request arrival to its end",
            Unit::Seconds,
            metrics.e2e_request_latency.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// A request's first token arrived: its prompt has been prefilled.
    pub fn first_token(&self, since_arrival: Duration, prompt_tokens: usize) {
        self.time_to_first_token
            .observe(since_arrival.as_secs_f64());
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.generation_tokens.inc();
    }

    /// The histogram the engine records remote attention waits in.
    pub fn remote_attention(&self) -> Histogram {
        self.remote_attention.clone()
    }

    /// Where the peer transport counts the frames it refuses.
    pub fn peer_rejects(&self) -> Rejects {
        self.peer_rejects.clone()
    }

    pub fn next_token(&self, since_previous: Duration) {
        self.inter_token_latency
            .observe(since_previous.as_secs_f64());
        self.generation_tokens.inc();
    }

    /// A request ended normally (`stop` or `length`); cancelled and failed ones are not counted.
    pub fn finished(&self, finished_reason: &'static str, since_arrival: Duration) {
        self.request_success
            .get_or_create(&FinishLabels { finished_reason })
            .inc();
        self.e2e_request_latency
            .observe(since_arrival.as_secs_f64());
    }

    /// The exposition text, with the engine gauges set from `stats`.
    pub fn render(&self, stats: &EngineStats) -> String {
        self.requests_running.set(gauge_value(stats.running));
        self.requests_waiting.set(gauge_value(stats.waiting));
        self.kv_blocks_total.set(gauge_value(stats.kv_blocks_total));
        self.kv_blocks_used.set(gauge_value(stats.kv_blocks_used));
        let ratio = if stats.kv_blocks_total == 0 {
            0.0
        } else {
            stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64
        };
        self.kv_cache_usage_ratio.set(ratio);
        self.kv_blocks_lent.set(gauge_value(stats.kv_blocks_lent));
        self.kv_blocks_borrowed
            .set(gauge_value(stats.kv_blocks_borrowed));
        self.num_preemptions.catch_up(stats.preemptions_total);
        self.kv_borrow.catch_up(stats.kv_borrow_total);
        self.kv_borrow_refusals
            .catch_up(stats.kv_borrow_refusals_total);
        self.kv_recomputed_blocks
            .catch_up(stats.kv_recomputed_blocks_total);
        self.kv_migrated_blocks
            .catch_up(stats.kv_migrated_blocks_total);
        self.kv_migrations_in_flight
            .set(gauge_value(stats.migrations_in_flight));
        self.peer_losses.catch_up(stats.peer_losses_total);
        self.peer_direct_links.set(stats.peer_direct_links as i64);
        self.draining.set(i64::from(stats.draining));
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// A counter kept by the engine, advanced at scrape time to the engine's figure.
#[derive(Default)]
struct EngineCounter {
    counter: Counter,
    /// The engine's figure at the last scrape.
    seen: AtomicU64,
}

impl EngineCounter {
    fn catch_up(&self, total: u64) {
        // fetch_max keeps concurrent scrapes from counting the same events twice.
        let seen = self.seen.fetch_max(total, Ordering::Relaxed);
        if total > seen {
            self.counter.inc_by(total - seen);
        }
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_metric() {
        let metrics = Metrics::new();
        metrics.first_token(Duration::from_millis(30), 12);
        metrics.next_token(Duration::from_millis(5));
        metrics.finished("length", Duration::from_millis(40));
        let stats = EngineStats {
            running: 1,
            waiting: 2,
            kv_blocks_total: 8,
            kv_blocks_used: 2,
            kv_blocks_lent: 1,
            kv_blocks_borrowed: 4,
            kv_borrow_total: 6,
            kv_borrow_refusals_total: 2,
            preemptions_total: 3,
            kv_recomputed_blocks_total: 5,
            peer_losses_total: 1,
            kv_migrated_blocks_total: 7,
            migrations_in_flight: 2,
            draining: true,
            ..EngineStats::default()
        };
        let text = metrics.render(&stats);
        for line in [
            "ilm_requests_running 1",
            "ilm_requests_waiting 2",
            "ilm_kv_blocks_total 8",
            "ilm_kv_blocks_used 2",
            "ilm_kv_cache_usage_ratio 0.25",
            "ilm_num_preemptions_total 3",
            "ilm_kv_blocks_lent 1",
            "ilm_kv_blocks_borrowed 4",
            "ilm_kv_borrow_total 6",
            "ilm_kv_borrow_refusals_total 2",
            "ilm_kv_recomputed_blocks_total 5",
            "ilm_peer_losses_total 1",
            "ilm_kv_migrated_blocks_total 7",
            "ilm_kv_migrations_in_flight 2",
            "ilm_draining 1",
            "ilm_generation_tokens_total 2",
            "ilm_prompt_tokens_total 12",
            "ilm_request_success_total{finished_reason=\"length\"} 1",
            "ilm_time_to_first_token_seconds_count 1",
            "ilm_inter_token_latency_seconds_count 1",
            "ilm_e2e_request_latency_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // A second scrape with the same engine figure does not count preemptions again.
        let text = metrics.render(&stats);
        assert!(text.lines().any(|l| l == "ilm_num_preemptions_total 3"));
    }
}
