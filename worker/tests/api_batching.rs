//! Continuous batching must not change results: requests that run together, joining and leaving
//! the batch at different steps, produce exactly the text each produces alone (greedy).

mod api_support;

use api_support::{MODEL, Options, TestServer, start};
use serde_json::{Value, json};

const REQUESTS: usize = 16;

fn request(i: usize) -> Value {
    // Different prompt lengths (so prefills span different numbers of rBlocks) and output lengths.
    let prompt = format!(
        "Request {i}: {}",
        "the quick brown fox jumps over the lazy dog ".repeat(1 + i % 5 * 3)
    );
    json!({
        "model": MODEL, "prompt": prompt, "max_tokens": 8 + (i * 7) % 33,
        "temperature": 0, "ignore_eos": true, "stream": true
    })
}

async fn streamed_text(server: &TestServer, body: &Value) -> String {
    let data = server.stream("/v1/completions", body).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    data[..data.len() - 1]
        .iter()
        .map(|d| {
            let chunk: Value = serde_json::from_str(d).unwrap();
            chunk["choices"][0]["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_match_their_solo_runs() {
    let server = start(Options::default()).await;
    let mut alone = Vec::new();
    for i in 0..REQUESTS {
        alone.push(streamed_text(&server, &request(i)).await);
    }
    let bodies: Vec<Value> = (0..REQUESTS).map(request).collect();
    let engine = server.engine.clone();
    let watcher = tokio::spawn(async move {
        let mut most = 0;
        loop {
            most = most.max(engine.stats().running);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            if most > 1 && engine.stats().running == 0 {
                return most;
            }
        }
    });
    let together =
        futures::future::join_all(bodies.iter().map(|body| streamed_text(&server, body))).await;
    let most_running = watcher.await.unwrap();
    assert!(
        most_running > 1,
        "the requests ran as one batch ({most_running} at most)"
    );
    for (i, (solo, batched)) in alone.iter().zip(&together).enumerate() {
        assert!(!solo.is_empty(), "request {i} produced text");
        assert_eq!(solo, batched, "request {i} differs when batched");
    }
}
