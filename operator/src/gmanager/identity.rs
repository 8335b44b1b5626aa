//! Which worker a caller may speak for. The cluster token says which cluster a worker belongs
//! to; it does not say which worker it is, and every worker holds it. So in Kubernetes a
//! worker registers only under its own pod: the worker id must name a pod of the cluster, and
//! the registration must come from that pod's IP and advertise it as the peer address. Later
//! heartbeats and the leave of that worker id must come from the same IP.
//!
//! Local mode has no pods (and every worker is on loopback): there the gManager runs without
//! a [`PodLookup`], and the token alone admits a worker, as before.

use std::net::IpAddr;
use std::sync::Arc;

use futures::future::BoxFuture;

/// The IP of the pod named `worker_id` in `cluster` (`namespace/name`), if it is one of that
/// cluster's pods and has an IP.
pub type PodLookup =
    Arc<dyn Fn(String, String) -> BoxFuture<'static, Option<IpAddr>> + Send + Sync>;

/// Why a caller may not act as a worker.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("worker {worker} is not a running pod of this cluster")]
    NotAPod { worker: String },
    #[error("worker {worker} must register from its own pod ({pod}), not from {caller}")]
    WrongCaller {
        worker: String,
        pod: IpAddr,
        caller: String,
    },
    #[error("worker {worker} must advertise its own pod's address ({pod}), not {peer_addr}")]
    WrongPeerAddr {
        worker: String,
        pod: IpAddr,
        peer_addr: String,
    },
}

/// Checks a registration against the pod the worker id names.
pub fn check_registration(
    worker: &str,
    pod: Option<IpAddr>,
    caller: Option<IpAddr>,
    peer_addr: &str,
) -> Result<IpAddr, IdentityError> {
    let pod = pod.ok_or_else(|| IdentityError::NotAPod {
        worker: worker.to_owned(),
    })?;
    if caller != Some(pod) {
        return Err(IdentityError::WrongCaller {
            worker: worker.to_owned(),
            pod,
            caller: caller.map_or_else(|| "an unknown address".to_owned(), |c| c.to_string()),
        });
    }
    let advertised = peer_addr
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .ok();
    if advertised != Some(pod) {
        return Err(IdentityError::WrongPeerAddr {
            worker: worker.to_owned(),
            pod,
            peer_addr: peer_addr.to_owned(),
        });
    }
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pod_itself_registers_under_its_name() {
        let pod: IpAddr = "10.0.0.5".parse().unwrap();
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(
            check_registration("w-0", Some(pod), Some(pod), "10.0.0.5:8101"),
            Ok(pod)
        );
        assert!(matches!(
            check_registration("w-0", None, Some(pod), "10.0.0.5:8101"),
            Err(IdentityError::NotAPod { .. })
        ));
        assert!(matches!(
            check_registration("w-0", Some(pod), Some(other), "10.0.0.5:8101"),
            Err(IdentityError::WrongCaller { .. })
        ));
        assert!(matches!(
            check_registration("w-0", Some(pod), Some(pod), "10.0.0.9:8101"),
            Err(IdentityError::WrongPeerAddr { .. })
        ));
    }
}
