//! Keeps a cluster's HorizontalPodAutoscaler in line with `spec.autoscaling`: created and
//! updated while the block is there, deleted when it goes (then `kubectl scale` is the
//! user's again).

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::Error;
use crate::apply::{Outcome, ensure};
use crate::crd::InfiniteLLMCluster;
use crate::metrics::Metrics;
use crate::names::Names;

/// An Event to record about the autoscaler.
pub struct Note {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

/// Applies `desired` (or deletes the cluster's HPA when `None`); returns the HPA as the
/// server holds it, and what to tell the user.
pub async fn reconcile(
    ilc: &InfiniteLLMCluster,
    names: &Names,
    api: &Api<HorizontalPodAutoscaler>,
    desired: Option<HorizontalPodAutoscaler>,
    metrics: &Metrics,
) -> Result<(Option<HorizontalPodAutoscaler>, Option<Note>), Error> {
    let Some(desired) = desired else {
        return remove(ilc, names, api, metrics)
            .await
            .map(|note| (None, note));
    };
    let bounds = (
        desired.spec.min_replicas.unwrap_or(1),
        desired.spec.max_replicas,
    );
    let target = ilc
        .spec
        .autoscaling
        .as_ref()
        .map_or(0, |a| a.target_pool_utilization_percent);
    let outcome = ensure(api, desired, metrics).await?;
    let what = format!(
        "HorizontalPodAutoscaler {}: {} to {} workers, pool use target {target}%",
        names.autoscaler(),
        bounds.0,
        bounds.1
    );
    let note = match &outcome {
        Outcome::Unchanged(_) => None,
        Outcome::Created(_) => Some(Note {
            type_: EventType::Normal,
            reason: "AutoscalerCreated",
            note: format!("Created {what}"),
        }),
        Outcome::Updated { .. } => Some(Note {
            type_: EventType::Normal,
            reason: "AutoscalerUpdated",
            note: format!("Updated {what}"),
        }),
    };
    Ok((Some(outcome.object().clone()), note))
}

/// Deletes the HPA this cluster owns, if any; one it does not own is left alone.
async fn remove(
    ilc: &InfiniteLLMCluster,
    names: &Names,
    api: &Api<HorizontalPodAutoscaler>,
    metrics: &Metrics,
) -> Result<Option<Note>, Error> {
    let name = names.autoscaler();
    let Some(current) = api
        .get_opt(&name)
        .await
        .map_err(Error::kube("get", "HorizontalPodAutoscaler"))?
    else {
        return Ok(None);
    };
    let uid = ilc.meta().uid.as_deref();
    let owned = current
        .owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && Some(r.uid.as_str()) == uid);
    if !owned {
        return Ok(None);
    }
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(None),
        Err(e) => return Err(Error::kube("delete", "HorizontalPodAutoscaler")(e)),
    }
    metrics.write("HorizontalPodAutoscaler");
    Ok(Some(Note {
        type_: EventType::Normal,
        reason: "AutoscalerDeleted",
        note: format!(
            "Deleted HorizontalPodAutoscaler {name}: spec.autoscaling is gone, the worker count is spec.workers.replicas"
        ),
    }))
}
