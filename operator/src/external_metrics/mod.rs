//! The external metrics API (`external.metrics.k8s.io/v1beta1`), served by the leader over
//! TLS behind the API server's aggregation layer: each cluster's pool figures from the
//! gManager, labelled with the cluster's name, for the HPA the operator creates (or KEDA, or
//! anyone the API server lets read them).
//!
//! Callers are authenticated as an aggregated API server authenticates them: the aggregator's
//! client certificate (signed by the request-header CA that kube-apiserver publishes in
//! `kube-system/extension-apiserver-authentication`, with an allowed name) vouches for the
//! user in its `X-Remote-*` headers; other callers present a bearer token, checked with a
//! TokenReview. Every read of a figure is authorized with a SubjectAccessReview. Only the
//! leader listens: a standby's ledger is empty or stale, so it refuses connections rather
//! than answer with old figures, and connections open when leadership ends are closed.

mod api;
mod auth;
mod selector;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;

use infinite_llm_protocol::gmanager::PoolView;
use kube::Client;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::gmanager::GManager;

pub const GROUP: &str = "external.metrics.k8s.io";
pub const VERSION: &str = "v1beta1";

/// The figures served, one per cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Blocks holding KV (used plus lent) over all blocks, in percent: status.pool.usedPercent.
    PoolUsedPercent,
    /// Requests the workers hold waiting for room.
    RequestsWaiting,
    /// KV blocks held on other workers for the workers' own requests.
    KvBlocksBorrowed,
}

impl Metric {
    pub const ALL: [Metric; 3] = [
        Metric::PoolUsedPercent,
        Metric::RequestsWaiting,
        Metric::KvBlocksBorrowed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::PoolUsedPercent => "ilm_pool_used_percent",
            Metric::RequestsWaiting => "ilm_requests_waiting",
            Metric::KvBlocksBorrowed => "ilm_kv_blocks_borrowed",
        }
    }

    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The figure in thousandths, as a Kubernetes quantity keeps it.
    pub fn milli_value(self, view: &PoolView) -> u128 {
        let t = &view.totals;
        match self {
            Metric::PoolUsedPercent => match t.total_blocks {
                0 => 0,
                total => {
                    u128::from(t.used_blocks.saturating_add(t.lent_blocks)) * 100_000
                        / u128::from(total)
                }
            },
            Metric::RequestsWaiting => u128::from(t.waiting_requests) * 1000,
            Metric::KvBlocksBorrowed => u128::from(t.borrowed_blocks) * 1000,
        }
    }
}

/// Where and with what certificate the leader serves the API.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    /// PEM serving certificate (chain) and key; the APIService's caBundle must verify them.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the API until `ended` resolves. A failure to start (a bad certificate, a taken
/// port) is logged: the HPA then reports that it cannot get the figures, and serving goes on.
pub async fn serve(
    config: Config,
    client: Client,
    gmanager: GManager,
    ended: impl Future<Output = ()> + Send + 'static,
) {
    let (listener, acceptor, delegation) = match start(&config, &client).await {
        Ok(started) => started,
        Err(error) => {
            tracing::error!(addr = %config.addr, %error, "cannot serve the external metrics API");
            return;
        }
    };
    tracing::info!(addr = %config.addr, "serving the external metrics API");
    let app = api::router(gmanager, auth::Authenticator::new(client, delegation));
    tls::serve(listener, acceptor, app, ended).await;
    tracing::info!("stopped serving the external metrics API");
}

async fn start(
    config: &Config,
    client: &Client,
) -> Result<(TcpListener, TlsAcceptor, auth::Delegation), StartError> {
    let tls = tls::Tls::load(&config.cert_file, &config.key_file)?;
    let delegation = auth::Delegation::load(client).await?;
    let acceptor = tls.acceptor(delegation.client_ca())?;
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.addr,
            source,
        })?;
    Ok((listener, acceptor, delegation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use infinite_llm_protocol::gmanager::PoolFigures;

    fn view(total: u64, used: u64, lent: u64, borrowed: u64, waiting: u64) -> PoolView {
        PoolView {
            epoch: 1,
            block_tokens: 16,
            workers: Vec::new(),
            totals: PoolFigures {
                total_blocks: total,
                used_blocks: used,
                lent_blocks: lent,
                borrowed_blocks: borrowed,
                waiting_requests: waiting,
                ..PoolFigures::default()
            },
            debtors: Vec::new(),
            creditors: Vec::new(),
            debts: Vec::new(),
            planned_moves: Vec::new(),
            moves_in_flight: Vec::new(),
            epoch_history: Vec::new(),
        }
    }

    #[test]
    fn figures_come_from_the_pool_totals() {
        let v = view(200, 150, 35, 10, 3);
        assert_eq!(Metric::PoolUsedPercent.milli_value(&v), 92_500);
        assert_eq!(Metric::RequestsWaiting.milli_value(&v), 3_000);
        assert_eq!(Metric::KvBlocksBorrowed.milli_value(&v), 10_000);
        assert_eq!(
            Metric::PoolUsedPercent.milli_value(&view(0, 0, 0, 0, 0)),
            0,
            "an empty pool is 0% used"
        );
    }

    #[test]
    fn names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()), Some(m));
        }
        assert_eq!(Metric::from_name("cpu"), None);
    }
}
