//! The reconciler against the real API server, StatefulSet controller and garbage collector.

use std::collections::BTreeMap;
use std::time::Duration;

use infinite_llm_operator::crd::{InfiniteLLMCluster, Phase, PoolStatus};
use infinite_llm_operator::names::Names;
use infinite_llm_protocol::gmanager::{Heartbeat, PoolFigures, Register};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};

use crate::harness::{self, ControlPlane, Operator, eventually, shared, stderr, stdout};

const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    cp: &'static ControlPlane,
    client: Client,
    ns: String,
    operator: Operator,
}

async fn setup(ns: &str) -> Setup {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, ns).await;
    priority_class(&client).await;
    let operator = Operator::start(cp, &cp.kubeconfig, &ns, "op", &[]);
    Setup {
        cp,
        client,
        ns,
        operator,
    }
}

/// The test clusters ask for this class; Pods naming a missing one are refused.
async fn priority_class(client: &Client) {
    let class = serde_json::json!({
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": "inference"},
        "value": 1000,
    });
    Api::<PriorityClass>::all(client.clone())
        .patch(
            "inference",
            &PatchParams::apply("e2e"),
            &Patch::Apply(&class),
        )
        .await
        .unwrap();
}

impl Setup {
    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create(&self, ilc: &InfiniteLLMCluster) -> InfiniteLLMCluster {
        self.api::<InfiniteLLMCluster>()
            .create(&PostParams::default(), ilc)
            .await
            .unwrap()
    }

    async fn statefulset(&self, name: &str) -> StatefulSet {
        let api = self.api::<StatefulSet>();
        eventually("the StatefulSet exists", LIMIT, || async {
            api.get_opt(name).await.unwrap()
        })
        .await
    }

    /// Waits for the StatefulSet controller to create `n` Pods, then marks them Ready.
    async fn pods_ready(&self, name: &str, n: usize) {
        let selector = Names::new(name).selector_string();
        let pods = self.api::<Pod>();
        eventually(&format!("{n} worker Pods exist"), LIMIT, || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .unwrap();
            (list.items.len() == n).then_some(())
        })
        .await;
        harness::mark_pods_ready(&self.client, &self.ns, &selector).await;
    }

    async fn wait_phase(&self, name: &str, phase: Phase) -> InfiniteLLMCluster {
        let api = self.api::<InfiniteLLMCluster>();
        eventually(&format!("{name} is {phase:?}"), LIMIT, || async {
            let ilc = api.get(name).await.unwrap();
            let current = ilc.status.as_ref().and_then(|s| s.phase);
            (current == Some(phase)).then_some(ilc)
        })
        .await
    }

    /// Waits for events with this reason: the operator records them after the status write
    /// a test waits on, so they can lag it.
    async fn events(&self, reason: &str) -> Vec<Event> {
        let api = self.api::<Event>();
        eventually(&format!("a {reason} event is recorded"), LIMIT, || async {
            let events: Vec<Event> = api
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .collect();
            (!events.is_empty()).then_some(events)
        })
        .await
    }
}

/// Whether every event is of this type ("Normal" or "Warning").
fn all_of_type(events: &[Event], type_: &str) -> bool {
    events.iter().all(|e| e.type_.as_deref() == Some(type_))
}

