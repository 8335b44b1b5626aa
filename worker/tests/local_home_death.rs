//! A request whose home worker dies, with real processes in local mode: the client of the front
//! door gets a retryable answer it can act on (503 with Retry-After, or an error event on a
//! stream), never a hang or a cut connection, and the pool serves on.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{Pool, demo_model, metric, post_greedy, prompt, signal, start_pool};
use serde_json::{Value, json};

const NEW_TOKENS: usize = 400;

/// The worker, among `alive`, that runs a request, once one does.
async fn running(client: &reqwest::Client, pool: &Pool, alive: &[usize]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for &i in alive {
            if metric(client, &pool.workers[i], "ilm_requests_running").await > 0.0 {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no worker runs the request");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_home_dies_ends_with_a_retryable_error() {
    let (_dir, model) = demo_model();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let pool = start_pool(&model, 3, 64, &[]);

    let request = tokio::spawn({
        let (client, base) = (client.clone(), pool.base.clone());
        async move { post_greedy(&client, &base, &prompt(16, 1), NEW_TOKENS).await }
    });
    let mut alive = vec![0, 1, 2];
    let home = running(&client, &pool, &alive).await;
    signal(pool.pids[home], "-9");
    alive.retain(|&i| i != home);
    let answer = request.await.unwrap();
    assert_eq!(answer.status(), 503);
    let after: u64 = answer.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after >= 1);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");

    // Streaming: the events already sent stand, and an error event ends the stream.
    let body = json!({
        "model": "demo", "prompt": prompt(16, 2), "max_tokens": NEW_TOKENS,
        "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let mut stream = client
        .post(format!("{}/v1/completions", pool.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await.unwrap().expect("a first event");
    assert!(first.starts_with(b"data: "));
    let home = running(&client, &pool, &alive).await;
    signal(pool.pids[home], "-9");
    let mut rest = Vec::new();
    while let Some(chunk) = stream.chunk().await.expect("the stream ends cleanly") {
        rest.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(rest).unwrap();
    let last = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .last()
        .expect("an event after the death");
    let error: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "service_unavailable", "{text}");

    // The last worker still serves.
    let answer = post_greedy(&client, &pool.base, &prompt(16, 3), 8).await;
    assert_eq!(answer.status(), 200);
}
