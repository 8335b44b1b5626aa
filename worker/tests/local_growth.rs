//! The pool grows with its requests, with real processes in local mode: a request starts with
//! its first chunk's blocks and borrows on creditors only once its tokens outgrow its home
//! (with one big worker's text); two homes that borrow from each other under pressure both
//! finish; a request that loses blocks the rest of the pool cannot give back ends with a
//! retryable 503 within the queue time limit; a long request sent as soon as the pool reports
//! ready is accepted.

mod local_support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use local_support::{
    demo_model, greedy_text, lender, metric, post_greedy, prompt, signal, start_pool,
};
use serde_json::{Value, json};

const BLOCK_TOKENS: usize = 16;

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A request whose prompt fits at home starts without borrowing; its KV grows onto a
/// creditor while it decodes; its text is one big worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_grows_onto_a_creditor_mid_decode_with_one_big_workers_text() {
    let (_dir, model) = demo_model();
    let reference = start_pool(&model, 1, 256, &[]);
    // 8 blocks a worker: 128 tokens at home, 64 more on each of the two others.
    let pool = start_pool(&model, 3, 8, &["--lend-fraction=0.5"]);
    let client = client();
    let (p, new_tokens) = (prompt(40, 1), 140);
    let want = greedy_text(
        client.clone(),
        reference.base.clone(),
        p.clone(),
        new_tokens,
    )
    .await;

    let home = &pool.workers[0];
    let body = json!({
        "model": "demo", "prompt": p, "max_tokens": new_tokens,
        "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let resp = client
        .post(format!("{home}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut borrowed_at_first_token = None;
    let mut pending = String::new();
    while let Some(chunk) = stream.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            if borrowed_at_first_token.is_none() {
                borrowed_at_first_token = Some(metric(&client, home, "ilm_kv_borrow_total").await);
            }
        }
    }
    assert_eq!(
        borrowed_at_first_token,
        Some(0.0),
        "40 prompt tokens need 3 of the home's 8 blocks: nothing is borrowed for max_tokens"
    );
    let borrowed = metric(&client, home, "ilm_kv_borrow_total").await;
    // 180 tokens need 12 blocks: at least 4 came from creditors, once decoding outgrew home.
    assert!(borrowed >= 4.0, "borrowed {borrowed} blocks");
    assert_eq!(text, want, "the grown request's text is one big worker's");
}

/// Two workers whose requests each outgrow their home borrow from each other while the pool
/// cannot hold both at once: the older one progresses (the newer yields and is recomputed),
/// and both finish with one big worker's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_homes_that_borrow_from_each_other_under_pressure_both_finish() {
    let (_dir, model) = demo_model();
    let reference = start_pool(&model, 1, 256, &[]);
    // 16 blocks each, 8 lendable: one request of 22 blocks fits the pool, two do not (44 > 32).
    let pool = start_pool(&model, 2, 16, &["--lend-fraction=0.5"]);
    let client = client();
    let jobs = [(prompt(100, 1), 250), (prompt(100, 2), 250)];
    assert!(
        jobs.iter()
            .all(|(p, n)| (p.len() + n).div_ceil(BLOCK_TOKENS) == 22)
    );
    let mut want = Vec::new();
    for (p, n) in &jobs {
        want.push(greedy_text(client.clone(), reference.base.clone(), p.clone(), *n).await);
    }
    let tasks: Vec<_> = jobs
        .iter()
        .zip(&pool.workers)
        .map(|((p, n), home)| {
            tokio::spawn(greedy_text(client.clone(), home.clone(), p.clone(), *n))
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("both requests finish")
                .unwrap(),
        );
    }
    assert_eq!(got, want);
    let mut lent_or_borrowed = 0.0;
    for w in &pool.workers {
        lent_or_borrowed += metric(&client, w, "ilm_kv_borrow_total").await;
    }
    assert!(lent_or_borrowed > 0.0, "the homes borrowed from each other");
}

/// A creditor killed while the rest of the pool cannot hold the request: the request ends
/// with a retryable 503 (with Retry-After) within the queue time limit, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_loses_blocks_the_pool_cannot_give_back_ends_with_a_retryable_503() {
    let (_dir, model) = demo_model();
    const LIMIT_SECS: u64 = 5;
    // 16 blocks each, 8 lendable: the home and both creditors hold 32, one creditor 24.
    let pool = start_pool(
        &model,
        3,
        16,
        &[
            "--lend-fraction=0.5",
            &format!("--queue-timeout-secs={LIMIT_SECS}"),
        ],
    );
    let client = client();
    // 430 tokens: 27 blocks.
    let (p, new_tokens) = (prompt(200, 3), 230);
    let home = pool.workers[0].clone();
    let request = tokio::spawn({
        let client = client.clone();
        async move {
            let resp = post_greedy(&client, &home, &p, new_tokens).await;
            let retry_after = resp.headers().get("retry-after").cloned();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap();
            (status, retry_after, body, Instant::now())
        }
    });
    // Once both creditors lend, kill one of them.
    let first = lender(&client, &pool, &[1, 2]).await;
    let other = 3 - first;
    local_support::until_metric(
        &client,
        &pool.workers[other],
        "ilm_kv_blocks_lent",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    signal(pool.pids[first], "-9");
    let killed = Instant::now();
    let (status, retry_after, body, ended) = tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .expect("the request ends, not hangs")
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry_after.is_some(), "503 without Retry-After: {body}");
    let took = ended - killed;
    // The creditor's loss is noticed at once (its connection closes); then the bound.
    assert!(
        took < Duration::from_secs(LIMIT_SECS + 10),
        "ended {took:?} after the creditor died"
    );
}

/// Right after the pool reports ready, a request longer than one worker's pool (but within
/// the pool's configured size) is accepted and served, not refused as too long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_right_after_start_up_is_not_refused() {
    let (_dir, model) = demo_model();
    let pool = start_pool(&model, 3, 8, &["--lend-fraction=0.5"]);
    let client = client();
    // 200 tokens: more than a worker's 128, within 128 + 2 * 64.
    let resp = post_greedy(&client, &pool.workers[0], &prompt(150, 4), 50).await;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    assert_eq!(v["usage"]["completion_tokens"], 50);
}
