//! The Helm chart as a platform team meets it: it lints, what it renders passes the API
//! server's own validation, it installs and uninstalls (keeping the CRD and the clusters),
//! bad values are refused at install, and its RBAC is enough for the operator with no rule
//! to spare.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use infinite_llm_operator::crd::InfiniteLLMCluster;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde::Deserialize;

use crate::harness::{self, ControlPlane, Operator, eventually, shared, stderr, stdout};

const CHART: &str = "charts/infinite-llm";
const CRD_NAME: &str = "infinitellmclusters.infinitellm.io";
const LIMIT: Duration = Duration::from_secs(60);

fn chart() -> String {
    harness::workspace_root()
        .join(CHART)
        .to_str()
        .unwrap()
        .to_owned()
}

/// Every values file under the chart's ci/, the extra configurations lint must accept.
fn ci_values() -> Vec<PathBuf> {
    let dir = harness::workspace_root().join(CHART).join("ci");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no values files in {}", dir.display());
    files
}

/// The objects of a multi-document YAML stream, empty documents left out.
fn documents(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_json::Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `helm template` of the chart; panics with Helm's message when it fails.
pub fn render(
    cp: &ControlPlane,
    release: &str,
    ns: &str,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let chart = chart();
    let mut args = vec!["template", release, chart.as_str(), "--namespace", ns];
    args.extend_from_slice(extra);
    let out = cp.helm(&args);
    assert!(out.status.success(), "helm {args:?}: {}", stderr(&out));
    documents(&stdout(&out))
}

pub fn kubectl_apply(cp: &ControlPlane, objects: &[serde_json::Value], extra: &[&str]) -> String {
    // A stream of JSON objects rather than a v1 List, which kubectl validates client-side
    // even with --server-side, and the CRD's nullable enums fail that.
    let stream: Vec<String> = objects.iter().map(|o| o.to_string()).collect();
    let stream = stream.join("\n");
    let mut args = vec!["apply", "-f", "-"];
    args.extend_from_slice(extra);
    let out = cp.kubectl_stdin(&args, &stream);
    assert!(out.status.success(), "kubectl {args:?}: {}", stderr(&out));
    stdout(&out)
}

#[test]
fn chart_lints_clean_with_default_and_ci_values() {
    let cp = shared();
    let chart = chart();
    let mut runs = vec![None];
    runs.extend(ci_values().into_iter().map(Some));
    for values in runs {
        let file = values.as_ref().map(|p| p.to_str().unwrap().to_owned());
        let mut args = vec!["lint", "--strict", chart.as_str()];
        if let Some(file) = &file {
            args.extend(["--values", file.as_str()]);
        }
        let out = cp.helm(&args);
        assert!(
            out.status.success() && stdout(&out).contains("0 chart(s) failed"),
            "helm {args:?}:\n{}{}",
            stdout(&out),
            stderr(&out)
        );
    }
}

/// Everything the chart renders, with default and ci values, passes the API server's
/// validation (`kubectl apply --server-side --dry-run=server`), the CRD included.
#[tokio::test]
async fn rendered_chart_is_accepted_by_the_api_server() {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, "helm-render").await;
    // Named by ci/watch-namespace-values.yaml.
    harness::namespace(&client, "ilm-ci-watched").await;
    let mut runs = vec![None];
    runs.extend(ci_values().into_iter().map(Some));
    let mut service_monitors = 0;
    for values in runs {
        let file = values.as_ref().map(|p| p.to_str().unwrap().to_owned());
        let extra: Vec<&str> = file.iter().flat_map(|f| ["--values", f.as_str()]).collect();
        let mut objects = render(cp, "ilm-render", &ns, &extra);
        // This control plane has no Prometheus Operator, so no ServiceMonitor kind.
        let before = objects.len();
        objects.retain(|o| o["kind"] != "ServiceMonitor");
        service_monitors += before - objects.len();
        for kind in [
            "Deployment",
            "Service",
            "ServiceAccount",
            "Role",
            "RoleBinding",
        ] {
            assert!(
                objects.iter().any(|o| o["kind"] == kind),
                "{file:?}: no {kind} rendered"
            );
        }
        // Server-side, as the CRD is applied (README); forced, as the release of another
        // test owns some of the same fields. Namespaced objects name their namespace.
        let out = kubectl_apply(
            cp,
            &objects,
            &["--server-side", "--force-conflicts", "--dry-run=server"],
        );
        assert_eq!(
            out.lines()
                .filter(|l| l.ends_with("(server dry run)"))
                .count(),
            objects.len(),
            "{file:?}: {out}"
        );
    }
    assert_eq!(
        service_monitors, 1,
        "ci/ has one values file with the ServiceMonitor on"
    );
}

