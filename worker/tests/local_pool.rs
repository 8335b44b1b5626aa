//! The pooled KV cache with real processes: local mode starts a gManager and workers whose pools
//! are far too small for one request; the request borrows blocks on the others, attention over
//! them runs there (DistAttention over TCP), and the text equals a single worker's with a big
//! pool.

mod local_support;

use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model_if_missing};
use local_support::{Pool, metric, prompt, start_pool};
use serde_json::{Value, json};

const BLOCK_TOKENS: usize = 16;

async fn greedy(client: &reqwest::Client, base: &str, prompt: &[u32], max_tokens: usize) -> String {
    let body = json!({
        "model": "demo", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true,
    });
    let resp = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    assert_eq!(v["usage"]["completion_tokens"], max_tokens);
    v["choices"][0]["text"].as_str().unwrap().to_owned()
}

async fn summed(client: &reqwest::Client, pool: &Pool, name: &str) -> f64 {
    let mut total = 0.0;
    for w in &pool.workers {
        total += metric(client, w, name).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_a_worker_borrow_and_match_one_big_worker() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("demo");
    write_demo_model_if_missing(&model, &DemoModelSpec::default()).unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let reference = start_pool(&model, 1, 256, &["--lend-fraction=0.5"]);

    // 1.5 times one worker's pool of 8 blocks, with the default lend fraction.
    let small = start_pool(&model, 3, 8, &["--lend-fraction=0.5"]);
    // Let the workers' first heartbeats reach the gManager, so creditors are known.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let p = prompt(8 * BLOCK_TOKENS * 3 / 2 - 32, 1);
    let want = greedy(&client, &reference.base, &p, 32).await;
    assert_eq!(greedy(&client, &small.base, &p, 32).await, want);
    assert!(
        summed(&client, &small, "ilm_kv_borrow_total").await >= 4.0,
        "the request borrowed blocks"
    );
    assert!(
        summed(&client, &small, "ilm_remote_attention_seconds_count").await > 0.0,
        "remote attention is timed"
    );

    // Eight long requests at once, more than the pool holds together: they borrow from the
    // same creditors, queue and are preempted, and each still gets its own text.
    let prompts: Vec<Vec<u32>> = (0..8).map(|k| prompt(100 + 10 * k, k + 2)).collect();
    let wants = futures::future::join_all(
        prompts
            .iter()
            .map(|p| greedy(&client, &reference.base, p, 24)),
    )
    .await;
    let gots =
        futures::future::join_all(prompts.iter().map(|p| greedy(&client, &small.base, p, 24)))
            .await;
    assert_eq!(gots, wants);
    drop(small);

    // With everything lendable, one request uses over 90% of the three pools together.
    let all = start_pool(&model, 3, 8, &["--lend-fraction=1.0"]);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let summed = 3 * 8 * BLOCK_TOKENS;
    let n = summed * 92 / 100;
    let p = prompt(n - 16, 9);
    let want = greedy(&client, &reference.base, &p, 16).await;
    assert_eq!(greedy(&client, &all.base, &p, 16).await, want);
}