fn env_of(sts: &StatefulSet) -> BTreeMap<String, String> {
    let container = &sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

#[tokio::test]
async fn children_have_the_right_specs_and_owners() {
    let s = setup("children").await;
    let ilc = s.create(&crate::cluster("llm", 2)).await;
    let uid = ilc.uid().unwrap();

    let sts = s.statefulset("llm").await;
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(spec.service_name.as_deref(), Some("llm-peers"));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.termination_grace_period_seconds, Some(300));
    assert_eq!(pod.priority_class_name.as_deref(), Some("inference"));
    assert_eq!(pod.node_selector.as_ref().unwrap()["gpu"], "yes");
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("ghcr.io/infinite-llm/worker:test"));
    assert_eq!(
        c.command.as_ref().unwrap(),
        &["infinite-llm-worker", "serve"]
    );
    let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(
        c.resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"].0,
        "2Gi"
    );
    let env = env_of(&sts);
    for (k, v) in [
        ("ILM_MODEL", "/models/tiny-llama"),
        ("ILM_SERVED_MODEL_NAME", "tiny-llama"),
        ("ILM_PORT", "8000"),
        ("ILM_PEER_PORT", "8101"),
        ("ILM_DEVICE", "cuda:0"),
        ("ILM_BLOCK_TOKENS", "16"),
        ("ILM_GPU_MEMORY_FRACTION", "0.8"),
        ("ILM_LEND_FRACTION", "0.4"),
        ("ILM_LONG_PREFILL_TOKENS", "256"),
        ("ILM_QUEUE_TIMEOUT_SECS", "60"),
        ("ILM_GRACE_PERIOD_SECS", "295"),
        ("ILM_TOKEN_FILE", "/var/run/infinite-llm/token/token"),
        (
            "ILM_GMANAGER_URL",
            "http://infinite-llm-operator-gmanager.children.svc:8001",
        ),
    ] {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "env {k}");
    }
    let field_of = |name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field_of("ILM_WORKER_ID").as_deref(), Some("metadata.name"));
    // Each worker advertises its own Pod IP to its peers and the gManager.
    assert_eq!(
        field_of("ILM_ADVERTISE_HOST").as_deref(),
        Some("status.podIP")
    );
    assert_eq!(env.get("ILM_HOST").map(String::as_str), Some("0.0.0.0"));
    let peer_port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("peer"))
        .expect("a peer container port")
        .container_port;
    assert_eq!(env["ILM_PEER_PORT"], peer_port.to_string());
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .clone()
            .unwrap()
    };
    assert_eq!(probe_path(&c.readiness_probe), "/ready");
    assert_eq!(probe_path(&c.liveness_probe), "/health");
    let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert_eq!(
        pre_stop.exec.as_ref().unwrap().command.as_ref().unwrap(),
        &[
            "infinite-llm-worker",
            "drain",
            "--port",
            "8000",
            "--token-file",
            "/var/run/infinite-llm/token/token",
            "--delay-secs",
            "5"
        ]
    );
    let volumes = pod.volumes.as_ref().unwrap();
    let token_volume = volumes.iter().find(|v| v.name == "token").unwrap();
    assert_eq!(
        token_volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("llm-token")
    );
    let model = volumes.iter().find(|v| v.name == "model").unwrap();
    assert_eq!(
        model.persistent_volume_claim.as_ref().unwrap().claim_name,
        "models"
    );

    let peers = s.api::<Service>().get("llm-peers").await.unwrap();
    let peers_spec = peers.spec.as_ref().unwrap();
    assert_eq!(peers_spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(peers_spec.publish_not_ready_addresses, Some(true));
    let peer_service_port = peers_spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("peer"))
        .expect("a peer Service port");
    assert_eq!(peer_service_port.port, peer_port);
    assert_eq!(
        peer_service_port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("peer".into()))
    );
    let client_svc = s.api::<Service>().get("llm").await.unwrap();
    assert_eq!(
        client_svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        8000
    );
    let pdb = s.api::<PodDisruptionBudget>().get("llm").await.unwrap();
    assert_eq!(
        pdb.spec.as_ref().unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let np = s.api::<NetworkPolicy>().get("llm-peers").await.unwrap();
    let rules = np.spec.as_ref().unwrap().ingress.as_ref().unwrap();
    let peer_rule = rules
        .iter()
        .find(|r| {
            r.ports.as_ref().unwrap()[0].port
                == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(peer_port))
        })
        .expect("a rule for the peer port");
    let from = peer_rule
        .from
        .as_ref()
        .expect("the peer port is not open to all");
    assert_eq!(
        from[0].pod_selector.as_ref().unwrap().match_labels,
        Some(Names::new("llm").selector_labels())
    );

    let secret = s.api::<Secret>().get("llm-token").await.unwrap();
    let token = secret.data.as_ref().unwrap()["token"].0.clone();
    assert_eq!(token.len(), 64);

    // Every child is controlled by the cluster, so garbage collection removes it.
    let owned_by_cluster = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        let refs = meta.owner_references.as_ref().expect("owner references");
        refs.len() == 1
            && refs[0].uid == uid
            && refs[0].controller == Some(true)
            && refs[0].kind == "InfiniteLLMCluster"
    };
    assert!(owned_by_cluster(&sts.metadata));
    assert!(owned_by_cluster(&peers.metadata));
    assert!(owned_by_cluster(&client_svc.metadata));
    assert!(owned_by_cluster(&pdb.metadata));
    assert!(owned_by_cluster(&np.metadata));
    assert!(owned_by_cluster(&secret.metadata));

    let token_text = String::from_utf8(token).unwrap();
    assert!(
        !s.operator.log().contains(&token_text),
        "the token leaked into the operator log"
    );
    assert!(all_of_type(&s.events("TokenGenerated").await, "Normal"));
}

