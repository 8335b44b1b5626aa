//! The gManager's Prometheus metrics, labelled by cluster: members, epoch, pooled blocks by
//! state, debtors and creditors, blocks the last placement round would move, blocks the live
//! workers migrated, and borrow advice given.

use infinite_llm_protocol::gmanager::PoolView;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    cluster: String,
    state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    workers: Family<ClusterLabel, Gauge>,
    epoch: Family<ClusterLabel, Gauge>,
    blocks: Family<PoolLabel, Gauge>,
    roles: Family<RoleLabel, Gauge>,
    planned: Family<ClusterLabel, Gauge>,
    migrated: Family<ClusterLabel, Gauge>,
    advice: Family<ClusterLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    cluster: String,
    role: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ilm_gmanager");
        let workers = Family::<ClusterLabel, Gauge>::default();
        let epoch = Family::<ClusterLabel, Gauge>::default();
        let blocks = Family::<PoolLabel, Gauge>::default();
        let advice = Family::<ClusterLabel, Counter>::default();
        let roles = Family::<RoleLabel, Gauge>::default();
        let planned = Family::<ClusterLabel, Gauge>::default();
        let migrated = Family::<ClusterLabel, Gauge>::default();
        registry.register(
            "migrated_blocks",
            "Blocks the live workers' requests migrated since they started, as heartbeats report",
            migrated.clone(),
        );
        registry.register(
            "placement_workers",
            "Live workers by placement role (debtor or creditor)",
            roles.clone(),
        );
        registry.register(
            "planned_move_blocks",
            "Blocks the last placement round would move",
            planned.clone(),
        );
        registry.register("workers", "Live workers in the ledger", workers.clone());
        registry.register("epoch", "Membership epoch", epoch.clone());
        registry.register(
            "pool_blocks",
            "KV rBlocks over all live workers, by state",
            blocks.clone(),
        );
        registry.register(
            "borrow_advice",
            "Borrow requests answered with advice",
            advice.clone(),
        );
        Metrics {
            registry,
            workers,
            epoch,
            blocks,
            roles,
            planned,
            migrated,
            advice,
        }
    }
}

impl Metrics {
    /// Mirrors the cluster's current view.
    pub fn observe(&self, cluster: &str, view: &PoolView) {
        let label = ClusterLabel {
            cluster: cluster.to_owned(),
        };
        self.workers.get_or_create(&label).set(saturate(
            u64::try_from(view.workers.len()).unwrap_or(u64::MAX),
        ));
        self.epoch.get_or_create(&label).set(saturate(view.epoch));
        let t = &view.totals;
        for (state, value) in [
            ("total", t.total_blocks),
            ("used", t.used_blocks),
            ("lent", t.lent_blocks),
            ("borrowed", t.borrowed_blocks),
            ("free", t.free_blocks()),
        ] {
            self.blocks
                .get_or_create(&PoolLabel {
                    cluster: cluster.to_owned(),
                    state,
                })
                .set(saturate(value));
        }
        for (role, n) in [
            ("debtor", view.debtors.len()),
            ("creditor", view.creditors.len()),
        ] {
            self.roles
                .get_or_create(&RoleLabel {
                    cluster: cluster.to_owned(),
                    role,
                })
                .set(saturate(u64::try_from(n).unwrap_or(u64::MAX)));
        }
        let planned: u64 = view.planned_moves.iter().map(|m| m.blocks).sum();
        self.planned.get_or_create(&label).set(saturate(planned));
        let migrated: u64 = view.workers.iter().map(|w| w.migrated_blocks).sum();
        self.migrated.get_or_create(&label).set(saturate(migrated));
    }

    pub fn advised(&self, cluster: &str) {
        self.advice
            .get_or_create(&ClusterLabel {
                cluster: cluster.to_owned(),
            })
            .inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use infinite_llm_protocol::gmanager::{PlannedMove, PoolFigures, WorkerView};

    #[test]
    fn renders_the_view_and_advice() {
        let m = Metrics::default();
        let view = PoolView {
            epoch: 3,
            block_tokens: 16,
            workers: vec![WorkerView {
                worker_id: "w0".into(),
                api_url: String::new(),
                peer_addr: String::new(),
                pool: PoolFigures::default(),
                free_blocks: 0,
                last_seen_ms: 0,
                migrated_blocks: 5,
            }],
            totals: PoolFigures {
                total_blocks: 24,
                used_blocks: 10,
                lent_blocks: 4,
                borrowed_blocks: 2,
                ..Default::default()
            },
            debtors: vec!["w0".into()],
            creditors: vec!["w1".into(), "w2".into()],
            debts: Vec::new(),
            planned_moves: vec![PlannedMove {
                request: 1,
                from: "w0".into(),
                to: "w1".into(),
                blocks: 6,
            }],
            moves_in_flight: Vec::new(),
            epoch_history: Vec::new(),
        };
        m.observe("local", &view);
        m.advised("local");
        let text = m.render();
        for line in [
            r#"ilm_gmanager_workers{cluster="local"} 1"#,
            r#"ilm_gmanager_epoch{cluster="local"} 3"#,
            r#"ilm_gmanager_pool_blocks{cluster="local",state="total"} 24"#,
            r#"ilm_gmanager_pool_blocks{cluster="local",state="used"} 10"#,
            r#"ilm_gmanager_pool_blocks{cluster="local",state="lent"} 4"#,
            r#"ilm_gmanager_pool_blocks{cluster="local",state="borrowed"} 2"#,
            r#"ilm_gmanager_pool_blocks{cluster="local",state="free"} 10"#,
            r#"ilm_gmanager_borrow_advice_total{cluster="local"} 1"#,
            r#"ilm_gmanager_placement_workers{cluster="local",role="debtor"} 1"#,
            r#"ilm_gmanager_placement_workers{cluster="local",role="creditor"} 2"#,
            r#"ilm_gmanager_planned_move_blocks{cluster="local"} 6"#,
            r#"ilm_gmanager_migrated_blocks{cluster="local"} 5"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
