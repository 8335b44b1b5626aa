//! Leader election over a Lease: every replica campaigns, only the leader does the
//! leader-only work (the reconciler now, the gManager too once it exists).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::Client;
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
    let manager = LeaseManagerBuilder::new(client, &election.lease_name)
        .with_namespace(&election.lease_namespace)
        .with_identity(&election.identity)
        .with_duration(election.duration)
        .with_grace(election.grace)
        .build()
        .await?;
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
