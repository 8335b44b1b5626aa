//! The reconcile loop: InfiniteLLMCluster in, owned children and status out.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{Timestamp, Unit};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::Error;
use crate::apply::{Outcome, covers, ensure};
use crate::children::hpa;
use crate::children::{Desired, Settings};
use crate::crd::{InfiniteLLMCluster, InfiniteLLMClusterStatus, Phase};
use crate::metrics::Metrics;
use crate::names::{self, CLUSTER_LABEL, FIELD_MANAGER, Names};
use crate::{autoscaler, status, token};

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    /// Who this replica's Events say reported them.
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// The gManager the leader serves: the reconciler gives it each cluster's token (so it
    /// can tell which cluster a worker belongs to) and reports its pool figures in status.
    pub gmanager: crate::gmanager::GManager,
}

/// Nothing changes in a healthy cluster without a watch event, so this is only a safety net.
const RESYNC: Duration = Duration::from_secs(300);
/// Pool figures change with heartbeats, which make no watch event: a cluster that has
/// workers is looked at this often so that its status follows them.
const POOL_RESYNC: Duration = Duration::from_secs(20);
const RETRY: Duration = Duration::from_secs(10);

/// Runs the controller until `shutdown` resolves. `namespace` limits it to one namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels(&names::managed_selector());
    // Worker Pods are not owned by the cluster directly (the StatefulSet owns them), so they
    // are mapped back through their cluster label: a crash-looping worker must show in status.
    let pod_owner = |pod: Pod| {
        let cluster = pod.labels().get(CLUSTER_LABEL)?.clone();
        Some(ObjectRef::<InfiniteLLMCluster>::new(&cluster).within(&pod.namespace()?))
    };
    Controller::new(
        api::<InfiniteLLMCluster>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(api::<StatefulSet>(&client, namespace), owned.clone())
    .owns(api::<Service>(&client, namespace), owned.clone())
    .owns(
        api::<PodDisruptionBudget>(&client, namespace),
        owned.clone(),
    )
    .owns(api::<NetworkPolicy>(&client, namespace), owned.clone())
    .owns(
        api::<HorizontalPodAutoscaler>(&client, namespace),
        owned.clone(),
    )
    .watches(api::<Pod>(&client, namespace), owned, pod_owner)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx.clone())
    .for_each(|result| {
        // A cluster deleted without a finalizer is not reconciled again; the deletion of
        // its children still asks for it, and that is when its token stops being accepted.
        if let Err(kube::runtime::controller::Error::ObjectNotFound(gone)) = &result
            && let Some(ns) = &gone.namespace
        {
            ctx.gmanager
                .forget(&gmanager_cluster(ns, &Names::new(&gone.name)));
        }
        async move {
            match result {
                Ok((obj, _)) => {
                    debug!(cluster = %obj.name, namespace = ?obj.namespace, "reconciled")
                }
                Err(e) => debug!(error = %e, "reconcile did not run"),
            }
        }
    })
    .await;
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn error_policy(ilc: Arc<InfiniteLLMCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.metric_label());
    warn!(cluster = %ilc.name_any(), namespace = ?ilc.namespace(), %error, "reconcile failed");
    Action::requeue(RETRY)
}

