//! The gManager's HTTP service: the routes of `infinite_llm_protocol::gmanager` over one
//! ledger per cluster, behind the cluster's bearer token; `/healthz` and `/metrics` are open.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use infinite_llm_protocol::gmanager::{
    AUTHORIZATION, BorrowAdvice, BorrowRequest, HeartbeatAck, HeartbeatBody, PoolView, Register,
    Registered,
};
use serde_json::json;
use tracing::{debug, info, warn};

use super::GManagerConfig;
use super::identity::{IdentityError, PodLookup, check_registration};
use super::ledger::{Ledger, LedgerError};
use super::metrics::Metrics;
use super::tokens::Tokens;

/// Everything the handlers share; cheap to clone.
#[derive(Clone)]
pub(super) struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    config: GManagerConfig,
    tokens: Tokens,
    ledgers: Mutex<BTreeMap<String, Ledger>>,
    /// Epochs to continue from, for clusters whose ledger does not exist yet: creating an
    /// empty one would report an empty pool before the workers re-register.
    epoch_floors: Mutex<BTreeMap<String, u64>>,
    /// Workers each cluster is configured with, as its reconciler last said.
    configured: Mutex<BTreeMap<String, u32>>,
    metrics: Metrics,
    /// In Kubernetes: the pods a worker id may register from (`identity`).
    pods: Option<PodLookup>,
    /// The address each worker (by cluster and id) registered from, when `pods` is set.
    addresses: Mutex<BTreeMap<(String, String), IpAddr>>,
}

impl Service {
    pub(super) fn new(config: GManagerConfig, tokens: Tokens, pods: Option<PodLookup>) -> Self {
        Service {
            inner: Arc::new(Inner {
                config,
                tokens,
                ledgers: Mutex::new(BTreeMap::new()),
                epoch_floors: Mutex::new(BTreeMap::new()),
                configured: Mutex::default(),
                metrics: Metrics::default(),
                pods,
                addresses: Mutex::default(),
            }),
        }
    }

    /// Forgets a deleted cluster: its token stops working and its ledger goes.
    pub(super) fn forget(&self, cluster: &str) {
        self.inner.tokens.remove(cluster);
        self.ledgers().remove(cluster);
        self.addresses().retain(|(c, _), _| c != cluster);
        self.configured_map().remove(cluster);
    }

    pub(super) fn configure_workers(&self, cluster: &str, workers: u32) {
        self.configured_map().insert(cluster.to_owned(), workers);
    }

    fn configured_workers(&self, cluster: &str) -> u32 {
        self.configured_map().get(cluster).copied().unwrap_or(0)
    }

    fn configured_map(&self) -> MutexGuard<'_, BTreeMap<String, u32>> {
        self.inner
            .configured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn addresses(&self) -> MutexGuard<'_, BTreeMap<(String, String), IpAddr>> {
        self.inner
            .addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// With pods to check against: `caller` must be where `worker` registered from.
    fn check_caller(
        &self,
        cluster: &str,
        worker: &str,
        caller: Option<IpAddr>,
    ) -> Result<(), ApiError> {
        if self.inner.pods.is_none() {
            return Ok(());
        }
        match self
            .addresses()
            .get(&(cluster.to_owned(), worker.to_owned()))
        {
            Some(&pod) if Some(pod) != caller => {
                Err(ApiError::Identity(IdentityError::WrongCaller {
                    worker: worker.to_owned(),
                    pod,
                    caller: caller
                        .map_or_else(|| "an unknown address".to_owned(), |c| c.to_string()),
                }))
            }
            _ => Ok(()),
        }
    }

