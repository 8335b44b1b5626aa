//! The gManager's HTTP API.
//!
//! - `POST /v1/workers` (`Register`) → `Registered`: a worker joins; the membership epoch moves.
//! - `POST /v1/workers/{id}/heartbeat` (`HeartbeatBody`) → `HeartbeatAck`: pool figures and
//!   placement changes, every `heartbeat_interval_ms`; the answer hands the worker the moves
//!   the last placement round planned for its requests, once. A worker unknown to the gManager
//!   (after a gManager restart) gets 404 and registers again, so the ledger rebuilds from what
//!   workers report.
//! - `POST /v1/borrow` (`BorrowRequest`) → `BorrowAdvice`: where a full home should try to
//!   reserve blocks, best creditor first. Advice only: the creditor's own reservation is what
//!   holds, so a stale view never double-books a block.
//! - `DELETE /v1/workers/{id}`: a worker leaves.
//! - `GET /v1/pool` → `PoolView`: per worker figures and the epoch, for people and autoscalers;
//!   also the debt ledger, debtors and creditors, and the moves the last placement round planned.

use serde::{Deserialize, Serialize};

/// Header carrying the cluster token: `Authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub worker_id: String,
    /// Base URL of the worker's OpenAI API, e.g. `http://10.0.0.5:8000`.
    pub api_url: String,
    /// `host:port` of the worker's peer transport.
    pub peer_addr: String,
    pub block_tokens: u32,
    pub pool: PoolFigures,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub epoch: u64,
    pub heartbeat_interval_ms: u64,
    /// Workers the cluster is configured with (its spec's replicas; 0 when the gManager does
    /// not know): a worker counts on their lend caps for the longest request it accepts,
    /// before all of them have registered.
    #[serde(default)]
    pub configured_workers: u32,
}

/// A worker's KV pool, in rBlocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolFigures {
    pub total_blocks: u64,
    /// Held by this worker's own requests (local blocks).
    pub used_blocks: u64,
    /// Held here for other workers' requests.
    pub lent_blocks: u64,
    /// Held elsewhere for this worker's requests.
    pub borrowed_blocks: u64,
    /// Most blocks this worker will lend at once (its lend cap).
    pub lend_cap_blocks: u64,
    pub running_requests: u64,
    pub waiting_requests: u64,
}

impl PoolFigures {
    pub fn free_blocks(&self) -> u64 {
        self.total_blocks
            .saturating_sub(self.used_blocks + self.lent_blocks)
    }

    /// Blocks this worker could lend right now.
    pub fn lendable_blocks(&self) -> u64 {
        self.free_blocks()
            .min(self.lend_cap_blocks.saturating_sub(self.lent_blocks))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub epoch: u64,
    pub pool: PoolFigures,
}

/// A change in where one request of the reporting worker (its home) keeps blocks: `blocks`
/// more (or fewer, when negative) at `holder`, the home itself included. Heartbeats may carry
/// these under `placements`; the gManager sums them into its debt ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementDelta {
    pub request: u64,
    pub holder: String,
    pub blocks: i64,
}

/// A heartbeat as sent: the figures, the placement changes of the worker's requests since its
/// last accepted heartbeat, and the blocks its requests migrated since it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatBody {
    #[serde(flatten)]
    pub beat: Heartbeat,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<PlacementDelta>,
    #[serde(default)]
    pub migrated_blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub epoch: u64,
    /// Moves of this worker's requests to carry out (by migration), each handed out once.
    #[serde(default)]
    pub moves: Vec<PlannedMove>,
    /// As in [`Registered`], for clusters that scale.
    #[serde(default)]
    pub configured_workers: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BorrowRequest {
    pub home: String,
    pub blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creditor {
    pub worker_id: String,
    pub peer_addr: String,
    pub lendable_blocks: u64,
    /// Requests of its own it runs, as of its last heartbeat: a busy creditor lends only to
    /// requests that outgrow their home or are starting (`infinite_llm_policy::borrows_from_busy`).
    #[serde(default)]
    pub running_requests: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BorrowAdvice {
    pub epoch: u64,
    /// Most lendable blocks first; never the home itself.
    pub creditors: Vec<Creditor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    pub worker_id: String,
    pub api_url: String,
    pub peer_addr: String,
    pub pool: PoolFigures,
    pub free_blocks: u64,
    /// Milliseconds since the last heartbeat.
    pub last_seen_ms: u64,
    /// Blocks this worker's requests migrated since it started, as last reported.
    #[serde(default)]
    pub migrated_blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    pub epoch: u64,
    pub block_tokens: u32,
    pub workers: Vec<WorkerView>,
    pub totals: PoolFigures,
    /// Workers whose queue waits for memory while their batch is small.
    #[serde(default)]
    pub debtors: Vec<String>,
    /// Workers with spare blocks and nobody waiting.
    #[serde(default)]
    pub creditors: Vec<String>,
    /// Blocks each home holds on each creditor, from the placements workers reported.
    #[serde(default)]
    pub debts: Vec<Debt>,
    /// What the last placement round would move to raise throughput.
    #[serde(default)]
    pub planned_moves: Vec<PlannedMove>,
    /// Planned moves handed to their homes and not yet seen done in their placements.
    #[serde(default)]
    pub moves_in_flight: Vec<PlannedMove>,
    /// The latest membership changes, oldest first.
    #[serde(default)]
    pub epoch_history: Vec<EpochChange>,
}

/// One membership change: the epoch it started and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochChange {
    pub epoch: u64,
    pub worker: String,
    /// `joined`, `left` or `expired`.
    pub change: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Debt {
    pub home: String,
    pub creditor: String,
    pub blocks: u64,
}

/// `blocks` of `request`, homed at `from`, to be placed on `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedMove {
    pub request: u64,
    pub from: String,
    pub to: String,
    pub blocks: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lendable_is_bounded_by_free_blocks_and_the_cap() {
        let mut p = PoolFigures {
            total_blocks: 100,
            used_blocks: 70,
            lent_blocks: 10,
            lend_cap_blocks: 50,
            ..Default::default()
        };
        assert_eq!(p.free_blocks(), 20);
        assert_eq!(p.lendable_blocks(), 20, "free blocks bind");
        p.used_blocks = 0;
        assert_eq!(
            p.lendable_blocks(),
            40,
            "the cap binds: 50 minus 10 already lent"
        );
    }

    #[test]
    fn messages_round_trip_as_json() {
        let r = Register {
            worker_id: "w0".into(),
            api_url: "http://127.0.0.1:8010".into(),
            peer_addr: "127.0.0.1:8110".into(),
            block_tokens: 16,
            pool: PoolFigures {
                total_blocks: 8,
                ..Default::default()
            },
        };
        let back: Register = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_pool_view_without_the_ledger_fields_still_parses() {
        let old = r#"{"epoch": 2, "block_tokens": 16, "workers": [], "totals": {
            "total_blocks": 8, "used_blocks": 0, "lent_blocks": 0, "borrowed_blocks": 0,
            "lend_cap_blocks": 4, "running_requests": 0, "waiting_requests": 0}}"#;
        let v: PoolView = serde_json::from_str(old).unwrap();
        assert_eq!(v.epoch, 2);
        assert!(v.debtors.is_empty() && v.creditors.is_empty());
        assert!(v.debts.is_empty() && v.planned_moves.is_empty());
    }
}
