//! The gManager: one per cluster, hosted by the operator's leader or run alone in local mode.
//! It keeps the ledger of workers, their pools and their requests' placement from
//! registrations and heartbeats, advises full homes which creditors to borrow from, and runs
//! the greedy placement round every heartbeat interval. Its state is soft: after a restart,
//! workers re-register when their heartbeat gets 404, and the ledger rebuilds.

mod identity;
pub(crate) mod ledger;
mod metrics;
#[cfg(test)]
mod model_tests;
pub mod placement;
mod service;
mod tokens;

use std::time::{Duration, Instant};

use infinite_llm_protocol::gmanager::PoolView;
use tokio::net::TcpListener;

pub use identity::PodLookup;
pub use tokens::Tokens;

/// Port the gManager listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 8001;

#[derive(Debug, Clone)]
pub struct GManagerConfig {
    /// How often workers are told to heartbeat, and how often placement runs.
    pub heartbeat_interval: Duration,
    /// Heartbeats a worker may miss in a row before it is expired.
    pub missed_heartbeats: u32,
    /// The placement policy and its cost model.
    pub placement: placement::PlacementConfig,
}

impl Default for GManagerConfig {
    fn default() -> Self {
        GManagerConfig {
            heartbeat_interval: Duration::from_millis(1000),
            missed_heartbeats: 3,
            placement: placement::PlacementConfig::default(),
        }
    }
}

impl GManagerConfig {
    /// Silence after which a worker is gone.
    pub fn expiry(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats
    }
}

/// Serves the gManager on `listener` until `shutdown` resolves. Requests are accepted with
/// any token in `tokens`, each against its own cluster's ledger.
pub async fn serve(
    listener: TcpListener,
    config: GManagerConfig,
    tokens: Tokens,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    GManager::new(config, tokens)
        .serve(listener, shutdown)
        .await
}

/// A gManager whose ledgers can be read while it serves: the operator's reconciler reports
/// each cluster's pool in its status from here. Cloning shares the same ledgers.
#[derive(Clone)]
pub struct GManager {
    service: service::Service,
    interval: Duration,
}

impl GManager {
    /// A gManager that admits any worker holding a cluster's token (local mode).
    pub fn new(config: GManagerConfig, tokens: Tokens) -> Self {
        Self::build(config, tokens, None)
    }

    /// A gManager that admits a worker only under its own pod's identity (`identity`).
    pub fn with_pods(config: GManagerConfig, tokens: Tokens, pods: PodLookup) -> Self {
        Self::build(config, tokens, Some(pods))
    }

    fn build(config: GManagerConfig, tokens: Tokens, pods: Option<PodLookup>) -> Self {
        let interval = config.heartbeat_interval;
        GManager {
            service: service::Service::new(config, tokens, pods),
            interval,
        }
    }

    /// The tokens requests are accepted with, for whoever learns them.
    pub fn tokens(&self) -> &Tokens {
        self.service.tokens()
    }

    /// Forgets a deleted cluster: its token is refused from now on and its ledger dropped.
    pub fn forget(&self, cluster: &str) {
        self.service.forget(cluster);
    }

    /// Makes the cluster's membership epoch continue from `epoch` at least (the last one a
    /// previous gManager reported), so that it never goes back after a fail-over.
    pub fn continue_epoch(&self, cluster: &str, epoch: u64) {
        self.service.continue_epoch(cluster, epoch);
    }

    /// How many workers the cluster is configured with (its spec's replicas), told to its
    /// workers so that they accept requests as long as the whole pool can hold before every
    /// worker is up.
    pub fn configure_workers(&self, cluster: &str, workers: u32) {
        self.service.configure_workers(cluster, workers);
    }

    /// The cluster's pool as `GET /v1/pool` would show it; `None` until a worker of the
    /// cluster has reached this gManager.
    pub fn pool(&self, cluster: &str) -> Option<PoolView> {
        self.service.pool(cluster, Instant::now())
    }

    /// The clusters ("namespace/name") whose workers have reached this gManager.
    pub fn clusters(&self) -> Vec<String> {
        self.service.clusters()
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let sweeper = {
            let service = self.service.clone();
            let interval = self.interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    service.sweep(Instant::now());
                }
            })
        };
        let served = axum::serve(
            listener,
            self.service
                .router()
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        sweeper.abort();
        served
    }
}