/// The chart's CRD is the generated one: the same spec as crds/, kept on uninstall.
#[test]
fn chart_crd_is_the_generated_crd() {
    let cp = shared();
    let rendered = render(cp, "ilm", "default", &["--show-only", "templates/crd.yaml"]);
    let file = harness::workspace_root()
        .join("crds")
        .join(format!("{CRD_NAME}.yaml"));
    let generated: serde_json::Value =
        serde_yaml::from_str(&fs::read_to_string(file).unwrap()).unwrap();
    assert_eq!(rendered.len(), 1);
    assert_eq!(rendered[0]["spec"], generated["spec"]);
    assert_eq!(
        rendered[0]["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let out = cp.helm(&["template", "ilm", &chart(), "--set", "crds.enabled=false"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stdout(&out).contains("kind: CustomResourceDefinition"),
        "crds.enabled=false still renders the CRD"
    );
}

/// One way to break the values, and what `helm install` must say about it.
struct BadValues {
    set: &'static str,
    message: &'static str,
}

#[test]
fn values_that_break_the_schema_fail_install_with_a_message() {
    let cp = shared();
    let chart = chart();
    let cases = [
        BadValues {
            set: "replicaCount=-1",
            message: "at '/replicaCount': minimum: got -1, want 1",
        },
        BadValues {
            set: "replicaCount=two",
            message: "at '/replicaCount': got string, want integer",
        },
        BadValues {
            set: "replicaSet=2",
            message: "additional properties 'replicaSet' not allowed",
        },
        BadValues {
            set: "resources.request.cpu=1",
            message: "at '/resources': additional properties 'request' not allowed",
        },
        BadValues {
            set: "crds.enabled=yes",
            message: "at '/crds/enabled': got string, want boolean",
        },
        BadValues {
            set: "image.pullPolicy=Sometimes",
            message: "at '/image/pullPolicy': value must be one of",
        },
        BadValues {
            set: "service.gmanagerPort=70000",
            message: "at '/service/gmanagerPort': maximum",
        },
        BadValues {
            set: "logFormat=xml",
            message: "at '/logFormat': value must be one of 'text', 'json'",
        },
        BadValues {
            set: "watchNamespace=Not_A_Namespace",
            message: "at '/watchNamespace'",
        },
        BadValues {
            set: "leaderElection.renewGrace=30",
            message: "leaderElection.renewGrace must be below leaderElection.leaseDuration",
        },
    ];
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let release = format!("bad-{i}");
        let out = cp.helm(&[
            "install",
            &release,
            &chart,
            "--namespace",
            "helm-bad",
            "--create-namespace",
            "--set",
            case.set,
        ]);
        if out.status.success() {
            failures.push(format!("{}: installed", case.set));
            cp.helm(&["uninstall", &release, "--namespace", "helm-bad"]);
        } else if !stderr(&out).contains(case.message) {
            failures.push(format!(
                "{}: expected {:?} in\n{}",
                case.set,
                case.message,
                stderr(&out)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let out = cp.helm(&["list", "--namespace", "helm-bad", "--all", "--short"]);
    assert_eq!(stdout(&out), "", "refused installs left releases behind");
}

/// Lets a release adopt the CRD the harness applied with kubectl, the documented path from
/// `kubectl apply -f crds/` to the chart.
fn adopt_crd(cp: &ControlPlane, release: &str, ns: &str) {
    let crd = format!("crd/{CRD_NAME}");
    let out = cp.kubectl(&[
        "label",
        "--overwrite",
        &crd,
        "app.kubernetes.io/managed-by=Helm",
    ]);
    assert!(out.status.success(), "kubectl label: {}", stderr(&out));
    let out = cp.kubectl(&[
        "annotate",
        "--overwrite",
        &crd,
        &format!("meta.helm.sh/release-name={release}"),
        &format!("meta.helm.sh/release-namespace={ns}"),
    ]);
    assert!(out.status.success(), "kubectl annotate: {}", stderr(&out));
}

#[tokio::test]
async fn helm_install_runs_the_operator_and_uninstall_keeps_the_clusters() {
    let cp = shared();
    let client = cp.client().await;
    let (release, release_ns) = ("ilm", "ilm-helm");
    let fullname = format!("{release}-operator");
    let chart = chart();
    adopt_crd(cp, release, release_ns);
    // The APIService of the metrics API is cluster-wide, and the autoscale tests own it on
    // this control plane (autoscale.rs checks the chart's).
    let out = cp.helm(&[
        "install",
        release,
        &chart,
        "--namespace",
        release_ns,
        "--create-namespace",
        "--set",
        "metricsApi.enabled=false",
    ]);
    assert!(out.status.success(), "helm install: {}", stderr(&out));
    assert!(
        stdout(&out).contains("kubectl apply -f examples/cpu-small.yaml"),
        "NOTES tell what to apply next:\n{}",
        stdout(&out)
    );

    // What the Deployment promises: two replicas, non-root, read-only root, probes.
    let deployment = Api::<Deployment>::namespaced(client.clone(), release_ns)
        .get(&fullname)
        .await
        .unwrap();
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod_labels = spec.template.metadata.and_then(|m| m.labels);
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(fullname.as_str()));
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    let container = &pod.containers[0];
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert!(container.readiness_probe.is_some() && container.liveness_probe.is_some());
    assert!(container.resources.as_ref().unwrap().requests.is_some());

    // The operator binary, with the chart's ServiceAccount and nothing else, and the
    // environment of the chart's Deployment, reconciles an example from examples/. Flags
    // only narrow it to the example's namespace and pick free ports.
    let env: Vec<(String, String)> = container
        .env
        .iter()
        .flatten()
        .map(|var| {
            let field = var
                .value_from
                .as_ref()
                .and_then(|from| from.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            let value = match field {
                Some("metadata.namespace") => release_ns.to_owned(),
                Some("metadata.name") => "chart".to_owned(),
                Some(path) => panic!("{}: no stand-in for {path}", var.name),
                None => var.value.clone().unwrap_or_default(),
            };
            (var.name.clone(), value)
        })
        .collect();
    // The replica's own Pod, which no kubelet runs here: the leader labels it, and the
    // gManager Service selects it by that label.
    let stand_in: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "chart", "labels": pod_labels},
        "spec": {"containers": [{"name": "operator", "image": container.image}]},
    }))
    .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), release_ns);
    pods.create(&PostParams::default(), &stand_in)
        .await
        .unwrap();
    let ns = harness::namespace(&client, "helm-example").await;
    let example = harness::workspace_root().join("examples/cpu-small.yaml");
    let out = cp.kubectl(&["apply", "-n", &ns, "-f", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = harness::service_account_token(&client, release_ns, &fullname).await;
    let kubeconfig = cp.token_kubeconfig("chart-sa", &token);
    let mut op = Operator::start_with_env(
        cp,
        &kubeconfig,
        &ns,
        "chart",
        &[&format!("--lease-namespace={release_ns}")],
        &env,
    );
    let clusters = Api::<InfiniteLLMCluster>::namespaced(client.clone(), &ns);
    let reconciled = eventually(
        "the example is reconciled under the chart's RBAC",
        2 * LIMIT,
        || async {
            let ilc = clusters.get("tiny-llama").await.unwrap();
            (ilc.status.and_then(|s| s.observed_generation) == ilc.metadata.generation)
                .then_some(())
        },
    );
    if tokio::time::timeout(LIMIT, reconciled).await.is_err() {
        panic!(
            "the example was not reconciled under the chart's RBAC; operator log:\n{}",
            op.log()
        );
    }
    let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .get("tiny-llama")
        .await
        .unwrap();
    let sts = sts.spec.unwrap();
    assert_eq!(sts.replicas, Some(3));
    // Workers are told the chart's Service as their gManager, and the lease is the chart's.
    let worker = &sts.template.spec.unwrap().containers[0];
    let gmanager_url = worker
        .env
        .iter()
        .flatten()
        .find(|v| v.name == "ILM_GMANAGER_URL")
        .and_then(|v| v.value.clone());
    assert_eq!(
        gmanager_url.as_deref(),
        Some(format!("http://{fullname}-gmanager.{release_ns}.svc:8001").as_str())
    );
    let lease = Api::<Lease>::namespaced(client.clone(), release_ns)
        .get(&fullname)
        .await
        .unwrap();
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("chart")
    );
    let leader = eventually("the leader labels its Pod", LIMIT, || async {
        let labels = pods.get("chart").await.unwrap().metadata.labels?;
        let value = labels.get("infinitellm.io/leader")?.clone();
        (value == "true").then_some(labels)
    })
    .await;
    let selector = Api::<Service>::namespaced(client.clone(), release_ns)
        .get(&format!("{fullname}-gmanager"))
        .await
        .unwrap()
        .spec
        .and_then(|s| s.selector)
        .unwrap();
    assert!(
        selector.iter().all(|(k, v)| leader.get(k) == Some(v)),
        "the gManager Service {selector:?} does not select the leader {leader:?}"
    );
    let log = op.log();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");
    op.kill();
    pods.delete("chart", &Default::default()).await.unwrap();

    // Uninstall removes the operator and its RBAC but keeps the CRD and the clusters.
    let out = cp.helm(&["uninstall", release, "--namespace", release_ns]);
    assert!(out.status.success(), "helm uninstall: {}", stderr(&out));
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    assert!(
        crds.get_opt(CRD_NAME).await.unwrap().is_some(),
        "the CRD was deleted"
    );
    assert!(clusters.get_opt("tiny-llama").await.unwrap().is_some());
    let roles = Api::<ClusterRole>::all(client.clone());
    eventually("the release's objects are gone", LIMIT, || async {
        let gone = roles.get_opt(&fullname).await.unwrap().is_none()
            && Api::<Deployment>::namespaced(client.clone(), release_ns)
                .get_opt(&fullname)
                .await
                .unwrap()
                .is_none();
        gone.then_some(())
    })
    .await;

    // The kept CRD still carries the release's name, so installing again adopts it.
    let out = cp.helm(&[
        "install",
        release,
        &chart,
        "--namespace",
        release_ns,
        "--set",
        "metricsApi.enabled=false",
    ]);
    assert!(out.status.success(), "helm install again: {}", stderr(&out));
    let out = cp.helm(&["uninstall", release, "--namespace", release_ns]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(crds.get_opt(CRD_NAME).await.unwrap().is_some());
}

/// A rule of the chart's rendered RBAC: which object holds it, and where.
struct RuleRef {
    kind: String,
    index: usize,
    rule: serde_json::Value,
}

impl RuleRef {
    fn describe(&self) -> String {
        format!("{} rule {}: {}", self.kind, self.index, self.rule)
    }

    /// How the operator names the first verb of this rule when it lacks it.
    fn first_permission(&self) -> String {
        let group = self.rule["apiGroups"][0].as_str().unwrap();
        let group = if group.is_empty() { "core" } else { group };
        format!(
            "{} {group}/{}",
            self.rule["verbs"][0].as_str().unwrap(),
            self.rule["resources"][0].as_str().unwrap()
        )
    }
}

/// The chart's RBAC with release `release` in `ns`: ServiceAccount, roles and bindings.
fn rendered_rbac(cp: &ControlPlane, release: &str, ns: &str) -> Vec<serde_json::Value> {
    render(
        cp,
        release,
        ns,
        &[
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ],
    )
}

/// Drops each rule of the chart's rendered RBAC in turn and runs the operator with what is
/// left: every removal must make it fail, either at its start-up check (naming what is
/// missing) or on the first request the API server forbids.
#[tokio::test]
async fn chart_rbac_has_no_rule_to_spare() {
    let cp = shared();
    let client = cp.client().await;
    let lease_ns = harness::namespace(&client, "rbac-drop").await;
    let rules: Vec<RuleRef> = rendered_rbac(cp, "drop", &lease_ns)
        .into_iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .flat_map(|o| {
            let kind = o["kind"].as_str().unwrap().to_owned();
            let rules = o["rules"].as_array().unwrap().clone();
            rules
                .into_iter()
                .enumerate()
                .map(move |(index, rule)| RuleRef {
                    kind: kind.clone(),
                    index,
                    rule,
                })
        })
        .collect();
    assert!(rules.len() >= 10, "{} rules rendered", rules.len());

    let mut unnoticed = Vec::new();
    for (k, dropped) in rules.iter().enumerate() {
        let release = format!("drop-{k}");
        let fullname = format!("{release}-operator");
        let mut objects = rendered_rbac(cp, &release, &lease_ns);
        for o in objects
            .iter_mut()
            .filter(|o| o["kind"] == dropped.kind.as_str())
        {
            o["rules"].as_array_mut().unwrap().remove(dropped.index);
        }
        kubectl_apply(cp, &objects, &[]);
        let ns = harness::namespace(&client, &format!("rbac-drop-{k}")).await;
        let token = harness::service_account_token(&client, &lease_ns, &fullname).await;
        let kubeconfig = cp.token_kubeconfig(&fullname, &token);
        let mut op = Operator::start(
            cp,
            &kubeconfig,
            &ns,
            "drop",
            &[
                &format!("--lease-namespace={lease_ns}"),
                &format!("--lease-name={fullname}"),
            ],
        );
        // Creating a cluster only matters to an operator that got past its start-up check.
        Api::<InfiniteLLMCluster>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &crate::cluster("llm", 1))
            .await
            .unwrap();
        let start = Instant::now();
        let failed = loop {
            if let Some(status) = op.wait_exit(Duration::from_millis(200)) {
                let log = op.log();
                break (!status.success()
                    && log.contains("missing RBAC permissions")
                    && log.contains(&dropped.first_permission()))
                .then_some(())
                .ok_or(format!(
                    "exited ({status}) without naming {}",
                    dropped.first_permission()
                ));
            }
            let log = op.log().to_lowercase();
            if log.contains("forbidden") {
                let resource = dropped.rule["resources"][0].as_str().unwrap();
                let named = resource.rsplit('/').next().unwrap();
                break log
                    .contains(named)
                    .then_some(())
                    .ok_or(format!("a forbidden request that does not name {named}"));
            }
            if start.elapsed() > Duration::from_secs(30) {
                break Err("nothing failed within 30 s".to_owned());
            }
        };
        if let Err(why) = failed {
            unnoticed.push(format!("{}: {why}\n{}", dropped.describe(), op.log()));
        }
        op.kill();
    }
    assert!(
        unnoticed.is_empty(),
        "rules the operator does without:\n{}",
        unnoticed.join("\n")
    );
}
