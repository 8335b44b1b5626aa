//! Autoscaling against the real control plane: the HPA the operator owns follows
//! `spec.autoscaling`; the external metrics API, registered with the chart's APIService,
//! certificate and RBAC, serves the pool figures that fake workers heartbeat, through the
//! API server's aggregation layer; and the real HPA controller scales the cluster's workers
//! up when the pool is above target and back down when it is not.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use infinite_llm_operator::crd::InfiniteLLMCluster;
use infinite_llm_operator::names::Names;
use infinite_llm_protocol::gmanager::{Heartbeat, PoolFigures, Register};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

use crate::harness::{self, ControlPlane, Operator, eventually, shared, stderr, stdout};
use crate::helm::{kubectl_apply, render};

const LIMIT: Duration = Duration::from_secs(90);
const API_SERVICE: &str = "v1beta1.external.metrics.k8s.io";

/// A cluster spec the harness can run: no PriorityClass to look up.
fn cluster_json(name: &str, replicas: i32, autoscaling: serde_json::Value) -> serde_json::Value {
    let mut ilc = crate::cluster_json(name, replicas);
    let workers = ilc["spec"]["workers"].as_object_mut().unwrap();
    workers.remove("priorityClassName");
    workers.insert("terminationGracePeriodSeconds".into(), 30.into());
    ilc["spec"]["autoscaling"] = autoscaling;
    ilc
}

async fn create(client: &Client, ns: &str, ilc: serde_json::Value) {
    let ilc: InfiniteLLMCluster = serde_json::from_value(ilc).unwrap();
    Api::<InfiniteLLMCluster>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ilc)
        .await
        .unwrap();
}

async fn merge_spec(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    Api::<InfiniteLLMCluster>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": spec})),
        )
        .await
        .unwrap();
}

async fn desired_workers(client: &Client, ns: &str, name: &str) -> i32 {
    Api::<InfiniteLLMCluster>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
        .spec
        .workers
        .replicas
}

/// Waits for an Event with this reason and returns its note.
async fn event_note(client: &Client, ns: &str, reason: &str, containing: &str) -> String {
    let api = Api::<Event>::namespaced(client.clone(), ns);
    eventually(&format!("a {reason} event"), LIMIT, || async {
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter_map(|e| e.note)
            .find(|n| n.contains(containing))
    })
    .await
}

/// `kubectl scale` as a user would type it.
fn kubectl_scale(cp: &ControlPlane, ns: &str, name: &str, replicas: i32) {
    let out = cp.kubectl(&[
        "scale",
        "-n",
        ns,
        &format!("ilc/{name}"),
        &format!("--replicas={replicas}"),
    ]);
    assert!(out.status.success(), "kubectl scale: {}", stderr(&out));
}

