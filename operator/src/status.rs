//! Status from what the StatefulSet and the worker Pods report. Pure, so every transition
//! is unit-tested; the reconciler writes the result only when it differs.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::SignedDuration;
use kube::ResourceExt;

use infinite_llm_protocol::gmanager::PoolView;

use crate::crd::{InfiniteLLMCluster, InfiniteLLMClusterStatus, Phase, PoolStatus};
use crate::names::Names;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Container waiting reasons that will not fix themselves.
const FAILING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// A refusal to create a worker Pod (admission, quota) older than this is taken as resolved.
const CREATE_FAILURE_MEMORY: SignedDuration = SignedDuration::from_secs(300);
/// Longest text of one failure in a condition message; kubelet messages can run long.
const MAX_FAILURE_TEXT: usize = 600;

/// `warnings` are the namespace's Warning Events: those about the StatefulSet and its Pods say
/// why a worker is not coming up when the Pods themselves do not (a volume that does not
/// mount, a Pod that admission refused).
pub fn compute(
    ilc: &InfiniteLLMCluster,
    sts: Option<&StatefulSet>,
    pods: &[Pod],
    warnings: &[Event],
    now: &Time,
) -> InfiniteLLMClusterStatus {
    let names = Names::new(&ilc.name_any());
    let generation = ilc.metadata.generation;
    let desired = ilc.spec.workers.replicas;
    let sts_status = sts.and_then(|s| s.status.clone()).unwrap_or_default();
    let replicas = sts_status.replicas;
    let ready = sts_status.ready_replicas.unwrap_or(0);
    let updated = sts_status.updated_replicas.unwrap_or(0);
    // The StatefulSet controller has not yet looked at our latest template.
    let stale = sts.is_some_and(|s| sts_status.observed_generation < s.metadata.generation);

    let mut failing: Vec<String> = pods
        .iter()
        .filter_map(|pod| failing_reason(pod, warnings))
        .collect();
    if let Some(sts) = sts.filter(|_| pods.len() < usize::try_from(desired).unwrap_or(0)) {
        failing.extend(refused_creation(sts, warnings, now));
    }

    let progressing = if sts.is_none() {
        Some(("Creating", "creating the worker StatefulSet".to_owned()))
    } else if stale || updated < desired.min(replicas) {
        Some((
            "RollingUpdate",
            format!("{updated} of {desired} workers run the current spec"),
        ))
    } else if replicas != desired {
        Some((
            "Scaling",
            format!("scaling workers from {replicas} to {desired}"),
        ))
    } else if ready < desired && failing.is_empty() {
        Some((
            "WaitingForWorkers",
            format!("{ready} of {desired} workers ready"),
        ))
    } else {
        None
    };
    let all_ready = progressing.is_none() && failing.is_empty() && ready == desired;

    let conditions = vec![
        condition(
            READY,
            all_ready,
            if all_ready {
                "AllWorkersReady"
            } else {
                "WorkersNotReady"
            },
            format!("{ready} of {desired} workers ready"),
            generation,
        ),
        match &progressing {
            Some((reason, message)) => {
                condition(PROGRESSING, true, reason, message.clone(), generation)
            }
            None => condition(
                PROGRESSING,
                false,
                "Stable",
                "workers match the spec".to_owned(),
                generation,
            ),
        },
        if failing.is_empty() {
            condition(
                DEGRADED,
                false,
                "AsExpected",
                "no worker is failing".to_owned(),
                generation,
            )
        } else {
            condition(
                DEGRADED,
                true,
                "WorkersFailing",
                failing.join("; "),
                generation,
            )
        },
    ];

    let phase = if !failing.is_empty() {
        Phase::Degraded
    } else if all_ready {
        Phase::Ready
    } else if sts.is_none() {
        Phase::Pending
    } else {
        Phase::Progressing
    };

    let previous = ilc.status.clone().unwrap_or_default();
    InfiniteLLMClusterStatus {
        phase: Some(phase),
        conditions: keep_transition_times(conditions, &previous.conditions, now),
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        selector: Some(names.selector_string()),
        pool: previous.pool,
        membership_epoch: previous.membership_epoch,
    }
}

