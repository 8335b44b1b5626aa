//! A request's KV grows with its tokens: chat requests without `max_tokens` (what the OpenAI
//! client sends by default, so the reply may fill the context) reserve nothing for the reply,
//! and run together in one batch.

mod api_support;

use std::time::Duration;

use api_support::{MODEL, Options, start};
use infinite_llm_worker::engine::EngineOptions;
use serde_json::json;

const REQUESTS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_requests_without_max_tokens_run_in_one_batch() {
    // 256 blocks of 16: each reply may take the whole 4,096-token pool.
    let server = start(Options {
        engine: EngineOptions {
            kv_blocks: Some(256),
            ..EngineOptions::default()
        },
        ..Options::default()
    })
    .await;
    let max = server.engine.max_context_tokens();
    assert_eq!(max, 4096, "one worker's pool bounds the context");
    let url = server.url("/v1/chat/completions");
    let sends = (0..REQUESTS).map(|i| {
        let body = json!({
            "model": MODEL, "stream": true, "temperature": 0, "ignore_eos": true,
            "messages": [{"role": "user", "content": format!("Tell me a story, number {i}.")}],
        });
        server.client.post(&url).json(&body).send()
    });
    let mut streams = Vec::new();
    for resp in futures::future::join_all(sends).await {
        let resp = resp.unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        streams.push(resp);
    }
    server
        .wait_for_stats(
            Duration::from_secs(30),
            "every request running in one batch",
            |s| s.running == REQUESTS,
        )
        .await;
    // Each stream has a first token, so each started (none was turned away).
    for resp in &mut streams {
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .expect("a first chunk")
            .unwrap();
        assert!(chunk.is_some_and(|c| !c.is_empty()));
    }
    // Dropping the streams cancels the requests and frees their blocks.
    drop(streams);
    server
        .wait_for_stats(Duration::from_secs(30), "every block free again", |s| {
            s.running == 0 && s.kv_blocks_used == 0
        })
        .await;
}
