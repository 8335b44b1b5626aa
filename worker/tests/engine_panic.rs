//! A worker whose engine thread panics turns unhealthy and unready within a second, so the
//! kubelet restarts it and the Service stops sending it requests. The panic comes from the
//! test hook (`ILM_TEST_HOOKS`, `POST /debug/panic-engine` behind the cluster token).

mod local_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use local_support::{Launcher, bin, demo_model, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_engine_fails_health_and_readiness_within_a_second() {
    let (dir, model) = demo_model();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "panic-test-token\n").unwrap();
    let port = free_port();
    let _worker = Launcher(
        Command::new(bin())
            .arg("serve")
            .arg(format!("--model={}", model.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--token-file={}", token_file.display()))
            .env("ILM_TEST_HOOKS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker starts"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let status = |path: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            client
                .get(format!("{base}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while status("/ready").await != 200 {
        assert!(Instant::now() < deadline, "the worker never turned ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status("/health").await, 200);

    // The hook is behind the cluster token.
    let hook = format!("{base}/debug/panic-engine");
    let refused = client.post(&hook).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    assert_eq!(status("/health").await, 200);

    let asked = client
        .post(&hook)
        .bearer_auth("panic-test-token")
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status().as_u16(), 200);
    let panicked = Instant::now();
    loop {
        let (health, ready) = (status("/health").await, status("/ready").await);
        if health == 503 && ready == 503 {
            break;
        }
        assert!(
            panicked.elapsed() < Duration::from_secs(1),
            "still /health {health}, /ready {ready} a second after the engine panicked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "unhealthy and unready {:?} after the panic was asked for",
        panicked.elapsed()
    );
    let body: serde_json::Value = client
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["error"]["code"], "engine_dead", "{body}");
}
