//! The HorizontalPodAutoscaler of a cluster with `spec.autoscaling`: it reads the pool
//! figures the operator serves on the external metrics API and drives the cluster's scale
//! subresource. Also what its status says, turned into the cluster's conditions and Events.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, ExternalMetricSource, HPAScalingPolicy, HPAScalingRules,
    HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::Resource;

use crate::crd::{AutoscalingSpec, InfiniteLLMCluster};
use crate::external_metrics::Metric;
use crate::names::{CLUSTER_LABEL, Names};

/// Prefix of the cluster conditions that mirror the HPA's (AbleToScale, ScalingActive,
/// ScalingLimited).
pub const CONDITION_PREFIX: &str = "Autoscaler";

/// The HPA's longest scaling policy period.
const MAX_POLICY_PERIOD: i64 = 1800;

/// The HPA a cluster with `spec.autoscaling` owns; `None` without it.
pub fn build(ilc: &InfiniteLLMCluster, names: &Names) -> Option<HorizontalPodAutoscaler> {
    let spec = ilc.spec.autoscaling.as_ref()?;
    Some(HorizontalPodAutoscaler {
        metadata: super::metadata(ilc, names.autoscaler(), &names.labels()),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(InfiniteLLMCluster::api_version(&()).into_owned()),
                kind: InfiniteLLMCluster::kind(&()).into_owned(),
                name: names.cluster.clone(),
            },
            min_replicas: Some(spec.min_replicas),
            max_replicas: spec.max_replicas,
            metrics: Some(metrics(spec, names)),
            behavior: Some(behavior(
                spec,
                ilc.spec.workers.termination_grace_period_seconds,
            )),
        },
        status: None,
    })
}

fn metrics(spec: &AutoscalingSpec, names: &Names) -> Vec<MetricSpec> {
    // The pool's use is one figure for the whole cluster: a Value target makes the HPA
    // scale the ready workers by use over target, as it does for CPU utilization.
    let mut metrics = vec![external(
        Metric::PoolUsedPercent,
        names,
        MetricTarget {
            type_: "Value".to_owned(),
            value: Some(Quantity(spec.target_pool_utilization_percent.to_string())),
            ..MetricTarget::default()
        },
    )];
    if let Some(waiting) = spec.target_waiting_requests_per_worker {
        metrics.push(external(
            Metric::RequestsWaiting,
            names,
            MetricTarget {
                type_: "AverageValue".to_owned(),
                average_value: Some(Quantity(waiting.to_string())),
                ..MetricTarget::default()
            },
        ));
    }
    metrics
}

fn external(metric: Metric, names: &Names, target: MetricTarget) -> MetricSpec {
    MetricSpec {
        type_: "External".to_owned(),
        external: Some(ExternalMetricSource {
            metric: MetricIdentifier {
                name: metric.name().to_owned(),
                selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        CLUSTER_LABEL.to_owned(),
                        names.cluster.clone(),
                    )])),
                    ..LabelSelector::default()
                }),
            },
            target,
        }),
        ..MetricSpec::default()
    }
}

/// Scale-up after its window; scale-in after its window and one worker at a time, at most
/// one per grace period, so that each leaving worker drains (its preStop) before the next
/// one starts to.
fn behavior(spec: &AutoscalingSpec, grace_seconds: i64) -> HorizontalPodAutoscalerBehavior {
    let period = i32::try_from(grace_seconds.clamp(1, MAX_POLICY_PERIOD)).unwrap_or(1);
    HorizontalPodAutoscalerBehavior {
        scale_up: Some(HPAScalingRules {
            stabilization_window_seconds: Some(spec.scale_up_stabilization_seconds),
            ..HPAScalingRules::default()
        }),
        scale_down: Some(HPAScalingRules {
            stabilization_window_seconds: Some(spec.scale_down_stabilization_seconds),
            select_policy: Some("Min".to_owned()),
            policies: Some(vec![HPAScalingPolicy {
                type_: "Pods".to_owned(),
                value: 1,
                period_seconds: period,
            }]),
            ..HPAScalingRules::default()
        }),
    }
}