/// Fills the pool figures and the membership epoch from the gManager's view of the cluster.
/// Without a view (no worker has reached this leader yet, as just after a fail-over, while
/// workers re-register) the last reported figures stay rather than dropping to nothing.
pub fn with_pool(
    mut status: InfiniteLLMClusterStatus,
    view: Option<&PoolView>,
) -> InfiniteLLMClusterStatus {
    let Some(view) = view else {
        return status;
    };
    let t = &view.totals;
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let held = t.used_blocks.saturating_add(t.lent_blocks);
    let used_percent = match t.total_blocks {
        0 => 0,
        total => (u128::from(held) * 100 + u128::from(total) / 2) / u128::from(total),
    };
    status.pool = Some(PoolStatus {
        workers: count(view.workers.len() as u64),
        total_blocks: count(t.total_blocks),
        used_blocks: count(t.used_blocks),
        lent_blocks: count(t.lent_blocks),
        borrowed_blocks: count(t.borrowed_blocks),
        used_percent: i64::try_from(used_percent).unwrap_or(i64::MAX),
    });
    status.membership_epoch = Some(count(view.epoch));
    status
}

/// Why a worker Pod is not coming up, when it is stuck rather than on its way: its container
/// fails (with the message it left, such as a model that does not load), the scheduler
/// cannot place it, or the kubelet cannot start it (a volume that does not mount).
fn failing_reason(pod: &Pod, warnings: &[Event]) -> Option<String> {
    let status = pod.status.as_ref()?;
    let name = pod.name_any();
    let crashing = status.container_statuses.iter().flatten().find_map(|cs| {
        let waiting = cs.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        if !FAILING_REASONS.contains(&reason) {
            return None;
        }
        let last_words = cs
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.message.as_deref())
            .or(waiting.message.as_deref());
        Some(describe(&name, reason, last_words))
    });
    if crashing.is_some() {
        return crashing;
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unschedulable {
        return Some(describe(&name, "Unschedulable", c.message.as_deref()));
    }
    let starting = status.phase.as_deref() == Some("Pending")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True");
    if !starting {
        return None;
    }
    let uid = pod.uid()?;
    latest(
        warnings
            .iter()
            .filter(|e| e.involved_object.uid.as_deref() == Some(uid.as_str())),
    )
    .map(|e| {
        describe(
            &name,
            e.reason.as_deref().unwrap_or("Warning"),
            e.message.as_deref(),
        )
    })
}

/// The StatefulSet controller's latest recent refusal to create a worker Pod, which leaves
/// no Pod behind to look at (admission refused it, a quota ran out).
fn refused_creation(sts: &StatefulSet, warnings: &[Event], now: &Time) -> Option<String> {
    let uid = sts.uid()?;
    let event = latest(warnings.iter().filter(|e| {
        e.involved_object.uid.as_deref() == Some(uid.as_str())
            && e.reason.as_deref() == Some("FailedCreate")
    }))?;
    let seen = last_seen(event)?;
    (now.0.duration_since(seen) < CREATE_FAILURE_MEMORY).then(|| {
        describe(
            &format!("StatefulSet {}", sts.name_any()),
            "FailedCreate",
            event.message.as_deref(),
        )
    })
}

fn last_seen(event: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0)
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

fn latest<'a>(events: impl Iterator<Item = &'a Event>) -> Option<&'a Event> {
    events.max_by_key(|e| last_seen(e))
}

