//! Leader election over a Lease: every replica campaigns, only the leader does the
//! leader-only work (the reconciler now, the gManager too once it exists).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::info;

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
        let mut lost = leading.clone();
        let mut stop = shutdown.clone();
        let ended = Box::pin(async move {
            tokio::select! {
                _ = lost.wait_for(|leader| !*leader) => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
        });
        lead(ended).await;
        metrics.set_leader(false);
        if !*shutdown.borrow() {
            result = Err(Error::LostLeadership);
        }
    }
    // Closing the channel makes the campaign release the lease, so a successor need not
    // wait for it to expire.
    drop(leading);
    campaign.await??;
    info!(identity = %election.identity, "left the election");
    result
}
