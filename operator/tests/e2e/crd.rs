//! The CRD: up to date, accepted, usable with kubectl, and refusing bad specs.

use std::fs;

use infinite_llm_operator::crd::{InfiniteLLMCluster, chart_crd_template, crd_yaml};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;

use crate::harness::{self, shared, stderr, stdout};

const CRD_FILE: &str = "crds/infinitellmclusters.infinitellm.io.yaml";
const CHART_CRD_FILE: &str = "charts/infinite-llm/templates/crd.yaml";

#[test]
fn checked_in_crds_match_the_rust_types() {
    for (file, generated) in [
        (CRD_FILE, crd_yaml().unwrap()),
        (CHART_CRD_FILE, chart_crd_template().unwrap()),
    ] {
        let checked_in = fs::read_to_string(harness::workspace_root().join(file));
        assert!(
            checked_in.ok().as_ref() == Some(&generated),
            "{file} is stale or missing: run `make crds` and commit the result"
        );
    }
}

#[test]
fn crd_is_established_and_kubectl_knows_it() {
    let cp = shared();
    let out = cp.kubectl(&[
        "get",
        "crd",
        "infinitellmclusters.infinitellm.io",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Established\")].status} {.spec.names.shortNames}",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "True [\"ilc\"]");
    // The OpenAPI document that `kubectl explain` reads is published a few seconds after
    // the CRD is established.
    let mut explained = String::new();
    cp.wait_until(
        "kubectl explain knows ilc",
        std::time::Duration::from_secs(60),
        || {
            let out = cp.kubectl(&["explain", "ilc.spec.kvCache.blockTokens"]);
            explained = stdout(&out) + &stderr(&out);
            out.status.success()
        },
    );
    assert!(explained.contains("power of two"), "{explained}");
}

#[tokio::test]
async fn examples_apply_with_kubectl() {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, "examples").await;
    let examples = harness::workspace_root().join("examples");
    let out = cp.kubectl(&["apply", "-n", &ns, "-f", examples.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "kubectl apply examples/: {}",
        stderr(&out)
    );
    let files = fs::read_dir(&examples).unwrap().count();
    assert!(files >= 3, "expected at least three examples");
    let out = cp.kubectl(&["get", "ilc", "-n", &ns, "-o", "name"]);
    assert_eq!(stdout(&out).lines().count(), files, "{}", stdout(&out));
    // The printer columns are what `kubectl get` shows.
    let out = cp.kubectl(&["get", "ilc", "-n", &ns]);
    let header = stdout(&out).lines().next().unwrap_or_default().to_owned();
    for column in ["NAME", "PHASE", "READY", "REPLICAS", "POOL USED", "AGE"] {
        assert!(
            header.contains(column),
            "missing column {column} in {header:?}"
        );
    }
}

/// One way to break the valid spec, and what the API server must say about it.
struct Invalid {
    what: &'static str,
    edit: fn(&mut serde_json::Value),
    message: &'static str,
}

#[tokio::test]
async fn invalid_specs_are_refused_with_a_message() {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, "invalid").await;
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, &ns, &ApiResource::erase::<InfiniteLLMCluster>(&()));
    let cases = [
        Invalid {
            what: "min above max replicas",
            edit: |s| s["autoscaling"] = serde_json::json!({"minReplicas": 5, "maxReplicas": 2}),
            message: "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
        },
        Invalid {
            what: "a scale-down window above an hour",
            edit: |s| {
                s["autoscaling"] = serde_json::json!({
                    "minReplicas": 1, "maxReplicas": 2, "scaleDownStabilizationSeconds": 4000
                })
            },
            message: "spec.autoscaling.scaleDownStabilizationSeconds: Invalid value: 4000",
        },
        Invalid {
            what: "block size not a power of two",
            edit: |s| s["kvCache"]["blockTokens"] = 24.into(),
            message: "kvCache.blockTokens must be a power of two",
        },
        Invalid {
            what: "memory fraction above one",
            edit: |s| s["kvCache"]["gpuMemoryFraction"] = 1.5.into(),
            message: "kvCache.gpuMemoryFraction must be in (0, 1]",
        },
        Invalid {
            what: "negative lend fraction",
            edit: |s| s["kvCache"]["lendFraction"] = (-0.1).into(),
            message: "kvCache.lendFraction must be in [0, 1]",
        },
        Invalid {
            what: "long prefill share of zero",
            edit: |s| s["scheduling"] = serde_json::json!({"longPrefillShare": 0.0}),
            message: "scheduling.longPrefillShare must be in (0, 1]",
        },
        Invalid {
            what: "NCCL for CPU workers",
            edit: |s| {
                s["kvCache"]["transport"] = "nccl".into();
                s["workers"]["gpusPerWorker"] = 0.into();
            },
            message: "kvCache.transport nccl needs GPU workers",
        },
        Invalid {
            what: "unknown transport",
            edit: |s| s["kvCache"]["transport"] = "rdma".into(),
            message: "Unsupported value: \"rdma\"",
        },
        Invalid {
            what: "two model sources",
            edit: |s| s["model"]["source"]["hostPath"] = serde_json::json!({"path": "/m"}),
            message: "model.source must set exactly one of pvc, hostPath, image or demo",
        },
        Invalid {
            what: "no model source",
            edit: |s| s["model"]["source"] = serde_json::json!({}),
            message: "model.source must set exactly one of pvc, hostPath, image or demo",
        },
        Invalid {
            what: "relative host path",
            edit: |s| s["model"]["source"] = serde_json::json!({"hostPath": {"path": "models/x"}}),
            message: "model.source.hostPath.path must be an absolute path",
        },
        Invalid {
            what: "escaping volume path",
            edit: |s| s["model"]["source"]["pvc"]["path"] = "../etc".into(),
            message: "model.source.pvc.path must be relative and must not contain '..'",
        },
        Invalid {
            what: "API port on the peer port",
            edit: |s| s["api"] = serde_json::json!({"port": 8101}),
            message: "api.port must differ from the peer port 8101",
        },
        Invalid {
            what: "bad served name",
            edit: |s| s["model"]["servedName"] = " spaces ".into(),
            message: "model.servedName must be 1-128 characters",
        },
        Invalid {
            what: "negative replicas",
            edit: |s| s["workers"]["replicas"] = (-1).into(),
            message: "spec.workers.replicas: Invalid value: -1",
        },
        Invalid {
            what: "more GPUs than a worker uses",
            edit: |s| s["workers"]["gpusPerWorker"] = 2.into(),
            message: "workers.gpusPerWorker must be 0 or 1: a worker uses one GPU",
        },
        Invalid {
            what: "missing image",
            edit: |s| {
                s["workers"].as_object_mut().unwrap().remove("image");
            },
            message: "spec.workers.image: Required value",
        },
        Invalid {
            what: "grace period too short to drain",
            edit: |s| s["workers"]["terminationGracePeriodSeconds"] = 5.into(),
            message: "spec.workers.terminationGracePeriodSeconds: Invalid value: 5",
        },
    ];
    assert!(cases.len() >= 8);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut obj = crate::cluster_json(&format!("bad-{i}"), 1);
        (case.edit)(&mut obj["spec"]);
        let obj: DynamicObject = serde_json::from_value(obj).unwrap();
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(case.message) {
                    failures.push(format!(
                        "{}: expected 422 with {:?}, got {} {:?}",
                        case.what, case.message, status.code, status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.what)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The valid spec itself goes through, so the refusals above are about the edits.
    let ok: DynamicObject = serde_json::from_value(crate::cluster_json("good", 1)).unwrap();
    api.create(&PostParams::default(), &ok).await.unwrap();
}
