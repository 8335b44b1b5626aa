//! Blocks come home from a creditor that became busy, with real processes in local mode: a
//! request that started on a creditor's blocks (its home was full) keeps them only while that
//! creditor has nothing of its own to do. Once the creditor serves a request of its own (every
//! step of the borrower would wait for its steps) and blocks free up at home, the home moves
//! them back while the request decodes, and its text is still one big worker's.

mod local_support;

use std::time::Duration;

use local_support::{demo_model, greedy_text, metric, prompt, start_pool, until_metric};

const BLOCK_TOKENS: usize = 16;
/// Blocks a worker holds.
const POOL: usize = 256;
/// 238 of the home's 256 blocks: the next request's first chunk (512 tokens, 32 blocks) does
/// not fit beside it.
const FULL_PROMPT: usize = 3800;
/// Fits its home (250 blocks) and decodes for seconds: long enough for the creditor's change
/// to reach the home in heartbeats (a second or two) before it ends.
const BORROWER: (usize, usize) = (800, 3200);

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

    let filler = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        prompt(FULL_PROMPT, 1),
        16,
    ));
    let full = (FULL_PROMPT / BLOCK_TOKENS) as f64;
    until_metric(
        &client,
        &home,
        "ilm_kv_blocks_used",
        full,
        Duration::from_secs(60),
    )
    .await;
    let mut request = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        borrower,
        BORROWER.1,
    ));
    until_metric(
        &client,
        &creditor,
        "ilm_kv_blocks_lent",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    // The creditor gets a request of its own, within what it keeps after lending.
    let own = tokio::spawn(greedy_text(
        client.clone(),
        creditor.clone(),
        prompt(50, 3),
        3000,
    ));
    filler.await.unwrap();

    let came_home = loop {
        tokio::select! {
            _ = &mut request => break false,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if metric(&client, &creditor, "ilm_kv_blocks_lent").await == 0.0 {
                    break true;
                }
            }
        }
    };
    assert!(
        came_home,
        "the request ended with its blocks still on the busy creditor"
    );
    let text = request.await.unwrap();
    assert_eq!(text, want, "the text of a request whose blocks moved home");
    assert!(metric(&client, &home, "ilm_kv_migrated_blocks_total").await > 0.0);
    own.abort();
}
