//! Integration tests of the operator against a real kube-apiserver, etcd and
//! kube-controller-manager (see `harness`). Each test works in its own namespace and runs
//! its own operator processes restricted to it, so tests can share one control plane.

mod autoscale;
mod crd;
mod harness;
mod helm;
mod leader;
mod rbac;
mod reconcile;

use infinite_llm_operator::crd::InfiniteLLMCluster;

/// A small valid cluster spec, as JSON so tests can also break it.
pub fn cluster_json(name: &str, replicas: i32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "infinitellm.io/v1alpha1",
        "kind": "InfiniteLLMCluster",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "servedName": "tiny-llama",
                "source": {"pvc": {"claimName": "models", "path": "tiny-llama"}}
            },
            "workers": {
                "replicas": replicas,
                "gpusPerWorker": 1,
                "image": "ghcr.io/infinite-llm/worker:test",
                // "1000m" comes back from the server as "1"; that must not look like drift.
                "resources": {"requests": {"cpu": "1000m", "memory": "2Gi"}},
                "nodeSelector": {"gpu": "yes"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "inference"
            },
            "kvCache": {"blockTokens": 16, "gpuMemoryFraction": 0.8, "lendFraction": 0.4}
        }
    })
}

pub fn cluster(name: &str, replicas: i32) -> InfiniteLLMCluster {
    serde_json::from_value(cluster_json(name, replicas)).unwrap()
}
