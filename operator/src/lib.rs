//! The Infinite-LLM operator: reconciles `InfiniteLLMCluster` objects into worker
//! StatefulSets and their Services, policies and token, under leader election.

pub mod apply;
pub mod autoscaler;
pub mod children;
pub mod crd;
mod error;
pub mod external_metrics;
pub mod gmanager;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod preflight;
pub mod reconciler;
pub mod server;
pub mod simulate;
pub mod status;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;

use kube::Client;
use kube::runtime::events::Reporter;
use tokio::sync::watch;
use tracing::info;

use crate::children::Settings;
pub use crate::error::Error;
use crate::leader::Election;
use crate::metrics::Metrics;
use crate::reconciler::Context;
use crate::server::Health;

/// How one operator process runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Reconcile only this namespace; all namespaces when unset.
    pub namespace: Option<String>,
    pub election: Election,
    pub metrics_addr: SocketAddr,
    pub settings: Settings,
    /// Where the leader serves the gManager.
    pub gmanager_addr: SocketAddr,
    /// The gManager's placement policy and cost model.
    pub placement: gmanager::placement::PlacementConfig,
    /// Where the leader serves the external metrics API; not served when unset.
    pub metrics_api: Option<external_metrics::Config>,
}

/// Runs the operator until `shutdown` flips to true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let client = Client::try_default().await.map_err(Error::Connect)?;
    preflight::check(
        &client,
        config.namespace.as_deref(),
        &config.election.lease_namespace,
    )
    .await?;

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let bound = server::spawn(config.metrics_addr, metrics.clone(), health.clone()).await?;
    info!(addr = %bound, "serving /metrics, /healthz and /readyz");

    let ctx = Arc::new(Context {
        reporter: Reporter {
            controller: names::FIELD_MANAGER.to_owned(),
            instance: Some(config.election.identity.clone()),
        },
        client: client.clone(),
        metrics: metrics.clone(),
        settings: config.settings.clone(),
        gmanager: gmanager::GManager::with_pods(
            gmanager::GManagerConfig {
                placement: config.placement.clone(),
                ..gmanager::GManagerConfig::default()
            },
            gmanager::Tokens::default(),
            reconciler::pod_lookup(client.clone()),
        ),
    });
    let namespace = config.namespace.clone();
    let gmanager_addr = config.gmanager_addr;
    let metrics_api = config.metrics_api.clone();
    let api_client = client.clone();
    leader::run(
        client,
        &config.election,
        metrics,
        health,
        shutdown,
        |ended| async move {
            // The gManager is leader-only too: its ledger is soft state that workers rebuild by
            // re-registering with whichever replica leads.
            let ended = futures::FutureExt::shared(ended);
            let gmanager = ctx.gmanager.clone();
            // So are the pool figures of the external metrics API: a standby has none.
            let figures = {
                let (gmanager, ended) = (gmanager.clone(), ended.clone());
                async move {
                    if let Some(api) = metrics_api {
                        external_metrics::serve(api, api_client, gmanager, ended).await;
                    }
                }
            };
            tokio::join!(
                reconciler::run(ctx, namespace.as_deref(), ended.clone()),
                serve_gmanager(gmanager_addr, gmanager, ended),
                figures,
            );
        },
    )
    .await
}

/// Serves the gManager until `ended`. Without it workers still serve, only without pooling, so a
/// port clash is logged rather than fatal.
async fn serve_gmanager(
    addr: SocketAddr,
    gmanager: gmanager::GManager,
    ended: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve the gManager; workers run without pooling");
            return;
        }
    };
    info!(%addr, "serving the gManager");
    if let Err(e) = gmanager.serve(listener, ended).await {
        tracing::error!(error = %e, "the gManager stopped");
    }
}
