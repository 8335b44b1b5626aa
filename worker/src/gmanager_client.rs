//! The worker's side of the gManager: register, report the pool every heartbeat, and keep the
//! creditor advice fresh. The gManager's state is soft: when it restarts it answers 404 to a
//! heartbeat and the worker registers again, re-reporting what it holds; serving goes on
//! meanwhile with the placements already made.

use std::collections::BTreeSet;
use std::time::Duration;

use infinite_llm_protocol::gmanager::{
    BorrowAdvice, BorrowRequest, Heartbeat, HeartbeatAck, HeartbeatBody, PlacementDelta,
    PoolFigures, PoolView, Register, Registered,
};

use crate::engine::{EngineHandle, EngineStats, Placements};

pub struct GManagerClient {
    http: reqwest::Client,
    base: String,
    token: String,
    register: Register,
    /// What the gManager last said of the pool: the others' lend caps it knows, and how many
    /// workers the cluster is configured with.
    registered_lend_caps: usize,
    configured_workers: u32,
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("gManager request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the gManager does not know this worker")]
    Unknown,
    #[error("the gManager answered 409 Conflict (a block size or placements it disagrees with)")]
    Conflict,
}

/// The pool figures the gManager keeps for this worker.
fn figures(s: &EngineStats) -> PoolFigures {
    PoolFigures {
        total_blocks: s.kv_blocks_total as u64,
        used_blocks: (s.kv_blocks_used - s.kv_blocks_lent) as u64,
        lent_blocks: s.kv_blocks_lent as u64,
        borrowed_blocks: s.kv_blocks_borrowed as u64,
        lend_cap_blocks: s.kv_blocks_lend_cap as u64,
        running_requests: s.running as u64,
        waiting_requests: s.waiting as u64,
    }
}

/// The placement changes from `reported` to `now`, over holders the gManager knows (it wrote
/// off the blocks of those it does not, and refuses placing blocks on them), and what the
/// ledger holds once it accepts them.
fn placement_deltas(
    now: &Placements,
    reported: &Placements,
    known: &BTreeSet<String>,
) -> (Vec<PlacementDelta>, Placements) {
    let next: Placements = now
        .iter()
        .filter(|((_, holder), _)| known.contains(holder))
        .map(|(k, &v)| (k.clone(), v))
        .collect();
    let keys: BTreeSet<&(u64, String)> = next
        .keys()
        .chain(reported.keys().filter(|(_, h)| known.contains(h)))
        .collect();
    let deltas = keys
        .into_iter()
        .filter_map(|k| {
            let d = next.get(k).copied().unwrap_or(0) as i64
                - reported.get(k).copied().unwrap_or(0) as i64;
            (d != 0).then(|| PlacementDelta {
                request: k.0,
                holder: k.1.clone(),
                blocks: d,
            })
        })
        .collect();
    (deltas, next)
}

fn lend_cap(pool: &PoolFigures) -> usize {
    pool.lend_cap_blocks.min(pool.total_blocks) as usize
}

/// What the other registered workers could lend at once, at most.
fn others_lend_caps(view: &PoolView, me: &str) -> usize {
    view.workers
        .iter()
        .filter(|w| w.worker_id != me)
        .map(|w| lend_cap(&w.pool))
        .sum()
}

/// The most blocks the other workers could ever lend at once: what a request here may count on
/// when they are not busy. Decides which requests are too long for the pool and which wait.
/// Workers the cluster is configured with that have not registered yet (starting, or added by
/// a scale) count with this worker's own lend cap, so that a request is not refused as too
/// long only because it came early.
fn pool_lend_caps(registered: usize, configured_workers: u32, own: &PoolFigures) -> usize {
    registered.max(configured_workers.saturating_sub(1) as usize * lend_cap(own))
}