    pub(super) fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(metrics_text))
            .route("/v1/workers", post(register))
            .route("/v1/workers/{id}", delete(leave))
            .route("/v1/workers/{id}/heartbeat", post(heartbeat))
            .route("/v1/borrow", post(borrow))
            .route("/v1/pool", get(pool))
            .with_state(self.clone())
    }

    pub(super) fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }

    pub(super) fn continue_epoch(&self, cluster: &str, epoch: u64) {
        match self.ledgers().get_mut(cluster) {
            Some(ledger) => ledger.continue_from(epoch),
            None => {
                let mut floors = self
                    .inner
                    .epoch_floors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let floor = floors.entry(cluster.to_owned()).or_default();
                *floor = (*floor).max(epoch);
            }
        }
    }

    /// The cluster's pool without expiring anyone: reading must not change membership.
    pub(super) fn pool(&self, cluster: &str, now: Instant) -> Option<PoolView> {
        self.ledgers().get(cluster).map(|l| l.view(now))
    }

    pub(super) fn clusters(&self) -> Vec<String> {
        self.ledgers().keys().cloned().collect()
    }

    /// Expires silent workers of every cluster, so that expiry is logged and counted even
    /// when no request comes in, and runs a placement round on what is left.
    pub(super) fn sweep(&self, now: Instant) {
        let mut ledgers = self.ledgers();
        for (cluster, ledger) in ledgers.iter_mut() {
            self.expire(cluster, ledger, now);
            let moves = ledger.place(now);
            if !moves.is_empty() {
                let blocks: u64 = moves.iter().map(|m| m.blocks).sum();
                info!(
                    cluster,
                    moves = moves.len(),
                    blocks,
                    "placement round: blocks to move"
                );
            }
            self.inner.metrics.observe(cluster, &ledger.view(now));
        }
    }

    /// Runs `f` on the cluster's ledger after expiring its silent workers, then refreshes
    /// the cluster's metrics.
    fn with_ledger<T>(&self, cluster: &str, f: impl FnOnce(&mut Ledger, Instant) -> T) -> T {
        let now = Instant::now();
        let mut ledgers = self.ledgers();
        let ledger = ledgers.entry(cluster.to_owned()).or_insert_with(|| {
            let mut ledger = Ledger::new(
                self.inner.config.expiry(),
                self.inner.config.placement.clone(),
            );
            let floors = self.inner.epoch_floors.lock();
            if let Some(&epoch) = floors.unwrap_or_else(|p| p.into_inner()).get(cluster) {
                ledger.continue_from(epoch);
            }
            ledger
        });
        self.expire(cluster, ledger, now);
        let out = f(ledger, now);
        self.inner.metrics.observe(cluster, &ledger.view(now));
        out
    }

    fn expire(&self, cluster: &str, ledger: &mut Ledger, now: Instant) {
        let gone = ledger.expire(now);
        if gone.is_empty() {
            return;
        }
        let expiry = self.inner.config.expiry();
        for worker in &gone {
            warn!(
                cluster,
                worker,
                epoch = ledger.epoch(),
                ?expiry,
                "worker expired: no heartbeat"
            );
        }
        self.inner.metrics.observe(cluster, &ledger.view(now));
    }

    fn ledgers(&self) -> MutexGuard<'_, BTreeMap<String, Ledger>> {
        // Ledger calls leave it consistent even if a handler panicked mid-way.
        self.inner.ledgers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The cluster whose token the request carries.
struct Cluster(String);

impl FromRequestParts<Service> for Cluster {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Service) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or(ApiError::Unauthorized)?;
        state
            .inner
            .tokens
            .cluster_of(presented)
            .map(Cluster)
            .ok_or(ApiError::Unauthorized)
    }
}

/// The address a request came from, where the server records it.
struct Caller(Option<IpAddr>);