/// Every child is owned through a controller reference and removed by garbage collection,
/// so no finalizer is needed.
async fn reconcile(ilc: Arc<InfiniteLLMCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile();
    if ilc.meta().deletion_timestamp.is_some() {
        // Garbage collection is removing the children; applying them now would recreate them.
        if let Some(ns) = ilc.namespace() {
            ctx.gmanager
                .forget(&gmanager_cluster(&ns, &Names::new(&ilc.name_any())));
        }
        return Ok(Action::await_change());
    }
    let ns = ilc
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let names = Names::new(&ilc.name_any());
    let client = &ctx.client;
    let desired = Desired::build(&ilc, &ctx.settings);

    ensure_token(&ilc, &names, &ns, &ctx).await?;
    ctx.gmanager.configure_workers(
        &gmanager_cluster(&ns, &names),
        u32::try_from(ilc.spec.workers.replicas).unwrap_or(0),
    );
    let metrics = &ctx.metrics;
    for service in [desired.peer_service, desired.client_service] {
        ensure(
            &Api::<Service>::namespaced(client.clone(), &ns),
            service,
            metrics,
        )
        .await?;
    }
    ensure(&Api::namespaced(client.clone(), &ns), desired.pdb, metrics).await?;
    ensure(
        &Api::namespaced(client.clone(), &ns),
        desired.network_policy,
        metrics,
    )
    .await?;

    let (autoscaler, note) = autoscaler::reconcile(
        &ilc,
        &names,
        &Api::namespaced(client.clone(), &ns),
        desired.autoscaler,
        metrics,
    )
    .await?;
    if let Some(n) = note {
        publish(&ctx, &ilc, n.type_, n.reason, n.note).await;
    }

    let template = desired
        .statefulset
        .spec
        .as_ref()
        .map(|s| s.template.clone());
    let sts = ensure(
        &Api::<StatefulSet>::namespaced(client.clone(), &ns),
        desired.statefulset,
        metrics,
    )
    .await?;
    announce_statefulset(&ilc, &sts, template.as_ref(), autoscaler.as_ref(), &ctx).await;

    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&names.selector_string()))
        .await
        .map_err(Error::kube("list", "Pod"))?;
    // The API server keeps whole seconds; rounding keeps our copy identical to its copy.
    let now = Time(
        Timestamp::now()
            .round(Unit::Second)
            .unwrap_or_else(|_| Timestamp::now()),
    );
    // Only a cluster short of ready workers needs to know why.
    let sts_ready = sts
        .object()
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let warnings = if sts_ready < ilc.spec.workers.replicas {
        Api::<CoreEvent>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().fields("type=Warning"))
            .await
            .map_err(Error::kube("list", "Event"))?
            .items
    } else {
        Vec::new()
    };
    let cluster = gmanager_cluster(&ns, &names);
    // A new leader's gManager counts membership changes on from where the last one stopped.
    if let Some(epoch) = ilc.status.as_ref().and_then(|s| s.membership_epoch) {
        ctx.gmanager
            .continue_epoch(&cluster, u64::try_from(epoch).unwrap_or(0));
    }
    let pool = ctx.gmanager.pool(&cluster);
    let mut next = status::with_pool(
        status::compute(&ilc, Some(sts.object()), &pods.items, &warnings, &now),
        pool.as_ref(),
    );
    if let Some(hpa) = &autoscaler {
        next.conditions
            .extend(hpa::conditions(hpa, ilc.metadata.generation));
    }
    if ilc.status.as_ref() != Some(&next) {
        write_status(&ilc, &ns, &next, &ctx).await?;
    }
    // Workers of a scaled-down cluster may still be draining and heartbeating.
    let workers_expected =
        ilc.spec.workers.replicas > 0 || pool.as_ref().is_some_and(|p| !p.workers.is_empty());
    Ok(Action::requeue(if workers_expected {
        POOL_RESYNC
    } else {
        RESYNC
    }))
}

/// Finds a cluster's pod by worker id (its pod name) for the gManager's identity check: the
/// pod's IP, if the pod carries the cluster's labels and has one.
pub fn pod_lookup(client: Client) -> crate::gmanager::PodLookup {
    Arc::new(move |cluster: String, worker: String| {
        let client = client.clone();
        Box::pin(async move {
            let (ns, name) = cluster.split_once('/')?;
            let pods = Api::<Pod>::namespaced(client, ns)
                .list(
                    &ListParams::default()
                        .labels(&Names::new(name).selector_string())
                        .fields(&format!("metadata.name={worker}")),
                )
                .await
                .inspect_err(|e| warn!(cluster, worker, error = %e, "looking up a worker's pod"))
                .ok()?;
            let ip = pods.items.first()?.status.as_ref()?.pod_ip.as_ref()?;
            ip.parse().ok()
        })
    })
}

/// The gManager's name for a cluster: its token selects this ledger.
fn gmanager_cluster(ns: &str, names: &Names) -> String {
    format!("{ns}/{}", names.cluster)
}

/// Creates the token Secret once; afterwards only its labels and owner are kept in place,
/// with the token it already holds.
async fn ensure_token(
    ilc: &InfiniteLLMCluster,
    names: &Names,
    ns: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let api = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let existing = api
        .get_opt(&names.token_secret())
        .await
        .map_err(Error::kube("get", "Secret"))?
        .as_ref()
        .and_then(token::existing);
    let value = match existing {
        Some(value) => value,
        None => k8s_openapi::ByteString(token::generate()?.into_bytes()),
    };
    if let Ok(token) = std::str::from_utf8(&value.0) {
        ctx.gmanager
            .tokens()
            .set(&gmanager_cluster(ns, names), token);
    }
    let outcome = ensure(&api, token::secret(ilc, names, value), &ctx.metrics).await?;
    if matches!(outcome, Outcome::Created(_)) {
        info!(cluster = %names.cluster, namespace = ns, secret = %names.token_secret(), "generated the cluster token");
        publish(
            ctx,
            ilc,
            EventType::Normal,
            "TokenGenerated",
            format!(
                "Generated the cluster token in Secret {}",
                names.token_secret()
            ),
        )
        .await;
    }
    Ok(())
}