impl GManagerClient {
    pub fn new(
        base: &str,
        token: String,
        worker_id: String,
        api_url: String,
        peer_addr: String,
        engine: &EngineHandle,
    ) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("a plain HTTP client builds"),
            base: base.trim_end_matches('/').to_string(),
            token,
            register: Register {
                worker_id,
                api_url,
                peer_addr,
                block_tokens: engine.block_tokens() as u32,
                pool: figures(&engine.stats()),
            },
            registered_lend_caps: 0,
            configured_workers: 0,
        }
    }

    fn publish_lend_caps(&self, engine: &EngineHandle) {
        engine.set_pool_lend_caps(pool_lend_caps(
            self.registered_lend_caps,
            self.configured_workers,
            &self.register.pool,
        ));
    }

    async fn post<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, CallError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        match resp.status() {
            reqwest::StatusCode::NOT_FOUND => return Err(CallError::Unknown),
            reqwest::StatusCode::CONFLICT => return Err(CallError::Conflict),
            _ => {}
        }
        Ok(resp.error_for_status()?.json().await?)
    }

    async fn pool(&self) -> Result<PoolView, CallError> {
        let resp = self
            .http
            .get(format!("{}/v1/pool", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok(resp.error_for_status()?.json().await?)
    }

    async fn register(&mut self, engine: &EngineHandle) -> Duration {
        let mut backoff = Duration::from_millis(200);
        loop {
            self.register.pool = figures(&engine.stats());
            match self
                .post::<_, Registered>("/v1/workers", &self.register)
                .await
            {
                Ok(r) => {
                    tracing::info!(epoch = r.epoch, configured_workers = r.configured_workers, gmanager = %self.base, "registered with the gManager");
                    self.configured_workers = r.configured_workers;
                    self.publish_lend_caps(engine);
                    return Duration::from_millis(r.heartbeat_interval_ms.max(50));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gManager registration failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Registers (then `registered` resolves), heartbeats until `stop` resolves, then tells
    /// the gManager this worker leaves.
    pub async fn run(
        mut self,
        engine: EngineHandle,
        registered: tokio::sync::oneshot::Sender<()>,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        tokio::pin!(stop);
        let mut interval = tokio::select! {
            i = self.register(&engine) => i,
            _ = &mut stop => return,
        };
        let _ = registered.send(());
        let id = self.register.worker_id.clone();
        // What the ledger holds of this worker's placements, and the holders it knows.
        let mut reported = Placements::new();
        let mut known = BTreeSet::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = &mut stop => {
                    self.leave().await;
                    return;
                }
            }
            let stats = engine.stats();
            let (placements, next) = placement_deltas(&engine.placements(), &reported, &known);
            let beat = HeartbeatBody {
                beat: Heartbeat {
                    epoch: 0,
                    pool: figures(&stats),
                },
                placements,
                migrated_blocks: stats.kv_migrated_blocks_total,
            };
            match self
                .post::<_, HeartbeatAck>(&format!("/v1/workers/{id}/heartbeat"), &beat)
                .await
            {
                Ok(ack) => {
                    reported = next;
                    self.configured_workers = ack.configured_workers;
                    self.publish_lend_caps(&engine);
                    if !ack.moves.is_empty() {
                        tracing::info!(moves = ?ack.moves, "the gManager planned moves of this worker's blocks");
                        engine.hand_moves(ack.moves);
                    }
                }
                // Registering again starts this worker's placements afresh in the ledger: the
                // way back when they disagree (a holder it forgot came back under the same id).
                Err(e @ (CallError::Unknown | CallError::Conflict)) => {
                    tracing::info!(reason = %e, "registering with the gManager again");
                    reported.clear();
                    interval = self.register(&engine).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed; serving goes on with the placements made");
                    continue;
                }
            }
            let ask = BorrowRequest {
                home: id.clone(),
                blocks: 1,
            };
            match self.post::<_, BorrowAdvice>("/v1/borrow", &ask).await {
                Ok(advice) => engine.set_creditors(advice.creditors),
                Err(e) => tracing::debug!(error = %e, "no creditor advice this round"),
            }
            match self.pool().await {
                Ok(view) => {
                    self.registered_lend_caps = others_lend_caps(&view, &id);
                    self.publish_lend_caps(&engine);
                    known = view.workers.into_iter().map(|w| w.worker_id).collect();
                }
                Err(e) => tracing::debug!(error = %e, "no pool view this round"),
            }
        }
    }

    async fn leave(&self) {
        let url = format!("{}/v1/workers/{}", self.base, self.register.worker_id);
        if let Err(e) = self.http.delete(url).bearer_auth(&self.token).send().await {
            tracing::warn!(error = %e, "could not tell the gManager this worker leaves");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_configured_but_not_registered_count_with_this_workers_lend_cap() {
        let own = PoolFigures {
            total_blocks: 64,
            lend_cap_blocks: 32,
            ..PoolFigures::default()
        };
        // Alone and nothing configured (local mode without a gManager figure yet).
        assert_eq!(pool_lend_caps(0, 0, &own), 0);
        // Three configured, none of the other two up yet.
        assert_eq!(pool_lend_caps(0, 3, &own), 64);
        // More registered than configured (a scale-in draining): those registered count.
        assert_eq!(pool_lend_caps(96, 3, &own), 96);
        let capped = PoolFigures {
            lend_cap_blocks: 500,
            ..own
        };
        assert_eq!(
            pool_lend_caps(0, 2, &capped),
            64,
            "a cap beyond the pool lends the pool"
        );
    }

    fn placed(entries: &[(u64, &str, u64)]) -> Placements {
        entries
            .iter()
            .map(|&(r, h, n)| ((r, h.to_owned()), n))
            .collect()
    }

    #[test]
    fn deltas_carry_changes_for_known_holders_only() {
        let known: BTreeSet<String> = ["w0".to_owned(), "w1".to_owned()].into();
        let reported = placed(&[(1, "w0", 8), (2, "w0", 3), (3, "gone", 4)]);
        let now = placed(&[(1, "w0", 5), (1, "w1", 3), (4, "w0", 2), (5, "new", 1)]);
        let (deltas, next) = placement_deltas(&now, &reported, &known);
        let got: Vec<(u64, &str, i64)> = deltas
            .iter()
            .map(|d| (d.request, d.holder.as_str(), d.blocks))
            .collect();
        assert_eq!(
            got,
            [(1, "w0", -3), (1, "w1", 3), (2, "w0", -3), (4, "w0", 2)],
            "an unknown holder is neither placed on nor taken from"
        );
        assert_eq!(next, placed(&[(1, "w0", 5), (1, "w1", 3), (4, "w0", 2)]));
        let (again, _) = placement_deltas(&now, &next, &known);
        assert!(again.is_empty(), "nothing changed since");
    }
}