impl FromRequestParts<Service> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &Service) -> Result<Self, ApiError> {
        Ok(Caller(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn register(
    State(s): State<Service>,
    Cluster(cluster): Cluster,
    Caller(caller): Caller,
    body: Result<Json<Register>, JsonRejection>,
) -> Result<Json<Registered>, ApiError> {
    let Json(r) = body?;
    let (worker, peer) = (r.worker_id.clone(), r.peer_addr.clone());
    if let Some(pods) = &s.inner.pods {
        let pod = pods(cluster.clone(), worker.clone()).await;
        let ip = check_registration(&worker, pod, caller, &peer).inspect_err(|e| {
            warn!(cluster, worker, error = %e, "registration refused");
        })?;
        s.addresses().insert((cluster.clone(), worker.clone()), ip);
    }
    let epoch = s.with_ledger(&cluster, |l, now| l.register(r, now))?;
    info!(cluster, worker, peer_addr = peer, epoch, "worker joined");
    Ok(Json(Registered {
        epoch,
        heartbeat_interval_ms: u64::try_from(s.inner.config.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX),
        configured_workers: s.configured_workers(&cluster),
    }))
}

async fn heartbeat(
    State(s): State<Service>,
    Cluster(cluster): Cluster,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Result<Json<HeartbeatBody>, JsonRejection>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    let Json(hb) = body?;
    s.check_caller(&cluster, &id, caller)?;
    let (epoch, moves) = s.with_ledger(&cluster, |l, now| {
        let epoch = l.heartbeat(&id, hb.beat.pool, &hb.placements, now)?;
        l.report_migrated(&id, hb.migrated_blocks);
        Ok::<_, LedgerError>((epoch, l.take_moves(&id, now)))
    })?;
    debug!(
        cluster,
        worker = id,
        epoch,
        moves = moves.len(),
        "heartbeat"
    );
    Ok(Json(HeartbeatAck {
        epoch,
        moves,
        configured_workers: s.configured_workers(&cluster),
    }))
}

async fn leave(
    State(s): State<Service>,
    Cluster(cluster): Cluster,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.check_caller(&cluster, &id, caller)?;
    let epoch = s.with_ledger(&cluster, |l, _| l.leave(&id))?;
    info!(cluster, worker = id, epoch, "worker left");
    Ok(StatusCode::NO_CONTENT)
}

async fn borrow(
    State(s): State<Service>,
    Cluster(cluster): Cluster,
    body: Result<Json<BorrowRequest>, JsonRejection>,
) -> Result<Json<BorrowAdvice>, ApiError> {
    let Json(req) = body?;
    let advice = s.with_ledger(&cluster, |l, now| l.advise(&req, now))?;
    s.inner.metrics.advised(&cluster);
    debug!(
        cluster,
        home = req.home,
        blocks = req.blocks,
        creditors = advice.creditors.len(),
        "borrow advice"
    );
    Ok(Json(advice))
}

async fn pool(State(s): State<Service>, Cluster(cluster): Cluster) -> Json<PoolView> {
    Json(s.with_ledger(&cluster, |l, now| l.view(now)))
}

async fn metrics_text(State(s): State<Service>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.inner.metrics.render(),
    )
}

/// Refusals, as `{"error": {"message", "type", "code"}}` like the workers' OpenAI API.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("invalid request body: {0}")]
    Body(#[from] JsonRejection),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, code) = match &self {
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_token",
            ),
            ApiError::Ledger(LedgerError::UnknownWorker(_)) => {
                (StatusCode::NOT_FOUND, "not_found_error", "unknown_worker")
            }
            ApiError::Ledger(LedgerError::BlockTokensMismatch { .. }) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "block_tokens_mismatch",
            ),
            ApiError::Ledger(LedgerError::EmptyWorkerId | LedgerError::ZeroBlockTokens) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "invalid_registration",
            ),
            ApiError::Ledger(LedgerError::PlacementUnderflow { .. }) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "placement_underflow",
            ),
            ApiError::Body(rejection) => {
                (rejection.status(), "invalid_request_error", "invalid_body")
            }
            ApiError::Identity(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "wrong_worker_identity",
            ),
        };
        let body = json!({"error": {"message": self.to_string(), "type": kind, "code": code}});
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
