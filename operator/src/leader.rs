//! Leader election over a Lease: every replica campaigns, only the leader does the
//! leader-only work (the reconciler and the gManager). The leader labels its own Pod, and the
//! gManager's Service selects that label, so workers reach the one replica that serves it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::Error;
use crate::metrics::Metrics;
use crate::server::Health;

/// How this replica takes part in the election.
#[derive(Clone, Debug)]
pub struct Election {
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
    /// Seconds a lease stays valid without renewal: the longest a dead leader blocks others.
    pub duration: u64,
    /// Seconds before expiry the leader renews.
    pub grace: u64,
    /// This replica's Pod (in `lease_namespace`), labelled with [`LEADER_LABEL`] while it
    /// leads; `None` outside a Pod.
    pub pod: Option<String>,
}

/// Set to "true" on the leader's Pod only; the chart's gManager Service selects it.
pub const LEADER_LABEL: &str = "infinitellm.io/leader";

/// Tries this often to label the Pod before giving up on leading.
const LABEL_ATTEMPTS: u32 = 5;

/// Puts the leader label on this replica's Pod, or takes it off.
async fn label_pod(client: &Client, election: &Election, leading: bool) -> Result<(), Error> {
    let Some(pod) = &election.pod else {
        return Ok(());
    };
    let value = if leading {
        serde_json::Value::from("true")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    let api = Api::<Pod>::namespaced(client.clone(), &election.lease_namespace);
    let mut attempt = 1;
    loop {
        match api
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if attempt < LABEL_ATTEMPTS => {
                warn!(error = %e, pod, leading, "could not label this Pod; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                attempt += 1;
            }
            Err(e) => return Err(Error::kube("label", "Pod")(e)),
        }
    }
}

/// How long leader-only work gets to wind down once leadership ends.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Resolves when this replica stops leading or is asked to shut down.
async fn ended(mut leading: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
    tokio::select! {
        _ = leading.wait_for(|leader| !*leader) => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

/// Campaigns until `shutdown` flips to true; while leading, runs `lead` and passes it a
/// future that resolves when leadership ends. Losing the lease without a shutdown is an
/// error: leader-only state cannot be trusted after a gap, so the process should restart.
pub async fn run<F, Fut>(
    client: Client,
    election: &Election,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
    lead: F,
) -> Result<(), Error>
where
    F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>) -> Fut,
    Fut: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client.clone(), &election.lease_name)
        .with_namespace(&election.lease_namespace)
        .with_identity(&election.identity)
        .with_duration(election.duration)
        .with_grace(election.grace)
        .build()
        .await?;
    // A replica restarted after losing the lease may still carry the label.
    label_pod(&client, election, false).await?;
    let (mut leading, campaign) = manager.watch().await;
    health.ready.store(true, Ordering::Relaxed);
    info!(identity = %election.identity, lease = %election.lease_name, namespace = %election.lease_namespace, "campaigning for leadership");

    let won = tokio::select! {
        won = leading.wait_for(|leader| *leader) => won.is_ok(),
        _ = shutdown.wait_for(|stop| *stop) => false,
    };
    let mut result = Ok(());
    if won {
        info!(identity = %election.identity, "became the leader");
        metrics.set_leader(true);
        if let Err(e) = label_pod(&client, election, true).await {
            // Without the label no worker reaches this gManager: hand leadership on.
            metrics.set_leader(false);
            drop(leading);
            let _ = tokio::time::timeout(STOP_GRACE, campaign).await;
            return Err(e);
        }
        {
            let work = lead(Box::pin(ended(leading.clone(), shutdown.clone())));
            tokio::pin!(work);
            tokio::select! {
                _ = &mut work => {}
                _ = ended(leading.clone(), shutdown.clone()) => {
                    // In-flight reconciles may finish, but a stuck one must not keep a dead
                    // leader from exiting (and its lease from being released).
                    if tokio::time::timeout(STOP_GRACE, &mut work).await.is_err() {
                        warn!("leader-only work did not stop within {STOP_GRACE:?}; abandoning it");
                    }
                }
            }
        }
        metrics.set_leader(false);
        if let Err(e) = label_pod(&client, election, false).await {
            warn!(error = %e, "could not take the leader label off this Pod");
        }
        if !*shutdown.borrow() {
            result = Err(Error::LostLeadership);
        }
    }
    // Closing the channel makes the campaign release the lease, so a successor need not
    // wait for it to expire.
    drop(leading);
    match tokio::time::timeout(STOP_GRACE, campaign).await {
        Ok(joined) => {
            joined??;
            info!(identity = %election.identity, "left the election");
        }
        Err(_) => warn!("could not release the lease in time; it will expire on its own"),
    }
    result
}
