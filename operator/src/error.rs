//! Every way the operator can fail, in one enum.

/// Errors of the reconciler and of the operator's runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{verb} {kind}: {source}")]
    Kube {
        verb: &'static str,
        kind: String,
        #[source]
        source: kube::Error,
    },

    #[error("connecting to the API server: {0}")]
    Connect(#[source] kube::Error),

    #[error("serializing an object: {0}")]
    Serialize(#[source] serde_json::Error),

    #[error("reading the OS random source for the cluster token: {0}")]
    Random(#[from] rand::rand_core::OsError),

    #[error("object has no {0}")]
    MissingField(&'static str),

    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),

    #[error("leader election task failed: {0}")]
    Campaign(#[from] tokio::task::JoinError),

    #[error("lost the leader lease; exiting so that the next leader starts clean")]
    LostLeadership,

    #[error(
        "missing RBAC permissions (apply charts/infinite-llm/rbac/operator-rbac.yaml and bind it to this ServiceAccount): {0}"
    )]
    Forbidden(String),

    #[error("serving metrics and health on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Adapter for `map_err` that records what we were doing.
    pub fn kube(verb: &'static str, kind: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let kind = kind.into();
        move |source| Error::Kube { verb, kind, source }
    }

    /// Short label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Connect(_) => "connect",
            Error::Serialize(_) => "serialize",
            Error::Random(_) => "random",
            Error::MissingField(_) => "missing_field",
            Error::Lease(_) => "lease",
            Error::Campaign(_) => "campaign",
            Error::LostLeadership => "lost_leadership",
            Error::Forbidden(_) => "forbidden",
            Error::Serve { .. } => "serve",
        }
    }
}