/// Events for the StatefulSet changes a user wants to see: creation, scaling, rollouts.
async fn announce_statefulset(
    ilc: &InfiniteLLMCluster,
    outcome: &Outcome<StatefulSet>,
    template: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>,
    autoscaler: Option<&HorizontalPodAutoscaler>,
    ctx: &Context,
) {
    let replicas = |s: &StatefulSet| s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    match outcome {
        Outcome::Unchanged(_) => {}
        Outcome::Created(sts) => {
            let note = format!(
                "Created StatefulSet {} with {} workers",
                sts.name_any(),
                replicas(sts)
            );
            info!(cluster = %ilc.name_any(), namespace = ?ilc.namespace(), "{note}");
            publish(ctx, ilc, EventType::Normal, "Created", note).await;
        }
        Outcome::Updated { before, after } => {
            let (from, to) = (replicas(before), replicas(after));
            if from != to {
                // The HPA is the one scaling when there is one: say on what figures.
                let (reason, note) = match autoscaler {
                    Some(hpa) => (
                        "Autoscaled",
                        format!(
                            "The autoscaler scales workers from {from} to {to}{}",
                            hpa::measured(hpa).map_or(String::new(), |m| format!(": {m}"))
                        ),
                    ),
                    None => ("Scaled", format!("Scaling workers from {from} to {to}")),
                };
                info!(cluster = %ilc.name_any(), namespace = ?ilc.namespace(), "{note}");
                publish(ctx, ilc, EventType::Normal, reason, note).await;
            }
            let old = before.spec.as_ref().map(|s| &s.template);
            let rolled = match (old, template) {
                (Some(old), Some(new)) => {
                    let have = serde_json::to_value(old).unwrap_or_default();
                    let want = serde_json::to_value(new).unwrap_or_default();
                    !covers(&have, &want)
                }
                _ => false,
            };
            if rolled {
                let note =
                    "Rolling workers to the new spec, one drained worker at a time".to_owned();
                info!(cluster = %ilc.name_any(), namespace = ?ilc.namespace(), "{note}");
                publish(ctx, ilc, EventType::Normal, "RollingUpdate", note).await;
            }
        }
    }
}

async fn write_status(
    ilc: &InfiniteLLMCluster,
    ns: &str,
    next: &InfiniteLLMClusterStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let api = Api::<InfiniteLLMCluster>::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": InfiniteLLMCluster::api_version(&()),
        "kind": InfiniteLLMCluster::kind(&()),
        "status": next,
    });
    api.patch_status(
        &ilc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube("update status of", "InfiniteLLMCluster"))?;
    ctx.metrics.write("InfiniteLLMClusterStatus");

    let before = ilc.status.as_ref().and_then(|s| s.phase);
    if before != next.phase {
        info!(cluster = %ilc.name_any(), namespace = ns, phase = ?next.phase, "phase changed");
        if next.phase == Some(Phase::Ready) {
            let note = format!("All {} workers are ready", next.ready_replicas);
            publish(ctx, ilc, EventType::Normal, "Ready", note).await;
        }
    }
    // Every new reason for failing workers is told, not only the first.
    let failing = |s: &InfiniteLLMClusterStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == status::DEGRADED && c.status == "True")
            .map(|c| c.message.clone())
    };
    if let Some(note) = failing(next)
        && ilc.status.as_ref().and_then(failing).as_ref() != Some(&note)
    {
        publish(ctx, ilc, EventType::Warning, "WorkersFailing", note).await;
    }
    Ok(())
}

/// Events are best effort: failing to record one must not fail the reconcile. Each goes
/// through a recorder of its own: a shared one folds Events of the same reason into a series
/// that keeps the first one's note, so "Scaling workers from 3 to 2" would read "from 2 to 3".
async fn publish(
    ctx: &Context,
    ilc: &InfiniteLLMCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    match recorder.publish(&event, &ilc.object_ref(&())).await {
        Ok(()) => ctx.metrics.write("Event"),
        Err(error) => warn!(%error, reason, "could not record an event"),
    }
}
