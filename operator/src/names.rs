//! Names and labels of the objects an `InfiniteLLMCluster` owns, in one place so that
//! selectors, Services and the NetworkPolicy cannot drift apart.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub const FIELD_MANAGER: &str = "infinite-llm-operator";
pub const CLUSTER_LABEL: &str = "infinitellm.io/cluster";
const NAME_LABEL: &str = "app.kubernetes.io/name";
const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Key of the cluster token inside its Secret.
pub const TOKEN_KEY: &str = "token";

/// Names of everything one cluster owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub cluster: String,
}

impl Names {
    pub fn new(cluster: &str) -> Self {
        Names {
            cluster: cluster.to_owned(),
        }
    }

    /// The StatefulSet, and the client Service clients reach the API through.
    pub fn workers(&self) -> String {
        self.cluster.clone()
    }

    pub fn client_service(&self) -> String {
        self.cluster.clone()
    }

    /// Headless, so each worker gets a stable DNS name for peers.
    pub fn peer_service(&self) -> String {
        format!("{}-peers", self.cluster)
    }

    pub fn token_secret(&self) -> String {
        format!("{}-token", self.cluster)
    }

    pub fn pdb(&self) -> String {
        self.cluster.clone()
    }

    /// The HorizontalPodAutoscaler of a cluster with `spec.autoscaling`.
    pub fn autoscaler(&self) -> String {
        self.cluster.clone()
    }

    pub fn network_policy(&self) -> String {
        format!("{}-peers", self.cluster)
    }

    /// Labels that pick this cluster's worker Pods; immutable once the StatefulSet exists.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NAME_LABEL.to_owned(), "infinite-llm".to_owned()),
            (INSTANCE_LABEL.to_owned(), self.cluster.clone()),
            (COMPONENT_LABEL.to_owned(), "worker".to_owned()),
        ])
    }

    /// Labels on every owned object.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels();
        labels.insert(CLUSTER_LABEL.to_owned(), self.cluster.clone());
        labels.insert(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned());
        labels
    }

    pub fn label_selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: Some(self.selector_labels()),
            ..LabelSelector::default()
        }
    }

    /// The selector in the string form of `status.selector` and of list calls.
    pub fn selector_string(&self) -> String {
        self.selector_labels()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Selects everything any cluster owns, Pods included; keeps the operator's watches small.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}")
}