/// The HPA follows `spec.autoscaling` (created, updated, deleted), the real HPA controller
/// holds the worker count within its bounds, and without the block `kubectl scale` is the
/// user's.
#[tokio::test]
async fn the_hpa_follows_spec_autoscaling() {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, "autoscale-spec").await;
    let op = Operator::start(cp, &cp.kubeconfig, &ns, "op", &[]);
    create(
        &client,
        &ns,
        cluster_json(
            "llm",
            1,
            serde_json::json!({"minReplicas": 1, "maxReplicas": 3}),
        ),
    )
    .await;
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns);
    let hpa = eventually("the operator creates the HPA", LIMIT, || async {
        hpas.get_opt("llm").await.unwrap()
    })
    .await;
    let ilc = Api::<InfiniteLLMCluster>::namespaced(client.clone(), &ns)
        .get("llm")
        .await
        .unwrap();
    let owner = &hpa.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        (
            "InfiniteLLMCluster",
            ilc.uid().unwrap().as_str(),
            Some(true)
        )
    );
    let spec = hpa.spec;
    assert_eq!(spec.scale_target_ref.kind, "InfiniteLLMCluster");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(1), 3));
    let target = |spec: &k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerSpec| {
        let ext = spec.metrics.as_ref().unwrap()[0].external.clone().unwrap();
        (ext.metric.name, ext.target.value.unwrap().0)
    };
    assert_eq!(
        target(&spec),
        ("ilm_pool_used_percent".to_owned(), "80".to_owned())
    );
    let scale_down = spec.behavior.unwrap().scale_down.unwrap();
    assert_eq!(scale_down.stabilization_window_seconds, Some(300));
    assert_eq!(scale_down.policies.unwrap()[0].period_seconds, 30);
    event_note(&client, &ns, "AutoscalerCreated", "1 to 3 workers").await;

    // The real HPA controller owns the count now: a scale above the bounds is undone.
    kubectl_scale(cp, &ns, "llm", 5);
    eventually("the HPA brings the workers back to 3", LIMIT, || async {
        (desired_workers(&client, &ns, "llm").await == 3).then_some(())
    })
    .await;

    // Editing the block edits the HPA.
    merge_spec(
        &client,
        &ns,
        "llm",
        serde_json::json!({"autoscaling": {
            "maxReplicas": 4, "targetPoolUtilizationPercent": 60,
            "targetWaitingRequestsPerWorker": 2, "scaleDownStabilizationSeconds": 120
        }}),
    )
    .await;
    let spec = eventually("the HPA follows the edit", LIMIT, || async {
        let spec = hpas.get("llm").await.unwrap().spec;
        (spec.max_replicas == 4).then_some(spec)
    })
    .await;
    assert_eq!(
        target(&spec),
        ("ilm_pool_used_percent".to_owned(), "60".to_owned())
    );
    let waiting = spec.metrics.as_ref().unwrap()[1].external.clone().unwrap();
    assert_eq!(waiting.metric.name, "ilm_requests_waiting");
    assert_eq!(waiting.target.average_value.unwrap().0, "2");
    assert_eq!(
        spec.behavior
            .unwrap()
            .scale_down
            .unwrap()
            .stabilization_window_seconds,
        Some(120)
    );
    event_note(&client, &ns, "AutoscalerUpdated", "1 to 4 workers").await;

    // Removing the block removes the HPA, and the count is the user's again.
    merge_spec(
        &client,
        &ns,
        "llm",
        serde_json::json!({"autoscaling": null}),
    )
    .await;
    eventually("the HPA is deleted", LIMIT, || async {
        hpas.get_opt("llm").await.unwrap().is_none().then_some(())
    })
    .await;
    event_note(
        &client,
        &ns,
        "AutoscalerDeleted",
        "spec.autoscaling is gone",
    )
    .await;
    kubectl_scale(cp, &ns, "llm", 5);
    let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    eventually("the StatefulSet follows kubectl scale", LIMIT, || async {
        let replicas = sts.get("llm").await.unwrap().spec?.replicas?;
        (replicas == 5).then_some(())
    })
    .await;
    // Two HPA periods later nothing has scaled it back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(desired_workers(&client, &ns, "llm").await, 5);
    let log = op.log();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");
}

