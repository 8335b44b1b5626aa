//! Voluntary disruptions (node drains) take one worker at a time, so each drain can hand its
//! KV blocks to peers that stay.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::InfiniteLLMCluster;
use crate::names::Names;

pub fn build(ilc: &InfiniteLLMCluster, names: &Names) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: super::metadata(ilc, names.pdb(), &names.labels()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(names.label_selector()),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}