#[tokio::test]
async fn ready_when_the_pods_are_ready() {
    let s = setup("ready").await;
    s.create(&crate::cluster("llm", 2)).await;
    let ilc = s.wait_phase("llm", Phase::Progressing).await;
    assert_eq!(ilc.status.unwrap().ready_replicas, 0);
    s.pods_ready("llm", 2).await;
    let ilc = s.wait_phase("llm", Phase::Ready).await;
    let status = ilc.status.unwrap();
    assert_eq!(status.ready_replicas, 2);
    assert_eq!(status.replicas, 2);
    assert_eq!(status.observed_generation, ilc.metadata.generation);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AllWorkersReady")
    );
    assert!(
        status.pool.is_none(),
        "pool totals stay unset until the gManager reports them"
    );
    let out =
        s.cp.kubectl(&["get", "ilc", "llm", "-n", &s.ns, "--no-headers"]);
    let row: Vec<String> = stdout(&out).split_whitespace().map(str::to_owned).collect();
    assert_eq!(&row[..4], ["llm", "Ready", "2", "2"], "{}", stderr(&out));
    assert!(all_of_type(&s.events("Ready").await, "Normal"));
}

#[tokio::test]
async fn kubectl_scale_changes_the_statefulset() {
    let s = setup("scale").await;
    s.create(&crate::cluster("llm", 1)).await;
    s.statefulset("llm").await;
    let out =
        s.cp.kubectl(&["scale", "-n", &s.ns, "ilc/llm", "--replicas=3"]);
    assert!(out.status.success(), "kubectl scale: {}", stderr(&out));
    let api = s.api::<StatefulSet>();
    eventually("the StatefulSet has 3 replicas", LIMIT, || async {
        let sts = api.get("llm").await.unwrap();
        (sts.spec.unwrap().replicas == Some(3)).then_some(())
    })
    .await;
    // The scale subresource reads back through status.replicas and status.selector.
    s.pods_ready("llm", 3).await;
    s.wait_phase("llm", Phase::Ready).await;
    let out = s.cp.kubectl(&[
        "get",
        "--raw",
        &format!(
            "/apis/infinitellm.io/v1alpha1/namespaces/{}/infinitellmclusters/llm/scale",
            s.ns
        ),
    ]);
    let scale: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["replicas"], 3);
    assert_eq!(
        scale["status"]["selector"],
        Names::new("llm").selector_string()
    );
    let scaled = s.events("Scaled").await;
    assert!(
        scaled
            .iter()
            .any(|e| e.note.as_deref() == Some("Scaling workers from 1 to 3"))
    );
}

