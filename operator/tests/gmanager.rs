//! The gManager's HTTP service, served for real on a loopback port and driven over HTTP.

use std::time::Duration;

use infinite_llm_operator::gmanager::{self, GManagerConfig, Tokens};
use infinite_llm_protocol::gmanager::{
    BorrowAdvice, BorrowRequest, Heartbeat, HeartbeatAck, PoolFigures, PoolView, Register,
    Registered,
};
use reqwest::{Client, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const TOKEN: &str = "local-token";
const INTERVAL: Duration = Duration::from_millis(100);

struct GManager {
    /// The service itself, for what the operator's reconciler tells it.
    manager: gmanager::GManager,
    base: String,
    http: Client,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl GManager {
    async fn start(tokens: Tokens) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let config = GManagerConfig {
            heartbeat_interval: INTERVAL,
            missed_heartbeats: 3,
            ..GManagerConfig::default()
        };
        let (stop, stopped) = oneshot::channel();
        let manager = gmanager::GManager::new(config, tokens);
        let serving = manager.clone();
        let served = tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        GManager {
            manager,
            base,
            http: Client::new(),
            stop: Some(stop),
            served,
        }
    }

    async fn local() -> Self {
        Self::start(Tokens::single("local", TOKEN)).await
    }

    fn get(&self, path: &str) -> RequestBuilder {
        self.http.get(format!("{}{path}", self.base))
    }

    fn post(&self, path: &str) -> RequestBuilder {
        self.http.post(format!("{}{path}", self.base))
    }

    fn delete(&self, path: &str) -> RequestBuilder {
        self.http.delete(format!("{}{path}", self.base))
    }

    async fn register(&self, token: &str, id: &str, pool: PoolFigures) -> Registered {
        let r = self
            .post("/v1/workers")
            .bearer_auth(token)
            .json(&register(id, pool))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    async fn heartbeat(&self, id: &str, pool: PoolFigures) -> Response {
        self.post(&format!("/v1/workers/{id}/heartbeat"))
            .bearer_auth(TOKEN)
            .json(&Heartbeat { epoch: 0, pool })
            .send()
            .await
            .unwrap()
    }

    async fn borrow(&self, token: &str, home: &str) -> Response {
        self.post("/v1/borrow")
            .bearer_auth(token)
            .json(&BorrowRequest {
                home: home.into(),
                blocks: 4,
            })
            .send()
            .await
            .unwrap()
    }

    async fn pool(&self, token: &str) -> PoolView {
        let r = self
            .get("/v1/pool")
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    async fn metrics(&self) -> String {
        let r = self.get("/metrics").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.served)
            .await
            .expect("the gManager stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

fn pool(total: u64, used: u64, lent: u64, cap: u64) -> PoolFigures {
    PoolFigures {
        total_blocks: total,
        used_blocks: used,
        lent_blocks: lent,
        lend_cap_blocks: cap,
        ..Default::default()
    }
}

fn register(id: &str, pool: PoolFigures) -> Register {
    Register {
        worker_id: id.into(),
        api_url: format!("http://127.0.0.1/{id}"),
        peer_addr: format!("{id}.peers:9000"),
        block_tokens: 16,
        pool,
    }
}

/// Asserts the response is a JSON error with this status and code.
async fn assert_error(r: Response, status: StatusCode, code: &str) {
    assert_eq!(r.status(), status);
    let body: Value = r.json().await.unwrap();
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(error["message"].is_string(), "{body}");
}

fn creditor_ids(advice: &BorrowAdvice) -> Vec<&str> {
    advice
        .creditors
        .iter()
        .map(|c| c.worker_id.as_str())
        .collect()
}

#[tokio::test]
async fn only_health_and_metrics_are_open() {
    let g = GManager::local().await;
    let ok = g.get("/healthz").send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        g.get("/metrics").send().await.unwrap().status(),
        StatusCode::OK
    );

    let body = register("w0", pool(8, 0, 0, 4));
    let hb = Heartbeat {
        epoch: 0,
        pool: PoolFigures::default(),
    };
    let ask = BorrowRequest {
        home: "w0".into(),
        blocks: 1,
    };
    let refusals = [
        g.post("/v1/workers").json(&body),
        g.post("/v1/workers").bearer_auth("wrong").json(&body),
        g.post("/v1/workers")
            .header("authorization", format!("Basic {TOKEN}"))
            .json(&body),
        g.post("/v1/workers").bearer_auth(&TOKEN[1..]).json(&body),
        g.post("/v1/workers/w0/heartbeat").json(&hb),
        g.delete("/v1/workers/w0").bearer_auth("wrong"),
        g.post("/v1/borrow").json(&ask),
        g.get("/v1/pool"),
        g.get("/v1/pool").bearer_auth(format!("{TOKEN}x")),
    ];
    for request in refusals {
        assert_error(
            request.send().await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
    }
    assert!(
        g.pool(TOKEN).await.workers.is_empty(),
        "refused requests changed nothing"
    );
    g.stop().await;
}

#[tokio::test]
async fn unknown_workers_get_404_and_register_again() {
    let g = GManager::local().await;
    assert_error(
        g.heartbeat("w0", pool(8, 0, 0, 4)).await,
        StatusCode::NOT_FOUND,
        "unknown_worker",
    )
    .await;
    assert_error(
        g.delete("/v1/workers/w0")
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "unknown_worker",
    )
    .await;
    assert_error(
        g.borrow(TOKEN, "w0").await,
        StatusCode::NOT_FOUND,
        "unknown_worker",
    )
    .await;

    let joined = g.register(TOKEN, "w0", pool(8, 0, 0, 4)).await;
    assert_eq!(joined.epoch, 1);
    let ack: HeartbeatAck = g
        .heartbeat("w0", pool(8, 1, 0, 4))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ack.epoch, 1);
    g.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_as_json() {
    let g = GManager::local().await;
    let r = g
        .post("/v1/workers")
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "invalid_body").await;
    let r = g
        .post("/v1/workers")
        .bearer_auth(TOKEN)
        .json(&register("", PoolFigures::default()))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_registration").await;

    g.register(TOKEN, "w0", pool(8, 0, 0, 4)).await;
    let mut other = register("w1", pool(8, 0, 0, 4));
    other.block_tokens = 32;
    let r = g
        .post("/v1/workers")
        .bearer_auth(TOKEN)
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::CONFLICT, "block_tokens_mismatch").await;
    g.stop().await;
}

#[tokio::test]
async fn register_heartbeat_borrow_and_view_the_pool() {
    let g = GManager::local().await;
    let first = g.register(TOKEN, "home", pool(8, 8, 0, 4)).await;
    assert_eq!(
        first,
        Registered {
            epoch: 1,
            heartbeat_interval_ms: 100,
            configured_workers: 0,
        }
    );
    assert_eq!(g.register(TOKEN, "small", pool(8, 0, 0, 2)).await.epoch, 2);
    assert_eq!(g.register(TOKEN, "big", pool(8, 0, 0, 1)).await.epoch, 3);

    // Heartbeats change figures, not membership: "big" now lends the most.
    let r = g.heartbeat("big", pool(16, 2, 1, 8)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<HeartbeatAck>().await.unwrap().epoch, 3);

    let r = g.borrow(TOKEN, "home").await;
    assert_eq!(r.status(), StatusCode::OK);
    let advice: BorrowAdvice = r.json().await.unwrap();
    assert_eq!(advice.epoch, 3);
    assert_eq!(creditor_ids(&advice), ["big", "small"]);
    assert_eq!(advice.creditors[0].lendable_blocks, 7);
    assert_eq!(advice.creditors[0].peer_addr, "big.peers:9000");
    assert_eq!(advice.creditors[1].lendable_blocks, 2);

    let view = g.pool(TOKEN).await;
    assert_eq!(view.epoch, 3);
    assert_eq!(view.block_tokens, 16);
    assert_eq!(view.workers.len(), 3);
    assert_eq!(view.totals.total_blocks, 32);
    assert_eq!(view.totals.used_blocks, 10);
    assert_eq!(view.totals.lent_blocks, 1);
    let big = view.workers.iter().find(|w| w.worker_id == "big").unwrap();
    assert_eq!(big.free_blocks, 13);
    assert_eq!(big.api_url, "http://127.0.0.1/big");

    let metrics = g.metrics().await;
    for line in [
        r#"ilm_gmanager_workers{cluster="local"} 3"#,
        r#"ilm_gmanager_epoch{cluster="local"} 3"#,
        r#"ilm_gmanager_pool_blocks{cluster="local",state="total"} 32"#,
        r#"ilm_gmanager_pool_blocks{cluster="local",state="free"} 21"#,
        r#"ilm_gmanager_borrow_advice_total{cluster="local"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }

    // A leave bumps the epoch and takes the worker out of the advice.
    let r = g
        .delete("/v1/workers/big")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let advice: BorrowAdvice = g.borrow(TOKEN, "home").await.json().await.unwrap();
    assert_eq!(advice.epoch, 4);
    assert_eq!(creditor_ids(&advice), ["small"]);

    // Re-registering replaces the worker's figures and is a membership change. A full lender
    // stays on the advice with nothing lendable (it can call back newer loans); one that
    // lends nothing leaves it.
    assert_eq!(g.register(TOKEN, "small", pool(4, 4, 0, 2)).await.epoch, 5);
    let advice: BorrowAdvice = g.borrow(TOKEN, "home").await.json().await.unwrap();
    assert_eq!(creditor_ids(&advice), ["small"]);
    assert_eq!(advice.creditors[0].lendable_blocks, 0);
    assert_eq!(g.register(TOKEN, "small", pool(4, 0, 0, 0)).await.epoch, 6);
    let advice: BorrowAdvice = g.borrow(TOKEN, "home").await.json().await.unwrap();
    assert!(advice.creditors.is_empty());
    g.stop().await;
}

#[tokio::test]
async fn silent_workers_expire_and_come_back_by_registering() {
    let g = GManager::local().await;
    g.register(TOKEN, "alive", pool(8, 0, 0, 4)).await;
    g.register(TOKEN, "silent", pool(8, 0, 0, 4)).await;
    // Three intervals of silence expire a worker; "alive" keeps beating for six.
    for _ in 0..12 {
        tokio::time::sleep(INTERVAL / 2).await;
        assert_eq!(
            g.heartbeat("alive", pool(8, 0, 0, 4)).await.status(),
            StatusCode::OK
        );
    }
    // The sweeper expired "silent" without any request touching the ledger.
    let metrics = g.metrics().await;
    assert!(
        metrics.contains(r#"ilm_gmanager_workers{cluster="local"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ilm_gmanager_epoch{cluster="local"} 3"#),
        "{metrics}"
    );

    let view = g.pool(TOKEN).await;
    assert_eq!(view.epoch, 3, "two joins and one expiry");
    assert_eq!(
        view.workers
            .iter()
            .map(|w| w.worker_id.as_str())
            .collect::<Vec<_>>(),
        ["alive"]
    );
    assert_eq!(view.totals.total_blocks, 8);
    let advice: BorrowAdvice = g.borrow(TOKEN, "alive").await.json().await.unwrap();
    assert!(
        advice.creditors.is_empty(),
        "an expired worker is no creditor"
    );

    assert_error(
        g.heartbeat("silent", pool(8, 0, 0, 4)).await,
        StatusCode::NOT_FOUND,
        "unknown_worker",
    )
    .await;
    assert_eq!(g.register(TOKEN, "silent", pool(8, 0, 0, 4)).await.epoch, 4);
    let advice: BorrowAdvice = g.borrow(TOKEN, "alive").await.json().await.unwrap();
    assert_eq!(creditor_ids(&advice), ["silent"]);
    g.stop().await;
}

#[tokio::test]
async fn each_cluster_token_sees_only_its_own_cluster() {
    let tokens = Tokens::single("ns/a", "token-a");
    tokens.set("ns/b", "token-b");
    let g = GManager::start(tokens.clone()).await;
    g.register("token-a", "w0", pool(8, 0, 0, 4)).await;
    g.register("token-a", "w1", pool(8, 0, 0, 4)).await;
    g.register("token-b", "w0", pool(16, 0, 0, 8)).await;

    let a = g.pool("token-a").await;
    let b = g.pool("token-b").await;
    assert_eq!(
        (a.epoch, a.workers.len(), a.totals.total_blocks),
        (2, 2, 16)
    );
    assert_eq!(
        (b.epoch, b.workers.len(), b.totals.total_blocks),
        (1, 1, 16)
    );
    let advice: BorrowAdvice = g.borrow("token-b", "w0").await.json().await.unwrap();
    assert!(advice.creditors.is_empty(), "cluster a never lends to b");

    // A rotated-out token is refused from then on.
    tokens.remove("ns/b");
    assert_error(
        g.get("/v1/pool")
            .bearer_auth("token-b")
            .send()
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
    g.stop().await;
}

#[tokio::test]
async fn heartbeats_with_placements_build_debts_debtors_and_creditors() {
    let g = GManager::local().await;
    let mut full = pool(100, 100, 0, 50);
    full.running_requests = 2;
    full.waiting_requests = 1;
    g.register(TOKEN, "full", full).await;
    g.register(TOKEN, "idle", pool(100, 0, 0, 50)).await;

    // An old worker's heartbeat (no placements) still parses; a new one reports its requests.
    let beat = serde_json::json!({
        "epoch": 2,
        "pool": full,
        "placements": [
            {"request": 1, "holder": "full", "blocks": 70},
            {"request": 2, "holder": "full", "blocks": 30},
            {"request": 2, "holder": "idle", "blocks": 5},
        ],
    });
    let r = g
        .post("/v1/workers/full/heartbeat")
        .bearer_auth(TOKEN)
        .json(&beat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let view = g.pool(TOKEN).await;
    assert_eq!(view.debtors, ["full"]);
    assert_eq!(view.creditors, ["idle"]);
    assert_eq!(view.debts.len(), 1);
    assert_eq!(
        (
            view.debts[0].home.as_str(),
            view.debts[0].creditor.as_str(),
            view.debts[0].blocks
        ),
        ("full", "idle", 5)
    );

    // Returning more than was placed is refused whole.
    let bad = serde_json::json!({
        "epoch": 2,
        "pool": full,
        "placements": [{"request": 2, "holder": "idle", "blocks": -6}],
    });
    let r = g
        .post("/v1/workers/full/heartbeat")
        .bearer_auth(TOKEN)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::CONFLICT, "placement_underflow").await;
    assert_eq!(g.pool(TOKEN).await.debts[0].blocks, 5);

    // The sweeper's placement round plans to move the longest request's blocks to "idle".
    let mut planned = Vec::new();
    for _ in 0..30 {
        tokio::time::sleep(INTERVAL / 2).await;
        assert_eq!(
            g.heartbeat("idle", pool(100, 0, 0, 50)).await.status(),
            StatusCode::OK
        );
        let r = g
            .post("/v1/workers/full/heartbeat")
            .bearer_auth(TOKEN)
            .json(&Heartbeat {
                epoch: 2,
                pool: full,
            })
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        planned = g.pool(TOKEN).await.planned_moves;
        if !planned.is_empty() {
            break;
        }
    }
    assert_eq!(planned.len(), 1, "{planned:?}");
    assert_eq!(
        (
            planned[0].request,
            planned[0].from.as_str(),
            planned[0].to.as_str()
        ),
        (1, "full", "idle")
    );
    assert_eq!(planned[0].blocks, 50, "what the next request needs");
    let metrics = g.metrics().await;
    for line in [
        r#"ilm_gmanager_placement_workers{cluster="local",role="debtor"} 1"#,
        r#"ilm_gmanager_planned_move_blocks{cluster="local"} 50"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    g.stop().await;
}

#[tokio::test]
async fn workers_learn_how_many_workers_their_cluster_is_configured_with() {
    let g = GManager::local().await;
    assert_eq!(
        g.register(TOKEN, "a", pool(8, 0, 0, 4))
            .await
            .configured_workers,
        0,
        "unknown until the reconciler says"
    );
    g.manager.configure_workers("local", 3);
    assert_eq!(
        g.register(TOKEN, "b", pool(8, 0, 0, 4))
            .await
            .configured_workers,
        3
    );
    // A scale reaches the workers already registered with their next heartbeat.
    g.manager.configure_workers("local", 5);
    let ack: HeartbeatAck = g
        .heartbeat("a", pool(8, 0, 0, 4))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ack.configured_workers, 5);
    g.stop().await;
}
