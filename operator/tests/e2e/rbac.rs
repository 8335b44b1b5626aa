//! The operator runs with exactly the RBAC the chart ships, and says clearly what is
//! missing without it.

use std::time::Duration;

use infinite_llm_operator::crd::InfiniteLLMCluster;
use kube::api::{Api, PostParams};

use crate::harness::{self, Operator, eventually, shared, stderr};

const RBAC_FILE: &str = "charts/infinite-llm/rbac/operator-rbac.yaml";
const OPERATOR_NS: &str = "infinite-llm-system";

#[tokio::test]
async fn works_with_exactly_the_shipped_rbac() {
    let cp = shared();
    let client = cp.client().await;
    harness::namespace(&client, OPERATOR_NS).await;
    let ns = harness::namespace(&client, "rbac-ok").await;
    let rbac = harness::workspace_root().join(RBAC_FILE);
    let out = cp.kubectl(&["apply", "-f", rbac.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "kubectl apply {RBAC_FILE}: {}",
        stderr(&out)
    );
    let token = harness::service_account_token(&client, OPERATOR_NS, "infinite-llm-operator").await;
    let kubeconfig = cp.token_kubeconfig("operator-sa", &token);
    let op = Operator::start(
        cp,
        &kubeconfig,
        &ns,
        "sa",
        &[
            &format!("--lease-namespace={OPERATOR_NS}"),
            "--lease-name=rbac-test",
        ],
    );

    let clusters = Api::<InfiniteLLMCluster>::namespaced(client.clone(), &ns);
    clusters
        .create(&PostParams::default(), &crate::cluster("llm", 1))
        .await
        .unwrap();
    eventually(
        "the cluster is reconciled under the shipped RBAC",
        Duration::from_secs(60),
        || async {
            clusters
                .get("llm")
                .await
                .unwrap()
                .status
                .is_some()
                .then_some(())
        },
    )
    .await;
    harness::mark_pods_ready(&client, &ns, "app.kubernetes.io/instance=llm").await;
    let text = op.metrics().await.unwrap();
    assert!(
        !text.contains("infinite_llm_operator_reconcile_errors_total{"),
        "reconcile errors:\n{text}\n{}",
        op.log()
    );
    assert!(!op.log().contains("Forbidden"), "{}", op.log());
}

#[tokio::test]
async fn fails_clearly_without_rbac() {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, "rbac-none").await;
    let token = harness::service_account_token(&client, &ns, "unbound").await;
    let kubeconfig = cp.token_kubeconfig("unbound", &token);
    let mut op = Operator::start(cp, &kubeconfig, &ns, "unbound", &[]);
    let status = op
        .wait_exit(Duration::from_secs(30))
        .expect("an operator without RBAC exits");
    assert!(!status.success());
    let log = op.log();
    assert!(log.contains("missing RBAC permissions"), "{log}");
    assert!(log.contains("operator-rbac.yaml"), "{log}");
    assert!(
        log.contains("watch infinitellm.io/infinitellmclusters in namespace rbac-none"),
        "{log}"
    );
    assert!(
        log.contains("patch coordination.k8s.io/leases in namespace rbac-none"),
        "{log}"
    );
}