/// `<who>: <reason>[: <message>]`, the message on one line and bounded.
fn describe(who: &str, reason: &str, message: Option<&str>) -> String {
    let message = message.map(str::trim).filter(|m| !m.is_empty());
    match message {
        None => format!("{who}: {reason}"),
        Some(m) => {
            let mut line = m.split_whitespace().collect::<Vec<_>>().join(" ");
            if line.len() > MAX_FAILURE_TEXT {
                let cut = (0..=MAX_FAILURE_TEXT)
                    .rev()
                    .find(|&i| line.is_char_boundary(i))
                    .unwrap_or(0);
                line.truncate(cut);
                line.push('…');
            }
            format!("{who}: {reason}: {line}")
        }
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        // Filled by keep_transition_times.
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// A condition's transition time moves only when its status flips, so an unchanged cluster
/// yields an identical status and no write.
fn keep_transition_times(
    mut conditions: Vec<Condition>,
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    for c in &mut conditions {
        c.last_transition_time = previous
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
            .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
    }
    conditions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::InfiniteLLMClusterSpec;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateWaiting, ContainerStatus, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn cluster(replicas: i32) -> InfiniteLLMCluster {
        let spec: InfiniteLLMClusterSpec = serde_json::from_value(serde_json::json!({
            "model": {"servedName": "m", "source": {"hostPath": {"path": "/m"}}},
            "workers": {"replicas": replicas, "image": "img"}
        }))
        .unwrap();
        let mut ilc = InfiniteLLMCluster::new("c", spec);
        ilc.metadata.generation = Some(1);
        ilc
    }

    fn sts(replicas: i32, ready: i32, updated: i32) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(1),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(StatefulSetStatus {
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                observed_generation: Some(1),
                ..StatefulSetStatus::default()
            }),
        }
    }

    fn is_true(status: &InfiniteLLMClusterStatus, type_: &str) -> bool {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap())
    }

    #[test]
    fn ready_when_every_worker_is_ready() {
        let s = compute(&cluster(2), Some(&sts(2, 2, 2)), &[], &[], &now());
        assert_eq!(s.phase, Some(Phase::Ready));
        assert!(is_true(&s, READY));
        assert!(!is_true(&s, PROGRESSING));
        assert_eq!(s.ready_replicas, 2);
        assert_eq!(s.observed_generation, Some(1));
        assert!(s.selector.unwrap().contains("app.kubernetes.io/instance=c"));
    }

    #[test]
    fn progressing_while_scaling_or_rolling() {
        let s = compute(&cluster(3), Some(&sts(2, 2, 2)), &[], &[], &now());
        assert_eq!(s.phase, Some(Phase::Progressing));
        assert!(is_true(&s, PROGRESSING));
        let reason = |s: &InfiniteLLMClusterStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == PROGRESSING)
                .unwrap()
                .reason
                .clone()
        };
        assert_eq!(reason(&s), "Scaling");
        let s = compute(&cluster(2), Some(&sts(2, 2, 1)), &[], &[], &now());
        assert_eq!(reason(&s), "RollingUpdate");
        let s = compute(&cluster(2), None, &[], &[], &now());
        assert_eq!(s.phase, Some(Phase::Pending));
    }

    #[test]
    fn degraded_when_a_worker_crash_loops() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("c-0".into()),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "worker".into(),
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("CrashLoopBackOff".into()),
                            message: None,
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
        };
        let s = compute(&cluster(1), Some(&sts(1, 0, 1)), &[pod], &[], &now());
        assert_eq!(s.phase, Some(Phase::Degraded));
        assert!(is_true(&s, DEGRADED));
        let d = s.conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!(d.message, "c-0: CrashLoopBackOff");
    }

    fn degraded_message(s: &InfiniteLLMClusterStatus) -> Option<&str> {
        s.conditions
            .iter()
            .find(|c| c.type_ == DEGRADED && c.status == "True")
            .map(|c| c.message.as_str())
    }

    fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn warning(uid: &str, reason: &str, message: &str, at: i64) -> Event {
        let time = k8s_openapi::jiff::Timestamp::from_second(at).unwrap();
        from_json(serde_json::json!({
            "metadata": {"name": format!("e{at}")},
            "involvedObject": {"uid": uid},
            "type": "Warning", "reason": reason, "message": message,
            "lastTimestamp": time.to_string(),
        }))
    }

    #[test]
    fn a_crash_shows_the_message_the_worker_left() {
        let pod: Pod = from_json(serde_json::json!({
            "metadata": {"name": "c-0"},
            "status": {"containerStatuses": [{
                "name": "worker", "image": "i", "imageID": "", "ready": false, "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
                "lastState": {"terminated": {"exitCode": 1,
                    "message": "loading the tokenizer from /models:\n  no such file"}}
            }]}
        }));
        let s = compute(&cluster(1), Some(&sts(1, 0, 1)), &[pod], &[], &now());
        assert_eq!(
            degraded_message(&s),
            Some("c-0: CrashLoopBackOff: loading the tokenizer from /models: no such file")
        );
    }

    #[test]
    fn an_unschedulable_worker_shows_the_schedulers_reason() {
        let pod: Pod = from_json(serde_json::json!({
            "metadata": {"name": "c-0", "uid": "p0"},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient cpu."
            }]}
        }));
        let s = compute(&cluster(1), Some(&sts(1, 0, 1)), &[pod], &[], &now());
        assert_eq!(s.phase, Some(Phase::Degraded));
        assert_eq!(
            degraded_message(&s),
            Some("c-0: Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.")
        );
    }

    #[test]
    fn a_worker_stuck_starting_shows_its_latest_warning() {
        let pending = |uid: &str| -> Pod {
            from_json(serde_json::json!({
                "metadata": {"name": "c-0", "uid": uid},
                "status": {"phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"}]}
            }))
        };
        let warnings = [
            warning("p0", "FailedMount", "old message", 1_799_999_000),
            warning(
                "p0",
                "FailedMount",
                "hostPath type check failed",
                1_799_999_900,
            ),
            warning("other", "FailedMount", "someone else", 1_799_999_990),
        ];
        let s = compute(
            &cluster(1),
            Some(&sts(1, 0, 1)),
            &[pending("p0")],
            &warnings,
            &now(),
        );
        assert_eq!(
            degraded_message(&s),
            Some("c-0: FailedMount: hostPath type check failed")
        );
        // The same name with a new uid is a new Pod: the old one's warnings are not its.
        let s = compute(
            &cluster(1),
            Some(&sts(1, 0, 1)),
            &[pending("p1")],
            &warnings,
            &now(),
        );
        assert_eq!(s.phase, Some(Phase::Progressing));
    }

    #[test]
    fn a_pod_refused_at_creation_shows_the_statefulsets_recent_warning() {
        let mut set = sts(1, 0, 0);
        set.metadata.uid = Some("s0".into());
        set.metadata.name = Some("c".into());
        let refused = "create Pod c-0 in StatefulSet c failed error: pods \"c-0\" is forbidden: violates PodSecurity \"restricted:latest\"";
        let recent = [warning("s0", "FailedCreate", refused, 1_799_999_950)];
        let s = compute(&cluster(1), Some(&set), &[], &recent, &now());
        assert_eq!(
            degraded_message(&s)
                .map(|m| m.starts_with("StatefulSet c: FailedCreate: create Pod c-0")),
            Some(true),
            "{s:?}"
        );
        let stale = [warning("s0", "FailedCreate", refused, 1_799_000_000)];
        let s = compute(&cluster(1), Some(&set), &[], &stale, &now());
        assert_eq!(degraded_message(&s), None);
    }

    fn view(epoch: u64, pools: &[(u64, u64, u64, u64)]) -> PoolView {
        use infinite_llm_protocol::gmanager::{PoolFigures, WorkerView};
        let figures = |&(total, used, lent, borrowed): &(u64, u64, u64, u64)| PoolFigures {
            total_blocks: total,
            used_blocks: used,
            lent_blocks: lent,
            borrowed_blocks: borrowed,
            ..PoolFigures::default()
        };
        let mut totals = PoolFigures::default();
        for p in pools.iter().map(figures) {
            totals.total_blocks += p.total_blocks;
            totals.used_blocks += p.used_blocks;
            totals.lent_blocks += p.lent_blocks;
            totals.borrowed_blocks += p.borrowed_blocks;
        }
        PoolView {
            epoch,
            block_tokens: 16,
            workers: pools
                .iter()
                .enumerate()
                .map(|(i, p)| WorkerView {
                    worker_id: format!("w{i}"),
                    api_url: String::new(),
                    peer_addr: String::new(),
                    pool: figures(p),
                    free_blocks: 0,
                    last_seen_ms: 0,
                    migrated_blocks: 0,
                })
                .collect(),
            totals,
            debtors: Vec::new(),
            creditors: Vec::new(),
            debts: Vec::new(),
            planned_moves: Vec::new(),
            moves_in_flight: Vec::new(),
            epoch_history: Vec::new(),
        }
    }

    #[test]
    fn the_pool_comes_from_the_gmanager_and_stays_without_it() {
        let ilc = cluster(2);
        let s = compute(&ilc, Some(&sts(2, 2, 2)), &[], &[], &now());
        assert_eq!(
            with_pool(s.clone(), None),
            s,
            "no view leaves the pool unset"
        );
        let s = with_pool(s, Some(&view(3, &[(100, 30, 10, 0), (100, 5, 0, 10)])));
        assert_eq!(
            s.pool,
            Some(PoolStatus {
                workers: 2,
                total_blocks: 200,
                used_blocks: 35,
                lent_blocks: 10,
                borrowed_blocks: 10,
                // 45 of 200 blocks hold KV: 22.5 rounds to 23.
                used_percent: 23,
            })
        );
        assert_eq!(s.membership_epoch, Some(3));
        // A later reconcile without a view (a new leader) keeps what was reported.
        let mut ilc = ilc;
        ilc.status = Some(s.clone());
        let again = compute(&ilc, Some(&sts(2, 2, 2)), &[], &[], &now());
        assert_eq!(with_pool(again, None), s);
        let empty = with_pool(s, Some(&view(4, &[])));
        assert_eq!(
            empty.pool.unwrap().used_percent,
            0,
            "an empty pool is 0% used"
        );
    }

    #[test]
    fn unchanged_inputs_give_an_identical_status() {
        let mut ilc = cluster(2);
        let first = compute(&ilc, Some(&sts(2, 2, 2)), &[], &[], &now());
        ilc.status = Some(first.clone());
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_900_000_000).unwrap());
        let second = compute(&ilc, Some(&sts(2, 2, 2)), &[], &[], &later);
        assert_eq!(first, second);
        let third = compute(&ilc, Some(&sts(2, 1, 2)), &[], &[], &later);
        let ready = third.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.last_transition_time, later);
    }
}
