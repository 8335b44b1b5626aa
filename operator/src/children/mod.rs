//! Pure builders of the objects an `InfiniteLLMCluster` owns. No I/O here, so every child
//! can be checked in unit tests; `apply` does the writing.

pub mod hpa;
pub mod network_policy;
pub mod pdb;
pub mod service;
pub mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::InfiniteLLMCluster;
use crate::names::Names;

/// Operator-wide settings that end up in children.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where workers reach the gManager (the operator's leader).
    pub gmanager_url: String,
}

/// Every child except the token Secret, whose content depends on what already exists.
#[derive(Clone, Debug)]
pub struct Desired {
    pub statefulset: StatefulSet,
    pub peer_service: Service,
    pub client_service: Service,
    pub pdb: PodDisruptionBudget,
    pub network_policy: NetworkPolicy,
    /// Only with `spec.autoscaling`.
    pub autoscaler: Option<HorizontalPodAutoscaler>,
}

impl Desired {
    pub fn build(ilc: &InfiniteLLMCluster, settings: &Settings) -> Self {
        let names = Names::new(&ilc.name_any());
        Desired {
            statefulset: statefulset::build(ilc, &names, settings),
            peer_service: service::peer(ilc, &names),
            client_service: service::client(ilc, &names),
            pdb: pdb::build(ilc, &names),
            network_policy: network_policy::build(ilc, &names),
            autoscaler: hpa::build(ilc, &names),
        }
    }
}

/// Metadata of a child: same namespace, our labels, and a controller reference so that
/// deleting the cluster garbage-collects it and its changes wake the reconciler.
pub fn metadata(
    ilc: &InfiniteLLMCluster,
    name: String,
    labels: &BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ilc.namespace(),
        labels: Some(labels.clone()),
        owner_references: ilc.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}
