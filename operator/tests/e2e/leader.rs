//! Leader election: of two operator processes, one reconciles; killing it hands over.

use std::time::{Duration, Instant};

use infinite_llm_operator::crd::InfiniteLLMCluster;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

use crate::harness::{self, Operator, eventually, shared};

const LEADER: &str = "infinite_llm_operator_leader";
const RECONCILES: &str = "infinite_llm_operator_reconciliations_total";

#[tokio::test]
async fn one_of_two_operators_reconciles_and_killing_it_hands_over() {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, "leader").await;
    let mut a = Operator::start(cp, &cp.kubeconfig, &ns, "a", &[]);
    let mut b = Operator::start(cp, &cp.kubeconfig, &ns, "b", &[]);

    let clusters = Api::<InfiniteLLMCluster>::namespaced(client.clone(), &ns);
    clusters
        .create(&PostParams::default(), &crate::cluster("first", 1))
        .await
        .unwrap();
    let has_status = |name: &'static str| {
        let clusters = clusters.clone();
        async move {
            clusters
                .get(name)
                .await
                .unwrap()
                .status
                .is_some()
                .then_some(())
        }
    };
    eventually(
        "the first cluster is reconciled",
        Duration::from_secs(60),
        || has_status("first"),
    )
    .await;

    let (leader, leader_id, follower) = if a.metric(LEADER).await == 1.0 {
        (&mut a, "a", &mut b)
    } else {
        (&mut b, "b", &mut a)
    };
    assert_eq!(leader.metric(LEADER).await, 1.0);
    assert_eq!(follower.metric(LEADER).await, 0.0);
    assert!(leader.metric(RECONCILES).await > 0.0);
    assert_eq!(
        follower.metric(RECONCILES).await,
        0.0,
        "the follower reconciled"
    );
    // Only the leader serves the gManager.
    assert!(
        harness::http_get(leader.gmanager_addr, "/healthz")
            .await
            .is_some()
    );
    assert!(
        harness::http_get(follower.gmanager_addr, "/healthz")
            .await
            .is_none(),
        "the follower serves a gManager"
    );
    // Both are ready: readiness means taking part, not leading.
    assert!(
        harness::http_get(follower.metrics_addr, "/readyz")
            .await
            .is_some()
    );
    assert!(
        harness::http_get(follower.metrics_addr, "/healthz")
            .await
            .is_some()
    );
    let lease = Api::<Lease>::namespaced(client.clone(), &ns)
        .get("infinite-llm-operator")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(leader_id)
    );

    // SIGKILL: no release, so the follower must wait for the lease to expire (4 s here).
    leader.kill();
    let killed = Instant::now();
    clusters
        .create(&PostParams::default(), &crate::cluster("second", 1))
        .await
        .unwrap();
    eventually(
        "the follower takes over and reconciles",
        Duration::from_secs(60),
        || has_status("second"),
    )
    .await;
    let took = killed.elapsed();
    assert_eq!(follower.metric(LEADER).await, 1.0);
    assert!(follower.metric(RECONCILES).await > 0.0);
    assert!(took < Duration::from_secs(30), "hand-over took {took:?}");
    let lease = Api::<Lease>::namespaced(client.clone(), &ns)
        .get("infinite-llm-operator")
        .await
        .unwrap();
    assert_ne!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(leader_id)
    );
}

#[tokio::test]
async fn a_leader_that_stops_releases_the_lease() {
    let cp = shared();
    let client = cp.client().await;
    let ns = harness::namespace(&client, "release").await;
    let mut op = Operator::start(cp, &cp.kubeconfig, &ns, "only", &[]);
    eventually("the operator leads", Duration::from_secs(60), || async {
        (op.metric(LEADER).await == 1.0).then_some(())
    })
    .await;
    op.terminate();
    let status = op
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the operator did not exit on SIGTERM\n{}", op.log()));
    assert!(status.success(), "exit status {status}\n{}", op.log());
    let lease = Api::<Lease>::namespaced(client, &ns)
        .get("infinite-llm-operator")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity,
        None,
        "the lease was not released"
    );
}