#[tokio::test]
async fn deleting_the_cluster_collects_its_children() {
    let s = setup("delete").await;
    s.create(&crate::cluster("llm", 1)).await;
    s.statefulset("llm").await;
    s.pods_ready("llm", 1).await;
    s.wait_phase("llm", Phase::Ready).await;
    s.api::<InfiniteLLMCluster>()
        .delete("llm", &DeleteParams::foreground())
        .await
        .unwrap();
    let selector = Names::new("llm").selector_string();
    let kinds = [
        "statefulsets",
        "services",
        "secrets",
        "poddisruptionbudgets",
        "networkpolicies",
        "pods",
        "infinitellmclusters",
    ];
    eventually("garbage collection removed every child", LIMIT, || async {
        for kind in kinds {
            let out =
                s.cp.kubectl(&["get", kind, "-n", &s.ns, "-l", &selector, "-o", "name"]);
            assert!(out.status.success(), "{}", stderr(&out));
            if !stdout(&out).trim().is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(
        s.api::<InfiniteLLMCluster>()
            .get_opt("llm")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn editing_the_spec_rolls_the_statefulset() {
    let s = setup("rollout").await;
    s.create(&crate::cluster("llm", 2)).await;
    s.statefulset("llm").await;
    s.pods_ready("llm", 2).await;
    s.wait_phase("llm", Phase::Ready).await;
    let before = s.statefulset("llm").await;
    let revision = before
        .status
        .as_ref()
        .and_then(|st| st.update_revision.clone())
        .unwrap();

    let patch = serde_json::json!({"spec": {"kvCache": {"blockTokens": 32}}});
    s.api::<InfiniteLLMCluster>()
        .patch("llm", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let api = s.api::<StatefulSet>();
    let after = eventually("the StatefulSet runs a new revision", LIMIT, || async {
        let sts = api.get("llm").await.unwrap();
        let rev = sts
            .status
            .as_ref()
            .and_then(|st| st.update_revision.clone());
        (rev.is_some() && rev.as_deref() != Some(revision.as_str())).then_some(sts)
    })
    .await;
    assert_eq!(env_of(&after)["ILM_BLOCK_TOKENS"], "32");
    // The StatefulSet controller replaces Pods one by one (each drains through preStop).
    let ilc = s.wait_phase("llm", Phase::Progressing).await;
    let progressing = ilc
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(progressing.status, "True");
    assert!(all_of_type(&s.events("RollingUpdate").await, "Normal"));
}

#[tokio::test]
async fn a_second_reconcile_writes_nothing() {
    let s = setup("idle").await;
    s.create(&crate::cluster("llm", 2)).await;
    s.statefulset("llm").await;
    s.pods_ready("llm", 2).await;
    s.wait_phase("llm", Phase::Ready).await;

    // Let the watch events of the operator's own writes settle.
    let settle = std::time::Instant::now();
    let mut last = total_writes(&s.operator).await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = total_writes(&s.operator).await;
        if now == last {
            break;
        }
        last = now;
        assert!(settle.elapsed() < LIMIT, "the operator keeps writing");
    }
    let versions = resource_versions(&s).await;
    let writes_before = total_writes(&s.operator).await;
    let reconciles_before = s
        .operator
        .metric("infinite_llm_operator_reconciliations_total")
        .await;

    // Any change to the cluster object triggers a reconcile; this one changes nothing that
    // matters.
    let patch = serde_json::json!({"metadata": {"annotations": {"e2e/touch": "1"}}});
    s.api::<InfiniteLLMCluster>()
        .patch("llm", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("the operator reconciles again", LIMIT, || async {
        let n = s
            .operator
            .metric("infinite_llm_operator_reconciliations_total")
            .await;
        (n > reconciles_before).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        total_writes(&s.operator).await,
        writes_before,
        "the reconcile wrote something"
    );
    assert_eq!(resource_versions(&s).await, versions, "an object changed");
}

/// Sum of every `writes_total` sample.
async fn total_writes(op: &Operator) -> f64 {
    let text = op.metrics().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("infinite_llm_operator_writes_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Resource versions of every child and of the cluster's status-bearing fields.
async fn resource_versions(s: &Setup) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut push =
        |kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            out.push((
                format!("{kind}/{}", meta.name.clone().unwrap()),
                meta.resource_version.clone().unwrap(),
            ));
        };
    push(
        "StatefulSet",
        &s.api::<StatefulSet>().get("llm").await.unwrap().metadata,
    );
    for name in ["llm", "llm-peers"] {
        push(
            "Service",
            &s.api::<Service>().get(name).await.unwrap().metadata,
        );
    }
    push(
        "PodDisruptionBudget",
        &s.api::<PodDisruptionBudget>()
            .get("llm")
            .await
            .unwrap()
            .metadata,
    );
    push(
        "NetworkPolicy",
        &s.api::<NetworkPolicy>()
            .get("llm-peers")
            .await
            .unwrap()
            .metadata,
    );
    push(
        "Secret",
        &s.api::<Secret>().get("llm-token").await.unwrap().metadata,
    );
    let ilc = s.api::<InfiniteLLMCluster>().get("llm").await.unwrap();
    out.push((
        "InfiniteLLMCluster/status".to_owned(),
        serde_json::to_string(&ilc.status).unwrap(),
    ));
    out
}

#[tokio::test]
async fn a_crash_looping_worker_degrades_the_cluster() {
    let s = setup("degraded").await;
    s.create(&crate::cluster("llm", 2)).await;
    s.statefulset("llm").await;
    s.pods_ready("llm", 2).await;
    s.wait_phase("llm", Phase::Ready).await;

    // What the kubelet reports for a worker that keeps failing, say on a bad model path.
    let patch = serde_json::json!({"status": {
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{
            "name": "worker",
            "image": "ghcr.io/infinite-llm/worker:test",
            "imageID": "",
            "ready": false,
            "restartCount": 5,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 2m40s"}}
        }]
    }});
    s.api::<Pod>()
        .patch_status("llm-1", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    let ilc = s.wait_phase("llm", Phase::Degraded).await;
    let status = ilc.status.unwrap();
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    // The reason and the kubelet's message, so `kubectl get` shows why.
    assert_eq!(degraded.message, "llm-1: CrashLoopBackOff: back-off 2m40s");
    let warnings = s.events("WorkersFailing").await;
    assert!(all_of_type(&warnings, "Warning"));
    assert!(
        warnings
            .iter()
            .any(|e| e.note.as_deref() == Some("llm-1: CrashLoopBackOff: back-off 2m40s"))
    );
}

/// Figures a fake worker reports: total, own, lent and borrowed blocks.
fn figures(total: u64, used: u64, lent: u64, borrowed: u64) -> PoolFigures {
    PoolFigures {
        total_blocks: total,
        used_blocks: used,
        lent_blocks: lent,
        borrowed_blocks: borrowed,
        lend_cap_blocks: total / 2,
        ..PoolFigures::default()
    }
}

#[tokio::test]
async fn status_reports_the_pool_the_workers_heartbeat() {
    let s = setup("pool").await;
    s.create(&crate::cluster("llm", 2)).await;
    let secrets = s.api::<Secret>();
    let token = eventually("the token Secret exists", LIMIT, || async {
        let secret = secrets.get_opt("llm-token").await.unwrap()?;
        String::from_utf8(secret.data?.get("token")?.0.clone()).ok()
    })
    .await;
    let base = format!("http://{}", s.operator.gmanager_addr);
    let http = reqwest::Client::new();
    // The worker Pods run here, on loopback: that is the address they register from.
    s.pods_ready("llm", 2).await;
    for id in ["llm-0", "llm-1"] {
        let ip =
            serde_json::json!({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}});
        s.api::<Pod>()
            .patch_status(id, &PatchParams::default(), &Patch::Merge(&ip))
            .await
            .unwrap();
    }
    let register = |id: &str| Register {
        worker_id: id.to_owned(),
        api_url: "http://127.0.0.1:8000".to_owned(),
        peer_addr: "127.0.0.1:8101".to_owned(),
        block_tokens: 16,
        pool: figures(100, 0, 0, 0),
    };

    // A holder of the token cannot register a worker that is not one of the cluster's pods,
    // nor a pod under an address other than its own.
    let mut elsewhere = register("llm-0");
    elsewhere.peer_addr = "10.9.9.9:8101".to_owned();
    for body in [register("llm-7"), elsewhere] {
        let r = http
            .post(format!("{base}/v1/workers"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            reqwest::StatusCode::FORBIDDEN,
            "{:?}",
            body.worker_id
        );
    }

    // Workers register with the token their Secret holds, as a worker Pod would.
    for id in ["llm-0", "llm-1"] {
        let body = register(id);
        eventually(
            &format!("{id} registers with the gManager"),
            LIMIT,
            || async {
                let r = http
                    .post(format!("{base}/v1/workers"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .ok()?;
                assert_ne!(
                    r.status(),
                    reqwest::StatusCode::UNAUTHORIZED,
                    "token refused"
                );
                r.status().is_success().then_some(())
            },
        )
        .await;
    }
    // Heartbeats keep both workers alive and carry the figures status must show.
    let beating = |id: &'static str, pool: PoolFigures| {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let _ = http
                    .post(format!("{base}/v1/workers/{id}/heartbeat"))
                    .bearer_auth(&token)
                    .json(&Heartbeat { epoch: 0, pool })
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let w0 = beating("llm-0", figures(100, 30, 10, 0));
    let w1 = beating("llm-1", figures(100, 20, 0, 10));

    let api = s.api::<InfiniteLLMCluster>();
    let pool_of = |ilc: InfiniteLLMCluster| {
        let status = ilc.status?;
        Some((status.pool?, status.membership_epoch?))
    };
    let expected = PoolStatus {
        workers: 2,
        total_blocks: 200,
        used_blocks: 50,
        lent_blocks: 10,
        borrowed_blocks: 10,
        used_percent: 30,
    };
    eventually("status shows the summed heartbeats", LIMIT, || async {
        let (pool, epoch) = pool_of(api.get("llm").await.unwrap())?;
        (pool == expected && epoch == 2).then_some(())
    })
    .await;
    let out = s.cp.kubectl(&["get", "ilc", "llm", "-n", &s.ns]);
    let text = stdout(&out);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.contains("POOL USED %"), "{text}{}", stderr(&out));
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row.get(4), Some(&"30"), "{text}");

    // A worker leaving is a new epoch and takes its figures out of the totals.
    w1.abort();
    let r = http
        .delete(format!("{base}/v1/workers/llm-1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "leave: {}", r.status());
    let expected = PoolStatus {
        workers: 1,
        total_blocks: 100,
        used_blocks: 30,
        lent_blocks: 10,
        borrowed_blocks: 0,
        used_percent: 40,
    };
    eventually(
        "status shows the pool without the worker that left",
        LIMIT,
        || async {
            let (pool, epoch) = pool_of(api.get("llm").await.unwrap())?;
            (pool == expected && epoch == 3).then_some(())
        },
    )
    .await;
    w0.abort();

    // Once the cluster is deleted, its token opens nothing.
    api.delete("llm", &Default::default()).await.unwrap();
    eventually("the deleted cluster's token is refused", LIMIT, || async {
        let r = http
            .get(format!("{base}/v1/pool"))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?;
        (r.status() == reqwest::StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
}