/// The HPA's conditions as the cluster's, each type prefixed with `Autoscaler`, keeping the
/// HPA's own reasons, messages and transition times.
pub fn conditions(hpa: &HorizontalPodAutoscaler, generation: Option<i64>) -> Vec<Condition> {
    let Some(conditions) = hpa.status.as_ref().and_then(|s| s.conditions.as_ref()) else {
        return Vec::new();
    };
    conditions
        .iter()
        .map(|c| Condition {
            type_: format!("{CONDITION_PREFIX}{}", c.type_),
            status: c.status.clone(),
            reason: c.reason.clone().unwrap_or_else(|| c.type_.clone()),
            message: c.message.clone().unwrap_or_default(),
            observed_generation: generation,
            last_transition_time: c
                .last_transition_time
                .clone()
                .unwrap_or(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
        })
        .collect()
}

/// What the HPA last measured, for the Event of a scale it made: "ilm_pool_used_percent
/// 92500m (target 80)".
pub fn measured(hpa: &HorizontalPodAutoscaler) -> Option<String> {
    let spec = &hpa.spec;
    let current = hpa.status.as_ref()?.current_metrics.as_ref()?;
    let figures: Vec<String> = current
        .iter()
        .filter_map(|m| {
            let ext = m.external.as_ref()?;
            let name = &ext.metric.name;
            let value = ext
                .current
                .value
                .as_ref()
                .or(ext.current.average_value.as_ref())?;
            let target = spec
                .metrics
                .iter()
                .flatten()
                .filter_map(|s| s.external.as_ref())
                .find(|s| &s.metric.name == name)
                .and_then(|s| s.target.value.as_ref().or(s.target.average_value.as_ref()));
            Some(match target {
                Some(t) => format!("{name} {} (target {})", value.0, t.0),
                None => format!("{name} {}", value.0),
            })
        })
        .collect();
    (!figures.is_empty()).then(|| figures.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::InfiniteLLMClusterSpec;
    use k8s_openapi::api::autoscaling::v2::{
        ExternalMetricStatus, HorizontalPodAutoscalerCondition, HorizontalPodAutoscalerStatus,
        MetricStatus, MetricValueStatus,
    };

    fn cluster(autoscaling: Option<serde_json::Value>) -> InfiniteLLMCluster {
        let mut spec = serde_json::json!({
            "model": {"servedName": "m", "source": {"hostPath": {"path": "/m"}}},
            "workers": {"replicas": 2, "image": "img", "terminationGracePeriodSeconds": 60}
        });
        if let Some(a) = autoscaling {
            spec["autoscaling"] = a;
        }
        let spec: InfiniteLLMClusterSpec = serde_json::from_value(spec).unwrap();
        InfiniteLLMCluster::new("llm", spec)
    }

    #[test]
    fn no_autoscaling_no_hpa() {
        assert!(build(&cluster(None), &Names::new("llm")).is_none());
    }

    #[test]
    fn the_hpa_carries_the_spec() {
        let ilc = cluster(Some(
            serde_json::json!({"minReplicas": 2, "maxReplicas": 5}),
        ));
        let hpa = build(&ilc, &Names::new("llm")).unwrap();
        let spec = hpa.spec;
        assert_eq!(spec.scale_target_ref.kind, "InfiniteLLMCluster");
        assert_eq!(
            spec.scale_target_ref.api_version.as_deref(),
            Some("infinitellm.io/v1alpha1")
        );
        assert_eq!(spec.scale_target_ref.name, "llm");
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 5));
        let metrics = spec.metrics.unwrap();
        assert_eq!(metrics.len(), 1, "waiting requests only when asked for");
        let ext = metrics[0].external.as_ref().unwrap();
        assert_eq!(ext.metric.name, "ilm_pool_used_percent");
        assert_eq!(
            ext.metric.selector.as_ref().unwrap().match_labels,
            Some(BTreeMap::from([(
                CLUSTER_LABEL.to_owned(),
                "llm".to_owned()
            )]))
        );
        assert_eq!(ext.target.type_, "Value");
        assert_eq!(ext.target.value, Some(Quantity("80".into())));
        let behavior = spec.behavior.unwrap();
        assert_eq!(
            behavior.scale_up.unwrap().stabilization_window_seconds,
            Some(0)
        );
        let down = behavior.scale_down.unwrap();
        assert_eq!(down.stabilization_window_seconds, Some(300));
        let policies = down.policies.unwrap();
        assert_eq!(policies.len(), 1);
        assert_eq!((policies[0].type_.as_str(), policies[0].value), ("Pods", 1));
        assert_eq!(
            policies[0].period_seconds, 60,
            "one worker per grace period"
        );
    }

    #[test]
    fn waiting_requests_and_windows_follow_the_spec() {
        let ilc = cluster(Some(serde_json::json!({
            "minReplicas": 1, "maxReplicas": 3, "targetPoolUtilizationPercent": 70,
            "targetWaitingRequestsPerWorker": 4,
            "scaleUpStabilizationSeconds": 15, "scaleDownStabilizationSeconds": 45
        })));
        let spec = build(&ilc, &Names::new("llm")).unwrap().spec;
        let metrics = spec.metrics.unwrap();
        let waiting = metrics[1].external.as_ref().unwrap();
        assert_eq!(waiting.metric.name, "ilm_requests_waiting");
        assert_eq!(waiting.target.type_, "AverageValue");
        assert_eq!(waiting.target.average_value, Some(Quantity("4".into())));
        let behavior = spec.behavior.unwrap();
        assert_eq!(
            behavior.scale_up.unwrap().stabilization_window_seconds,
            Some(15)
        );
        assert_eq!(
            behavior.scale_down.unwrap().stabilization_window_seconds,
            Some(45)
        );
    }

    fn with_status() -> HorizontalPodAutoscaler {
        let ilc = cluster(Some(
            serde_json::json!({"minReplicas": 1, "maxReplicas": 3}),
        ));
        let mut hpa = build(&ilc, &Names::new("llm")).unwrap();
        let at = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap());
        hpa.status = Some(HorizontalPodAutoscalerStatus {
            desired_replicas: 3,
            conditions: Some(vec![HorizontalPodAutoscalerCondition {
                type_: "ScalingActive".into(),
                status: "False".into(),
                reason: Some("FailedGetExternalMetric".into()),
                message: Some("unable to get external metric".into()),
                last_transition_time: Some(at),
            }]),
            current_metrics: Some(vec![MetricStatus {
                type_: "External".into(),
                external: Some(ExternalMetricStatus {
                    metric: MetricIdentifier {
                        name: "ilm_pool_used_percent".into(),
                        selector: None,
                    },
                    current: MetricValueStatus {
                        value: Some(Quantity("92500m".into())),
                        ..MetricValueStatus::default()
                    },
                }),
                ..MetricStatus::default()
            }]),
            ..HorizontalPodAutoscalerStatus::default()
        });
        hpa
    }

    #[test]
    fn hpa_conditions_become_the_clusters() {
        let hpa = with_status();
        let conditions = conditions(&hpa, Some(4));
        assert_eq!(conditions.len(), 1);
        let c = &conditions[0];
        assert_eq!(c.type_, "AutoscalerScalingActive");
        assert_eq!(c.status, "False");
        assert_eq!(c.reason, "FailedGetExternalMetric");
        assert_eq!(c.message, "unable to get external metric");
        assert_eq!(c.observed_generation, Some(4));
        assert_eq!(c.last_transition_time.0.as_second(), 1_800_000_000);
        let mut bare = hpa;
        bare.status = None;
        assert!(super::conditions(&bare, None).is_empty());
    }

    #[test]
    fn measured_names_figure_and_target() {
        assert_eq!(
            measured(&with_status()).as_deref(),
            Some("ilm_pool_used_percent 92500m (target 80)")
        );
    }
}
