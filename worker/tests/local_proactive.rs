//! Early borrowing, with real processes in local mode: a long request that fits in its home's
//! pool keeps only the long-request share of it there (`--long-home-share`, 0.25 by default)
//! and borrows the rest from an idle worker before it starts, so the home never fills up. The
//! text equals a run with the share turned off, and where nobody can lend the request runs at
//! home as before.

mod local_support;

use std::time::Duration;

use local_support::{Pool, demo_model, greedy_text, metric, prompt, start_pool};

/// Each worker's pool; a quarter of it (16 blocks, 256 tokens) stays for a long request.
const KV_BLOCKS: usize = 64;
const HOME_SHARE_BLOCKS: f64 = 16.0;
/// 500 tokens: 32 blocks of 16, half the home's pool, twice its share.
const PROMPT: usize = 300;
const NEW_TOKENS: usize = 200;

/// What the gauges showed at most while the request ran.
#[derive(Debug, Default)]
struct Peaks {
    /// The home's local blocks in use.
    used: f64,
    /// Blocks the home held on creditors.
    borrowed: f64,
    /// Blocks the other workers lent, together.
    lent: f64,
}

/// Runs the long request on worker-0 of `pool` while sampling the gauges; returns its text.
async fn run_on_home(client: &reqwest::Client, pool: &Pool) -> (String, Peaks) {
    let home = pool.workers[0].clone();
    let request = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        prompt(PROMPT, 1),
        NEW_TOKENS,
    ));
    let mut peaks = Peaks::default();
    while !request.is_finished() {
        peaks.used = peaks
            .used
            .max(metric(client, &home, "ilm_kv_blocks_used").await);
        peaks.borrowed = peaks
            .borrowed
            .max(metric(client, &home, "ilm_kv_blocks_borrowed").await);
        let mut lent = 0.0;
        for w in &pool.workers[1..] {
            lent += metric(client, w, "ilm_kv_blocks_lent").await;
        }
        peaks.lent = peaks.lent.max(lent);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (request.await.unwrap(), peaks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_borrows_beyond_its_share_before_the_home_fills() {
    let (_dir, model) = demo_model();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    // The share turned off: one worker holds the whole request.
    let reference = start_pool(&model, 1, KV_BLOCKS, &["--long-home-share=1.0"]);
    let (want, peaks) = run_on_home(&client, &reference).await;
    assert!(
        peaks.used > HOME_SHARE_BLOCKS,
        "without the share, the prompt alone takes 19 blocks at home: {peaks:?}"
    );
    let home = &reference.workers[0];
    assert_eq!(metric(&client, home, "ilm_kv_borrow_total").await, 0.0);
    drop(reference);

    // Three idle workers with the default share: the home keeps 16 blocks, borrows 16.
    let pool = start_pool(&model, 3, KV_BLOCKS, &["--lend-fraction=0.5"]);
    // Let the workers' first heartbeats reach the gManager, so creditors are known.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (got, peaks) = run_on_home(&client, &pool).await;
    eprintln!("with the share: {peaks:?}");
    assert_eq!(got, want, "the text with the share turned off");
    let home = &pool.workers[0];
    assert_eq!(
        metric(&client, home, "ilm_kv_borrow_total").await,
        32.0 - HOME_SHARE_BLOCKS,
        "the part beyond the share, borrowed up front"
    );
    assert_eq!(
        (peaks.used, peaks.borrowed, peaks.lent),
        (
            HOME_SHARE_BLOCKS,
            32.0 - HOME_SHARE_BLOCKS,
            32.0 - HOME_SHARE_BLOCKS
        ),
        "the home held its share and never more; creditors held the rest"
    );
    drop(pool);

    // Nobody can lend: the request runs at home as before, with the same text.
    let alone = start_pool(&model, 2, KV_BLOCKS, &["--lend-fractions=0.5,0"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (got, peaks) = run_on_home(&client, &alone).await;
    assert_eq!(got, want, "the text at home");
    assert!(
        peaks.used > HOME_SHARE_BLOCKS && peaks.borrowed == 0.0,
        "all of it at home: {peaks:?}"
    );
    assert_eq!(
        metric(&client, &alone.workers[0], "ilm_kv_borrow_total").await,
        0.0
    );
}
