//! 10,000 generated request bodies against both completion endpoints of a real server: no 5xx,
//! no dropped connection, and every 4xx in OpenAI's error shape, naming the parameter when
//! the body was a JSON object. The generator is seeded (`SEED`), so a failure replays.

mod api_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use api_support::{MODEL, Options, start};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

const SEED: u64 = 0x1f_2026;
const CASES: usize = 10_000;
const CONCURRENCY: usize = 8;

/// Fields either endpoint knows, some only one of them, plus typos, refused OpenAI fields and
/// harmless ones: what a generated body draws its keys from.
const KEYS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "ignore_eos",
    "repetition_penalty",
    "min_p",
    "min_tokens",
    "stop_token_ids",
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "response_format",
    "tools",
    "tool_choice",
    "user",
    "metadata",
    "store",
    "max_token",
    "temprature",
    "functions",
];

fn value(rng: &mut ChaCha8Rng, depth: u32) -> Value {
    match rng.random_range(0..13) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random_range(-3i64..6)),
        3 => json!(rng.random::<i64>()),
        4 => json!(rng.random_range(-3.0..3.0f64)),
        5 => json!(1e300),
        6 => json!(["a", "", "stop"].choose(rng).unwrap()),
        7 => json!("x".repeat(rng.random_range(0..40))),
        8 => json!([1, 2, 3]),
        9 => {
            let kind = *["text", "json_object"].choose(rng).unwrap();
            json!({ "type": kind })
        }
        10 if depth < 2 => {
            let n = rng.random_range(0..3);
            Value::Array((0..n).map(|_| value(rng, depth + 1)).collect())
        }
        11 if depth < 2 => json!({"5": value(rng, depth + 1), "x": 1}),
        _ => json!(rng.random_range(0u32..1200)),
    }
}

/// A valid body of the endpoint, then a few fields changed, added or removed.
fn body(rng: &mut ChaCha8Rng, chat: bool) -> Vec<u8> {
    let mut b = if chat {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    } else {
        json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    };
    let obj = b.as_object_mut().unwrap();
    for _ in 0..rng.random_range(0..4) {
        let key = *KEYS.choose(rng).unwrap();
        match rng.random_range(0..10) {
            0 => {
                obj.remove(key);
            }
            _ => {
                obj.insert(key.to_owned(), value(rng, 0));
            }
        }
    }
    // A generated length must not ask a small model for its whole context.
    for limit in ["max_tokens", "max_completion_tokens", "min_tokens"] {
        if obj
            .get(limit)
            .and_then(Value::as_i64)
            .is_some_and(|v| v > 3 && v < 100_000)
        {
            obj.insert(limit.to_owned(), json!(3));
        }
    }
    if !obj.contains_key("max_tokens") && !obj.contains_key("max_completion_tokens") {
        obj.insert("max_tokens".into(), json!(2));
    }
    let mut bytes = serde_json::to_vec(&b).unwrap();
    // One body in twenty is not a JSON object at all.
    match rng.random_range(0..40) {
        0 => bytes.truncate(rng.random_range(0..bytes.len())),
        1 => bytes = b"[1, 2]".to_vec(),
        _ => {}
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_bodies_get_answers_or_openai_errors_naming_their_field() {
    let server = Arc::new(start(Options::default()).await);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (server, next) = (server.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= CASES {
                    return statuses;
                }
                // Each case has its own generator, so a failing case replays alone.
                let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ i as u64);
                let chat = i % 2 == 1;
                let bytes = body(&mut rng, chat);
                let path = if chat {
                    "/v1/chat/completions"
                } else {
                    "/v1/completions"
                };
                let response = server
                    .client
                    .post(server.url(path))
                    .header("content-type", "application/json")
                    .body(bytes.clone())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("case {i}: connection dropped: {e}"));
                let status = response.status().as_u16();
                let text = response
                    .text()
                    .await
                    .unwrap_or_else(|e| panic!("case {i}: body dropped: {e}"));
                let sent = String::from_utf8_lossy(&bytes);
                assert!(status < 500, "case {i}: {status} for {sent}: {text}");
                *statuses.entry(status).or_default() += 1;
                if status >= 400 {
                    let v: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|_| panic!("case {i}: error is not JSON: {text}"));
                    let e = &v["error"];
                    for key in ["message", "type", "param", "code"] {
                        assert!(e.get(key).is_some(), "case {i}: {key} missing in {text}");
                    }
                    let object =
                        serde_json::from_slice::<Value>(&bytes).is_ok_and(|b| b.is_object());
                    if object && status != 429 {
                        let param = e["param"]
                            .as_str()
                            .unwrap_or_else(|| panic!("case {i}: no param for {sent}: {text}"));
                        assert!(!param.is_empty(), "case {i}");
                    }
                }
            }
        }));
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for t in tasks {
        for (s, n) in t.await.unwrap() {
            *statuses.entry(s).or_default() += n;
        }
    }
    eprintln!(
        "{CASES} bodies in {:.1} s: {statuses:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(statuses.get(&200).is_some_and(|&n| n > 100), "{statuses:?}");
    assert!(
        statuses.get(&400).is_some_and(|&n| n > 1000),
        "{statuses:?}"
    );
}
