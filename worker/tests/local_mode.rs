//! Local mode end to end with real processes: the pool comes up, the front door spreads requests
//! over the workers and streams SSE through, and killing the launcher outright leaves no worker
//! behind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model_if_missing};
use serde_json::{Value, json};

mod local_support;

use local_support::{BIN, Launcher, free_port, metric, worker_urls};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_serves_spreads_and_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_demo_model_if_missing(&model, &DemoModelSpec::default()).unwrap();
    let port = free_port();
    let mut launcher = Launcher(
        Command::new(BIN)
            .args(["local", "--workers", "2", "--kv-blocks", "64"])
            .arg(format!("--port={port}"))
            .arg(format!("--model={}", model.display()))
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("launcher starts"),
    );
    let (workers, _stdout) = tokio::task::block_in_place(|| worker_urls(&mut launcher.0));
    assert_eq!(workers.len(), 2);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    let request = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0});
    let mut texts = Vec::new();
    for _ in 0..4 {
        let answer: Value = client
            .post(format!("{base}/v1/completions"))
            .json(&request)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        texts.push(answer["choices"][0]["text"].as_str().unwrap().to_owned());
    }
    assert!(
        texts.iter().all(|t| t == &texts[0]),
        "greedy is the same on every worker"
    );
    for worker in &workers {
        let served = metric(
            &client,
            worker,
            "ilm_request_success_total{finished_reason=\"length\"}",
        )
        .await
            + metric(
                &client,
                worker,
                "ilm_request_success_total{finished_reason=\"stop\"}",
            )
            .await;
        assert!(served >= 1.0, "{worker} served none of the requests");
    }

    let stream = client
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 4, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let body = stream.text().await.unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");

    let answer = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "other", "prompt": "Hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404, "worker errors pass through");
    let error: Value = answer.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");

    // SIGKILL gives the launcher no chance to clean up; its workers see stdin close and exit.
    launcher.0.kill().unwrap();
    launcher.0.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for worker in &workers {
        while client.get(format!("{worker}/health")).send().await.is_ok() {
            assert!(Instant::now() < deadline, "{worker} outlived the launcher");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
