//! Every error class of the API, with its exact status, type, param and code.

mod api_support;

use std::time::Duration;

use api_support::{CLUSTER_TOKEN, MODEL, Options, assert_error, start};
use infinite_llm_worker::engine::EngineOptions;
use serde_json::json;

const INVALID: &str = "invalid_request_error";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_parameters() {
    let server = start(Options::default()).await;
    let raw = |body: &'static str| {
        server
            .client
            .post(server.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
    };
    let answer = server.send(raw("{not json")).await;
    assert_error(&answer, 400, INVALID, None, None);
    let answer = server
        .send(raw(
            r#"{"model": "demo", "prompt": "hi", "temperature": "hot"}"#,
        ))
        .await;
    assert_error(&answer, 400, INVALID, Some("temperature"), None);
    let answer = server.send(raw(r#"{"prompt": "hi"}"#)).await;
    assert_error(&answer, 400, INVALID, Some("model"), None);

    let completion = |extra: serde_json::Value| {
        let mut body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"top_p": 2}), "top_p"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"n": 2}), "n"),
        (json!({"echo": true}), "echo"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (json!({"prompt": [4_000_000_000u64]}), "prompt"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"max_token": 5}), "max_token"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"tools": [{"type": "function"}]}), "tools"),
        (json!({"logit_bias": {"99999999": 5}}), "logit_bias"),
        (json!({"min_tokens": 9}), "min_tokens"),
    ];
    for (extra, param) in cases {
        let answer = server
            .post("/v1/completions", &completion(extra.clone()))
            .await;
        assert_error(&answer, 400, INVALID, Some(param), None);
    }

    let answer = server
        .post(
            "/v1/completions",
            &json!({"model": "gpt-4", "prompt": "Hello"}),
        )
        .await;
    assert_error(
        &answer,
        404,
        INVALID,
        Some("model"),
        Some("model_not_found"),
    );

    let max = server.engine.max_context_tokens();
    let answer = server
        .post("/v1/completions", &completion(json!({"max_tokens": max})))
        .await;
    assert_error(
        &answer,
        400,
        INVALID,
        Some("prompt"),
        Some("context_length_exceeded"),
    );

    let chat = |extra: serde_json::Value| {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let answer = server
        .post("/v1/chat/completions", &chat(json!({"messages": []})))
        .await;
    assert_error(&answer, 400, INVALID, Some("messages"), None);
    let answer = server
        .post(
            "/v1/chat/completions",
            &chat(json!({"max_completion_tokens": max})),
        )
        .await;
    assert_error(
        &answer,
        400,
        INVALID,
        Some("messages"),
        Some("context_length_exceeded"),
    );
    let answer = server
        .post("/v1/chat/completions", &chat(json!({"top_p": 1.5})))
        .await;
    assert_error(&answer, 400, INVALID, Some("top_p"), None);
    let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
    let answer = server.post("/v1/chat/completions", &chat(image)).await;
    assert_error(&answer, 400, INVALID, Some("messages[0].content"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_methods_and_big_bodies() {
    let server = start(Options {
        max_body_bytes: 1024,
        ..Options::default()
    })
    .await;
    let answer = server.get("/v1/nothing-here").await;
    assert_error(&answer, 404, INVALID, None, None);
    let answer = server.get("/v1/completions").await;
    assert_error(&answer, 405, INVALID, None, None);
    let big = json!({"model": MODEL, "prompt": "x".repeat(4096)});
    let answer = server.post("/v1/completions", &big).await;
    assert_error(&answer, 413, INVALID, None, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_v1_only() {
    let server = start(Options {
        api_key: Some("sk-test"),
        ..Options::default()
    })
    .await;
    let answer = server.get("/v1/models").await;
    assert_error(&answer, 401, INVALID, None, Some("invalid_api_key"));
    let answer = server
        .send(
            server
                .client
                .get(server.url("/v1/models"))
                .bearer_auth("sk-wrong"),
        )
        .await;
    assert_error(&answer, 401, INVALID, None, Some("invalid_api_key"));
    let answer = server
        .send(
            server
                .client
                .get(server.url("/v1/models"))
                .bearer_auth("sk-test"),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["data"][0]["id"], MODEL);
    assert_eq!(answer.body["data"][0]["owned_by"], "infinite-llm");
    assert_eq!(
        answer.body["data"][0]["max_model_len"],
        server.engine.max_context_tokens()
    );
    assert_eq!(server.get("/health").await.status, 200);
    assert_eq!(server.get("/ready").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_429_with_retry_after() {
    let server = start(Options {
        engine: EngineOptions {
            kv_blocks: Some(256),
            max_num_seqs: 1,
            max_waiting: 1,
            ..EngineOptions::default()
        },
        ..Options::default()
    })
    .await;
    // Streams that run as long as the context allows: accepted ones hold their place while
    // the others arrive, and dropping them at the end cancels them.
    let long = json!({
        "model": MODEL, "prompt": "Once upon a time", "stream": true, "ignore_eos": true,
        "max_tokens": server.engine.max_context_tokens() - 32
    });
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..6 {
        let request = server
            .client
            .post(server.url("/v1/completions"))
            .json(&long);
        let response = request.send().await.unwrap();
        if response.status() == 200 {
            accepted.push(response);
        } else {
            let answer = api_support::Answer {
                status: response.status(),
                headers: response.headers().clone(),
                body: response.json().await.unwrap(),
            };
            refused.push(answer);
        }
    }
    assert!(
        accepted.len() <= 2 && refused.len() >= 4,
        "one runs and one waits; the rest are refused ({} accepted)",
        accepted.len()
    );
    for answer in &refused {
        assert_error(
            answer,
            429,
            "rate_limit_error",
            None,
            Some("server_overloaded"),
        );
        let after: u64 = answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(after >= 1);
    }
    drop(accepted);
    server
        .wait_for_stats(Duration::from_secs(5), "cancelled streams freed", |s| {
            s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_needs_the_cluster_token_then_refuses_new_requests() {
    let server = start(Options::default()).await;
    let answer = server.send(server.client.post(server.url("/drain"))).await;
    assert_error(&answer, 401, INVALID, None, Some("invalid_cluster_token"));
    let answer = server
        .send(
            server
                .client
                .post(server.url("/drain"))
                .bearer_auth("guess"),
        )
        .await;
    assert_error(&answer, 401, INVALID, None, Some("invalid_cluster_token"));
    assert_eq!(server.get("/ready").await.status, 200);

    let drain = server
        .client
        .post(server.url("/drain"))
        .bearer_auth(CLUSTER_TOKEN)
        .timeout(Duration::from_secs(30));
    let answer = server.send(drain).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["status"], "drained");

    let ready = server.get("/ready").await;
    assert_error(
        &ready,
        503,
        "server_error",
        None,
        Some("service_unavailable"),
    );
    let answer = server
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Hello"}),
        )
        .await;
    assert_error(&answer, 503, "server_error", None, Some("shutting_down"));
    assert!(answer.headers.contains_key("retry-after"));
    assert_eq!(server.get("/health").await.status, 200);
}
