//! Blocks come home from a creditor that became busy, with real processes in local mode: a
//! request that started on a creditor's blocks (its home was full) keeps them only while that
//! creditor has nothing of its own to do. Once the creditor serves a request of its own (every
//! step of the borrower would wait for its steps) and blocks free up at home, the home moves
//! them back while the request decodes, and its text is still one big worker's.

mod local_support;

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use local_support::{demo_model, greedy_text, metric, prompt, start_pool};
use serde_json::{Value, json};

const BLOCK_TOKENS: usize = 16;
/// Blocks a worker holds.
const POOL: usize = 256;
/// 237 of the home's 256 blocks: the borrower's prompt does not fit beside it.
const FULL_PROMPT: usize = 3780;
/// One prefill chunk (the step budget is 512 tokens), so the borrower takes its loans while the
/// creditor is idle; fits its home (219 blocks) and decodes for seconds: long enough for the
/// creditor's change to reach the home in heartbeats (a second or two) before it ends.
const BORROWER: (usize, usize) = (500, 3000);

/// A streamed greedy completion, read event by event.
struct Streamed {
    body: BoxStream<'static, Vec<u8>>,
    pending: String,
}

impl Streamed {
    async fn send(
        client: &reqwest::Client,
        base: &str,
        prompt: Vec<u32>,
        max_tokens: usize,
    ) -> Self {
        let body = json!({
            "model": "demo", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": true, "stream": true,
        });
        let resp = client
            .post(format!("{base}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        Streamed {
            body: resp.bytes_stream().map(|c| c.unwrap().to_vec()).boxed(),
            pending: String::new(),
        }
    }

    /// The text of the next chunk; `None` once the stream is over.
    async fn next_text(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let event: String = self.pending.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    return None;
                }
                let v: Value = serde_json::from_str(data).unwrap();
                return Some(v["choices"][0]["text"].as_str().unwrap_or("").to_owned());
            }
            let chunk = self.body.next().await?;
            self.pending.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_on_a_creditor_that_became_busy_come_home_mid_decode() {
    let (_dir, model) = demo_model();
    let reference = start_pool(&model, 1, POOL, &[]);
    let pool = start_pool(&model, 2, POOL, &["--lend-fraction=0.5"]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let (home, creditor) = (pool.workers[0].clone(), pool.workers[1].clone());
    let borrower = prompt(BORROWER.0, 2);
    assert!((BORROWER.0 + BORROWER.1).div_ceil(BLOCK_TOKENS) <= POOL);
    let want = greedy_text(
        client.clone(),
        reference.base.clone(),
        borrower.clone(),
        BORROWER.1,
    )
    .await;

    // The home fills up; while the creditor is idle, both requests may borrow there, so
    // neither has to yield to the other.
    let mut filler = Streamed::send(&client, &home, prompt(FULL_PROMPT, 1), 2000).await;
    filler.next_text().await.expect("the filler's first token");
    let mut request = Streamed::send(&client, &home, borrower, BORROWER.1).await;
    let mut text = request
        .next_text()
        .await
        .expect("the borrower's first token");
    assert!(metric(&client, &creditor, "ilm_kv_blocks_lent").await > 0.0);
    // Blocks free up at home (the filler's client goes away), then the creditor gets a
    // request of its own.
    drop(filler);
    until_metric_at_most(&client, &home, "ilm_requests_running", 1.0).await;
    let own = tokio::spawn(greedy_text(
        client.clone(),
        creditor.clone(),
        prompt(50, 3),
        3000,
    ));

    let mut came_home = false;
    loop {
        tokio::select! {
            piece = request.next_text() => match piece {
                Some(piece) => text.push_str(&piece),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(20)), if !came_home => {
                came_home = metric(&client, &creditor, "ilm_kv_blocks_lent").await == 0.0;
            }
        }
    }
    assert!(
        came_home,
        "the request ended with its blocks still on the busy creditor"
    );
    assert_eq!(text, want, "the text of a request whose blocks moved home");
    // Moved, not recomputed: a request that yields frees its loans too.
    assert!(metric(&client, &home, "ilm_kv_migrated_blocks_total").await > 0.0);
    assert_eq!(
        metric(&client, &home, "ilm_num_preemptions_total").await,
        0.0
    );
    own.abort();
}

/// Waits until `name` on `base` reads at most `at_most`; panics after a minute.
async fn until_metric_at_most(client: &reqwest::Client, base: &str, name: &str, at_most: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(client, base, name).await > at_most {
        assert!(
            std::time::Instant::now() < deadline,
            "{base}: {name} stays above {at_most}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