/// Deletes the cluster-wide APIService when the test ends, passed or not, so that no other
/// test meets an unavailable API group.
struct ApiServiceGuard(&'static ControlPlane);

impl Drop for ApiServiceGuard {
    fn drop(&mut self) {
        self.0
            .kubectl(&["delete", "apiservice", API_SERVICE, "--ignore-not-found"]);
    }
}

/// A worker that heartbeats the figures the test sets, as a worker Pod would.
struct FakeWorker {
    figures: Arc<Mutex<PoolFigures>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeWorker {
    async fn join(gmanager: &str, token: &str, id: &str, figures: PoolFigures) -> FakeWorker {
        let http = reqwest::Client::new();
        let body = Register {
            worker_id: id.to_owned(),
            api_url: "http://127.0.0.1:8000".to_owned(),
            peer_addr: "127.0.0.1:8101".to_owned(),
            block_tokens: 16,
            pool: figures,
        };
        eventually(&format!("{id} registers"), LIMIT, || async {
            let r = http
                .post(format!("{gmanager}/v1/workers"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        let figures = Arc::new(Mutex::new(figures));
        let (shared, url, token) = (
            figures.clone(),
            format!("{gmanager}/v1/workers/{id}/heartbeat"),
            token.to_owned(),
        );
        let task = tokio::spawn(async move {
            loop {
                let pool = *shared.lock().unwrap();
                let _ = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&Heartbeat { epoch: 0, pool })
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        FakeWorker { figures, task }
    }

    fn report(&self, figures: PoolFigures) {
        *self.figures.lock().unwrap() = figures;
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn figures(total: u64, used: u64, borrowed: u64, waiting: u64) -> PoolFigures {
    PoolFigures {
        total_blocks: total,
        used_blocks: used,
        borrowed_blocks: borrowed,
        waiting_requests: waiting,
        lend_cap_blocks: total / 2,
        ..PoolFigures::default()
    }
}

/// `kubectl get --raw` of one metric of the cluster `llm`: its value, or kubectl's error.
fn raw_value(
    cp: &ControlPlane,
    kubeconfig: Option<&str>,
    ns: &str,
    metric: &str,
) -> Result<String, String> {
    let path = format!(
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}?labelSelector=infinitellm.io%2Fcluster%3Dllm"
    );
    let out = match kubeconfig {
        Some(file) => std::process::Command::new(&cp.kubectl)
            .args([&format!("--kubeconfig={file}"), "get", "--raw", &path])
            .output()
            .unwrap(),
        None => cp.kubectl(&["get", "--raw", &path]),
    };
    if !out.status.success() {
        return Err(stderr(&out));
    }
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).map_err(|e| e.to_string())?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    match items.as_slice() {
        [item] => {
            assert_eq!(item["metricLabels"]["infinitellm.io/cluster"], "llm");
            Ok(item["value"].as_str().unwrap_or_default().to_owned())
        }
        _ => Err(format!("{} items: {list}", items.len())),
    }
}

/// The figures through `kubectl get --raw` and the aggregation layer; who may read them;
/// the real HPA controller scaling the cluster on them, up and back down.
#[tokio::test]
async fn the_external_metrics_api_drives_the_hpa() {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, "autoscale-metrics").await;
    let (release, fullname) = ("autoscale", "autoscale-operator");
    let service = format!("{fullname}-metrics-api");
    let api_port = harness::free_port();

    // The chart's ServiceAccount, RBAC and metrics API objects. No kubelet or kube-proxy
    // runs here, so the Service becomes an ExternalName to this machine, where the
    // operator process listens (the aggregator resolves ExternalName Services itself).
    let mut objects = render(
        cp,
        release,
        &ns,
        &[
            "--set",
            &format!("watchNamespace={ns}"),
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
            "--show-only",
            "templates/metrics-api.yaml",
        ],
    );
    let _guard = ApiServiceGuard(cp);
    let mut tls: Option<Secret> = None;
    for o in &mut objects {
        match o["kind"].as_str() {
            Some("Service") if o["metadata"]["name"] == service.as_str() => {
                o["spec"] =
                    serde_json::json!({"type": "ExternalName", "externalName": "localhost"});
            }
            Some("APIService") => o["spec"]["service"]["port"] = api_port.into(),
            Some("Secret") => tls = Some(serde_json::from_value(o.clone()).unwrap()),
            _ => {}
        }
    }
    for kind in ["APIService", "ClusterRoleBinding", "RoleBinding", "Secret"] {
        assert!(
            objects.iter().any(|o| o["kind"] == kind),
            "the chart renders no {kind} for the metrics API"
        );
    }
    kubectl_apply(cp, &objects, &["--server-side", "--force-conflicts"]);
    let data = tls.unwrap().data.unwrap();
    let (cert, key, ca) = (
        cp.path("metrics-api.crt"),
        cp.path("metrics-api.key"),
        cp.path("metrics-api-ca.crt"),
    );
    std::fs::write(&cert, &data["tls.crt"].0).unwrap();
    std::fs::write(&key, &data["tls.key"].0).unwrap();
    std::fs::write(&ca, &data["ca.crt"].0).unwrap();

    // The operator as the chart runs it: its ServiceAccount and the certificate it mounts.
    let token = harness::service_account_token(&client, &ns, fullname).await;
    let kubeconfig = cp.token_kubeconfig(fullname, &token);
    let lease = [
        format!("--lease-name={fullname}"),
        format!("--metrics-api-cert-file={}", cert.display()),
        format!("--metrics-api-key-file={}", key.display()),
    ];
    let args = |port: u16| {
        let mut args: Vec<String> = lease.to_vec();
        args.push(format!("--metrics-api-addr=127.0.0.1:{port}"));
        args
    };
    let leader_args = args(api_port);
    let leader_args: Vec<&str> = leader_args.iter().map(String::as_str).collect();
    let op = Operator::start(cp, &kubeconfig, &ns, "leader", &leader_args);
    eventually("the operator leads", LIMIT, || async {
        (op.metric("infinite_llm_operator_leader").await == 1.0).then_some(())
    })
    .await;
    // A standby has no figures and does not listen.
    let standby_port = harness::free_port();
    let standby_args = args(standby_port);
    let standby_args: Vec<&str> = standby_args.iter().map(String::as_str).collect();
    let standby = Operator::start(cp, &kubeconfig, &ns, "standby", &standby_args);
    eventually("the standby is up", LIMIT, || async {
        standby.metrics().await.map(|_| ())
    })
    .await;

    eventually("the APIService is Available", LIMIT, || async {
        let out = cp.kubectl(&[
            "get",
            "apiservice",
            API_SERVICE,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
        ]);
        (stdout(&out) == "True").then_some(())
    })
    .await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", standby_port)).is_err(),
        "the standby serves the metrics API"
    );

    create(
        &client,
        &ns,
        cluster_json(
            "llm",
            1,
            serde_json::json!({
                "minReplicas": 1, "maxReplicas": 2, "targetPoolUtilizationPercent": 50,
                "scaleDownStabilizationSeconds": 0
            }),
        ),
    )
    .await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let cluster_token = eventually("the token Secret exists", LIMIT, || async {
        let secret = secrets.get_opt("llm-token").await.unwrap()?;
        String::from_utf8(secret.data?.get("token")?.0.clone()).ok()
    })
    .await;
    // Stand in for the kubelet: every worker Pod the StatefulSet makes turns Ready.
    let kubelet = {
        let (client, ns) = (client.clone(), ns.clone());
        tokio::spawn(async move {
            let selector = Names::new("llm").selector_string();
            loop {
                harness::mark_pods_ready(&client, &ns, &selector).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let gmanager = format!("http://{}", op.gmanager_addr);
    let w0 = FakeWorker::join(&gmanager, &cluster_token, "llm-0", figures(100, 10, 0, 0)).await;

    // The figures through the aggregation layer, and when load comes they follow it.
    let value = |metric: &'static str| {
        let ns = ns.clone();
        move || {
            let ns = ns.clone();
            async move { raw_value(cp, None, &ns, metric).ok() }
        }
    };
    let first = eventually(
        "the pool use is served",
        LIMIT,
        value("ilm_pool_used_percent"),
    )
    .await;
    assert_eq!(first, "10");
    w0.report(figures(100, 90, 7, 3));
    eventually("the pool use follows the load", LIMIT, || async {
        (raw_value(cp, None, &ns, "ilm_pool_used_percent").ok()? == "90").then_some(())
    })
    .await;
    assert_eq!(
        raw_value(cp, None, &ns, "ilm_requests_waiting").unwrap(),
        "3"
    );
    assert_eq!(
        raw_value(cp, None, &ns, "ilm_kv_blocks_borrowed").unwrap(),
        "7"
    );
    let out = cp.kubectl(&[
        "get",
        "--raw",
        &format!("/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/cpu"),
    ]);
    assert!(
        !out.status.success() && stderr(&out).contains("no external metric cpu"),
        "{}",
        stderr(&out)
    );

    // Only callers RBAC lets list the metric read it: through the aggregator (the API server
    // refuses them before proxying) and with a bearer token sent straight to the operator
    // (its own TokenReview and SubjectAccessReview).
    let nobody = harness::service_account_token(&client, &ns, "nobody").await;
    let nobody_config = cp.token_kubeconfig("nobody", &nobody);
    let denied = raw_value(
        cp,
        Some(nobody_config.to_str().unwrap()),
        &ns,
        "ilm_pool_used_percent",
    )
    .unwrap_err();
    assert!(denied.contains("Forbidden"), "{denied}");
    let reader = harness::service_account_token(&client, &ns, "reader").await;
    let role = serde_json::json!([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "metrics-reader", "namespace": ns},
         "rules": [{"apiGroups": ["external.metrics.k8s.io"], "resources": ["ilm_pool_used_percent"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "metrics-reader", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "metrics-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]},
    ]);
    kubectl_apply(cp, role.as_array().unwrap(), &[]);
    let direct = |name: &str, token: &str| {
        let path = cp.path(&format!("{name}-direct.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: op\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    certificate-authority: {}\n    tls-server-name: {service}.{ns}.svc\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: op\n  context:\n    cluster: op\n    user: u\ncurrent-context: op\n",
                ca.display()
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    };
    assert_eq!(
        raw_value(
            cp,
            Some(&direct("reader", &reader)),
            &ns,
            "ilm_pool_used_percent"
        )
        .unwrap(),
        "90"
    );
    let denied = raw_value(
        cp,
        Some(&direct("nobody", &nobody)),
        &ns,
        "ilm_pool_used_percent",
    )
    .unwrap_err();
    assert!(denied.contains("may not list"), "{denied}");
    let refused = raw_value(
        cp,
        Some(&direct("forged", "not-a-token")),
        &ns,
        "ilm_pool_used_percent",
    )
    .unwrap_err();
    assert!(refused.contains("Unauthorized"), "{refused}");

    // 90% of the pool against a 50% target: the HPA asks for ceil(1 x 90 / 50) = 2 workers.
    eventually("the HPA scales the cluster up to 2", LIMIT, || async {
        (desired_workers(&client, &ns, "llm").await == 2).then_some(())
    })
    .await;
    let out = cp.kubectl(&["get", "ilc", "llm", "-n", &ns]);
    let row: Vec<String> = stdout(&out)
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        row.get(3).map(String::as_str),
        Some("2"),
        "kubectl get ilc: {}",
        stdout(&out)
    );
    let note = event_note(&client, &ns, "Autoscaled", "from 1 to 2").await;
    assert!(note.contains("ilm_pool_used_percent"), "{note}");
    let ilcs = Api::<InfiniteLLMCluster>::namespaced(client.clone(), &ns);
    eventually(
        "the HPA's conditions show in the cluster's",
        LIMIT,
        || async {
            let status = ilcs.get("llm").await.unwrap().status?;
            let able = status
                .conditions
                .iter()
                .find(|c| c.type_ == "AutoscalerAbleToScale")?;
            let active = status
                .conditions
                .iter()
                .find(|c| c.type_ == "AutoscalerScalingActive")?;
            (able.status == "True" && active.status == "True").then_some(())
        },
    )
    .await;

    // The new worker joins; the load stops: 20 of 200 blocks, 10% against 50%.
    let w1 = FakeWorker::join(&gmanager, &cluster_token, "llm-1", figures(100, 10, 0, 0)).await;
    w0.report(figures(100, 10, 0, 0));
    eventually("the HPA scales the cluster back to 1", LIMIT, || async {
        (desired_workers(&client, &ns, "llm").await == 1).then_some(())
    })
    .await;
    drop((w0, w1));
    kubelet.abort();
    let log = op.log();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");
    drop(standby);
}
