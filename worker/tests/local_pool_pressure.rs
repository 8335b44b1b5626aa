//! The pool under pressure, with real processes in local mode: a creditor that will not lend,
//! homes that compete for the same creditors, and more requests than the pools and queues hold.
//! Requests complete with a single big worker's text or are turned away with a clear, retryable
//! error; no process dies; once the load is gone every block is free again.

mod local_support;

use std::process::Command;
use std::time::{Duration, Instant};

use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model_if_missing};
use local_support::{Pool, metric, post_greedy, prompt, start_pool, until_zero};
use serde_json::Value;

const BLOCK_TOKENS: usize = 16;

async fn greedy(client: &reqwest::Client, base: &str, prompt: &[u32], max_tokens: usize) -> String {
    let resp = post_greedy(client, base, prompt, max_tokens).await;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    assert_eq!(v["usage"]["completion_tokens"], max_tokens);
    v["choices"][0]["text"].as_str().unwrap().to_owned()
}

/// Waits until every worker's `name` gauge reads 0; panics after a generous deadline.
async fn all_zero(client: &reqwest::Client, pool: &Pool, name: &str) {
    until_zero(client, &pool.workers, name).await;
}

/// Every process of the pool is still up and answers.
async fn all_alive(client: &reqwest::Client, pool: &mut Pool) {
    assert!(
        pool.launcher.0.try_wait().unwrap().is_none(),
        "the launcher exited"
    );
    for w in &pool.workers {
        let health = client.get(format!("{w}/health")).send().await.unwrap();
        assert!(health.status().is_success(), "{w} is not healthy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_creditors_and_a_full_pool_never_corrupt_or_crash() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("demo");
    write_demo_model_if_missing(&model, &DemoModelSpec::default()).unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let reference = start_pool(&model, 1, 256, &[]);

    // worker-1 lends nothing; worker-0 and worker-2 lend half of their 8 blocks.
    let mut pool = start_pool(&model, 3, 8, &["--lend-fractions=0.5,0,0.5"]);
    // Let the workers' first heartbeats reach the gManager, so creditors are known.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 12 blocks: 8 at home and 4 that only the other lending worker can give.
    let long = prompt(12 * BLOCK_TOKENS - 24, 1);
    let want = greedy(&client, &reference.base, &long, 24).await;
    let (home, refuser, lender) = (&pool.workers[0], &pool.workers[1], &pool.workers[2]);
    assert_eq!(greedy(&client, home, &long, 24).await, want);
    assert_eq!(metric(&client, home, "ilm_kv_borrow_total").await, 4.0);
    assert_eq!(metric(&client, refuser, "ilm_kv_blocks_lent").await, 0.0);

    // Two homes that each need the other's loan: only one fits at a time, so the other waits
    // (refused while the first holds the blocks) and runs after it. Neither may deadlock.
    let other = prompt(12 * BLOCK_TOKENS - 24, 2);
    let want_other = greedy(&client, &reference.base, &other, 24).await;
    let (a, b) = tokio::join!(
        greedy(&client, home, &long, 24),
        greedy(&client, lender, &other, 24)
    );
    assert_eq!(
        (a.as_str(), b.as_str()),
        (want.as_str(), want_other.as_str())
    );
    assert_eq!(metric(&client, refuser, "ilm_kv_blocks_lent").await, 0.0);
    for gauge in [
        "ilm_kv_blocks_used",
        "ilm_kv_blocks_lent",
        "ilm_kv_blocks_borrowed",
    ] {
        all_zero(&client, &pool, gauge).await;
    }
    all_alive(&client, &mut pool).await;
    drop(pool);

    // Thirty requests at once on three pools of 8 blocks, with room for one waiting request
    // per worker: some borrow, some are preempted and recomputed, the rest are turned away.
    let mut pool = start_pool(&model, 3, 8, &["--lend-fraction=0.5", "--max-waiting=1"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Long ones borrow; short ones fill a worker's whole pool by their end.
    let kinds: Vec<(Vec<u32>, usize)> = (0..6)
        .map(|k| match k % 2 {
            0 => (prompt(11 * BLOCK_TOKENS, k + 3), 16),
            _ => (prompt(4 * BLOCK_TOKENS, k + 3), 64),
        })
        .collect();
    let mut wants = Vec::new();
    for (p, n) in &kinds {
        wants.push(greedy(&client, &reference.base, p, *n).await);
    }
    let answers = futures::future::join_all((0..30).map(|i| {
        let (p, n) = &kinds[i % kinds.len()];
        post_greedy(&client, &pool.base, p, *n)
    }))
    .await;
    let (mut done, mut turned_away) = (0, 0);
    for (i, resp) in answers.into_iter().enumerate() {
        let status = resp.status();
        let retry_after = resp.headers().get("retry-after").cloned();
        let v: Value = resp.json().await.unwrap();
        if status.is_success() {
            assert_eq!(
                v["choices"][0]["text"],
                wants[i % kinds.len()],
                "request {i}"
            );
            done += 1;
        } else {
            assert_eq!(status, 429, "request {i}: {v}");
            assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
            let secs: u64 = retry_after
                .expect("Retry-After is set")
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(secs >= 1);
            turned_away += 1;
        }
    }
    assert!(
        done > 0 && turned_away > 0,
        "{done} done, {turned_away} turned away"
    );
    all_alive(&client, &mut pool).await;
    for gauge in [
        "ilm_requests_running",
        "ilm_requests_waiting",
        "ilm_kv_blocks_used",
        "ilm_kv_blocks_lent",
        "ilm_kv_blocks_borrowed",
    ] {
        all_zero(&client, &pool, gauge).await;
    }
    // And the pool still serves.
    assert_eq!(greedy(&client, &pool.base, &long, 24).await, want);

    // A home that dies mid-request: its creditors take back what it borrowed. 256 tokens
    // need 16 blocks: 8 at home and 4 from each of the others.
    let request = tokio::spawn({
        let (client, home) = (client.clone(), pool.workers[0].clone());
        async move { post_greedy(&client, &home, &prompt(16, 7), 16 * BLOCK_TOKENS - 16).await }
    });
    let creditors = &pool.workers[1..];
    let deadline = Instant::now() + Duration::from_secs(60);
    for w in creditors {
        while metric(&client, w, "ilm_kv_blocks_lent").await != 4.0 {
            assert!(Instant::now() < deadline, "{w} never lent its 4 blocks");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let killed = Command::new("kill")
        .arg("-9")
        .arg(pool.pids[0].to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    until_zero(&client, creditors, "ilm_kv_blocks_lent").await;
    request.abort();
}
