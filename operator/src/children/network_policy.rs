//! The peer port carries KV blocks between workers: only this cluster's own Pods may reach
//! it. The API port stays open to clients (its internal endpoints check the cluster token).

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{InfiniteLLMCluster, PEER_PORT};
use crate::names::Names;

pub fn build(ilc: &InfiniteLLMCluster, names: &Names) -> NetworkPolicy {
    let tcp = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        end_port: None,
    };
    NetworkPolicy {
        metadata: super::metadata(ilc, names.network_policy(), &names.labels()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(names.label_selector()),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(names.label_selector()),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![tcp(PEER_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![tcp(ilc.spec.api.port)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}
