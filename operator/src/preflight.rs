//! Checks at start-up that the operator's identity holds every permission it uses, so that
//! a missing or stale RBAC binding fails loudly with a list instead of as scattered 403s
//! in reconcile logs. The list mirrors charts/infinite-llm/rbac/operator-rbac.yaml.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::Error;

/// (API group, resource, verbs) the reconciler needs in the namespaces it watches.
const RECONCILER: &[(&str, &str, &[&str])] = &[
    (
        "infinitellm.io",
        "infinitellmclusters",
        &["get", "list", "watch"],
    ),
    ("infinitellm.io", "infinitellmclusters/status", &["patch"]),
    (
        "apps",
        "statefulsets",
        &["get", "list", "watch", "create", "patch"],
    ),
    ("", "services", &["get", "list", "watch", "create", "patch"]),
    (
        "policy",
        "poddisruptionbudgets",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "networking.k8s.io",
        "networkpolicies",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "autoscaling",
        "horizontalpodautoscalers",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("", "secrets", &["get", "create", "patch"]),
    ("", "pods", &["list", "watch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    ("", "events", &["list"]),
];

/// What leader election needs in the operator's own namespace: the Lease, and the leader
/// label on the replica's own Pod.
const LEADER: &[(&str, &str, &[&str])] = &[
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
    ("", "pods", &["patch"]),
];

/// Fails with every missing permission listed. `namespace` is the watched namespace, or
/// `None` for all of them.
pub async fn check(
    client: &Client,
    namespace: Option<&str>,
    lease_namespace: &str,
) -> Result<(), Error> {
    let mut missing = Vec::new();
    for (scope, rules) in [(namespace, RECONCILER), (Some(lease_namespace), LEADER)] {
        for (group, resource, verbs) in rules {
            for verb in *verbs {
                if !allowed(client, scope, group, resource, verb).await? {
                    let group = if group.is_empty() { "core" } else { group };
                    let place =
                        scope.map_or("all namespaces".to_owned(), |ns| format!("namespace {ns}"));
                    missing.push(format!("{verb} {group}/{resource} in {place}"));
                }
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Forbidden(missing.join(", ")))
    }
}

async fn allowed(
    client: &Client,
    namespace: Option<&str>,
    group: &str,
    resource: &str,
    verb: &str,
) -> Result<bool, Error> {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_owned())),
        None => (resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                subresource,
                verb: Some(verb.to_owned()),
                namespace: namespace.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(Error::kube("create", "SelfSubjectAccessReview"))?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}
