//! Response shapes (plain and SSE), stop strings, logprobs, metrics, and cancellation on disconnect.

mod api_support;

use std::time::Duration;

use api_support::{MODEL, Options, TestServer, start};
use futures::StreamExt;
use serde_json::{Value, json};

async fn greedy_completion(server: &TestServer, prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let answer = server.post("/v1/completions", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body
}

fn parse_chunks(data: &[String]) -> Vec<Value> {
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "ends with [DONE]"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_shapes_plain_and_streamed() {
    let server = start(Options::default()).await;
    let body = greedy_completion(&server, "The cat", json!({"max_tokens": 8})).await;
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].as_u64().unwrap() > 0);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null());
    assert_eq!(body["usage"]["completion_tokens"], 8);
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 0);
    assert_eq!(body["usage"]["total_tokens"], prompt_tokens + 8);

    let data = server
        .stream(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "The cat", "max_tokens": 8, "temperature": 0,
                    "ignore_eos": true, "stream": true}),
        )
        .await;
    let chunks = parse_chunks(&data);
    let mut text = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["id"], chunks[0]["id"], "one id per stream");
        assert!(
            chunk.get("usage").is_none(),
            "no usage without include_usage"
        );
        let choice = &chunk["choices"][0];
        text.push_str(choice["text"].as_str().unwrap());
        let last = i == chunks.len() - 1;
        assert_eq!(choice["finish_reason"].is_null(), !last, "{chunk}");
    }
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(
        text, body["choices"][0]["text"],
        "streamed text = plain text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_shapes_plain_and_streamed_with_usage() {
    let server = start(Options::default()).await;
    let request = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there"}],
        "max_completion_tokens": 6, "temperature": 0, "ignore_eos": true
    });
    let answer = server.post("/v1/chat/completions", &request).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.body;
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 6);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = parse_chunks(&server.stream("/v1/chat/completions", &streamed).await);
    let (usage_chunk, chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], body["usage"]);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        let choice = &chunk["choices"][0];
        if i > 0 {
            assert!(choice["delta"].get("role").is_none());
        }
        if let Some(content) = choice["delta"]["content"].as_str() {
            text.push_str(content);
        }
        let last = i == chunks.len() - 1;
        assert_eq!(choice["finish_reason"].is_null(), !last, "{chunk}");
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(text, body["choices"][0]["message"]["content"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_plain_and_streamed() {
    let server = start(Options::default()).await;
    let prompt = "A list of fruits:";
    let full = greedy_completion(&server, prompt, json!({})).await;
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_owned();
    let chars: Vec<char> = full_text.chars().collect();
    assert!(chars.len() >= 6, "need some text to cut: {full_text:?}");
    // A stop string from the middle of the greedy output: the output must end right before it.
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &full_text[..full_text.find(&stop).unwrap()];

    let cut = greedy_completion(
        &server,
        prompt,
        json!({"stop": [stop.clone(), "\u{0}never"]}),
    )
    .await;
    assert_eq!(cut["choices"][0]["text"], expected);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    let data = server
        .stream(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                    "ignore_eos": true, "stop": stop, "stream": true}),
        )
        .await;
    let chunks = parse_chunks(&data);
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, expected);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    server
        .wait_for_stats(Duration::from_secs(5), "stopped request freed", |s| {
            s.running == 0 && s.kv_blocks_used == 0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_line_up_with_the_tokens() {
    let server = start(Options::default()).await;
    let body =
        greedy_completion(&server, "Numbers:", json!({"max_tokens": 5, "logprobs": 2})).await;
    let logprobs = &body["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(logprobs["text_offset"][0], 0);
    for (i, top) in logprobs["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2);
        // Greedy picks the most likely token, so its logprob is the best one.
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = logprobs["token_logprobs"][i].as_f64().unwrap();
        assert!(
            chosen <= 0.0 && (best - chosen).abs() < 1e-4,
            "{best} vs {chosen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed() {
    let server = start(Options::default()).await;
    greedy_completion(&server, "Hi", json!({"max_tokens": 3})).await;
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    for name in [
        "ilm_requests_running ",
        "ilm_requests_waiting ",
        "ilm_kv_blocks_total 256",
        "ilm_kv_blocks_used ",
        "ilm_kv_cache_usage_ratio ",
        "ilm_generation_tokens_total 3",
        "ilm_prompt_tokens_total ",
        "ilm_request_success_total{finished_reason=\"length\"} 1",
        "ilm_time_to_first_token_seconds_bucket",
        "ilm_inter_token_latency_seconds_bucket",
        "ilm_e2e_request_latency_seconds_count 1",
        "ilm_num_preemptions_total ",
    ] {
        assert!(text.contains(name), "{name:?} missing from\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_blocks() {
    let server = start(Options::default()).await;
    // As long as the context allows, so it is still running when the client goes.
    let max_tokens = server.engine.max_context_tokens() - 64;
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(
            &json!({"model": MODEL, "prompt": "Tell me a very long story", "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").unwrap();
    assert!(first.starts_with(b"data: "));
    server
        .wait_for_stats(Duration::from_secs(5), "request running", |s| {
            s.running == 1 && s.kv_blocks_used > 0
        })
        .await;
    drop(body);
    server
        .wait_for_stats(
            Duration::from_secs(5),
            "blocks freed after disconnect",
            |s| s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0,
        )
        .await;
}
