//! The gManager: one per cluster, hosted by the operator's leader or run alone in local mode.
//! It keeps the ledger of workers, their pools and their requests' placement from
//! registrations and heartbeats, advises full homes which creditors to borrow from, and runs
//! the greedy placement round every heartbeat interval. Its state is soft: after a restart,
//! workers re-register when their heartbeat gets 404, and the ledger rebuilds.

pub(crate) mod ledger;
mod metrics;
#[cfg(test)]
mod model_tests;
pub mod placement;
mod service;
mod tokens;

use std::time::{Duration, Instant};

use tokio::net::TcpListener;

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
    let interval = config.heartbeat_interval;
    let service = service::Service::new(config, tokens);
    let sweeper = {
        let service = service.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                service.sweep(Instant::now());
            }
        })
    };
    let served = axum::serve(listener, service.router())
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    served
}
