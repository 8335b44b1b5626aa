//! Join, with real processes in local mode: a worker started after the pool registers with the
//! gManager, becomes a creditor, and takes blocks of a request that waited, holding what its
//! home had, for a pool large enough. The text is a single big worker's.

mod local_support;

use std::time::Duration;

use local_support::{
    LONG_NEW_TOKENS as NEW_TOKENS, LONG_PROMPT as PROMPT, demo_model, greedy_text, metric, prompt,
    start_pool, until_metric,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_joins_later_lends_to_the_pool() {
    let (_dir, model) = demo_model();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let reference = start_pool(&model, 1, 256, &[]);
    // worker-0 holds 8 blocks and worker-1 lends none: the long request (12 blocks) does not fit.
    let pool = start_pool(&model, 2, 8, &["--lend-fractions=0.5,0"]);
    let home = pool.workers[0].clone();
    let long = prompt(PROMPT, 1);
    let want = greedy_text(
        client.clone(),
        reference.base.clone(),
        long.clone(),
        NEW_TOKENS,
    )
    .await;
    // The request is taken in and waits: the pool it was configured with can hold it, and
    // blocks are borrowed as it grows.
    let waiting = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        long.clone(),
        NEW_TOKENS,
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiting.is_finished(), "12 blocks fit nowhere yet");
    assert_eq!(metric(&client, &home, "ilm_requests_running").await, 1.0);

    // A third worker of 8 blocks lending half joins the running pool; once the home hears of
    // it (its heartbeat reads the pool), the request borrows there and finishes.
    let (_late, late_url) = local_support::start_late_worker(&model, &pool, 8);
    let got = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the request finishes once the pool has grown")
        .unwrap();
    assert_eq!(got, want, "the text of one big worker");
    let home_borrowed = metric(&client, &home, "ilm_kv_borrow_total").await;
    assert!(
        home_borrowed >= 4.0,
        "the home borrowed its 4 missing blocks"
    );
    let late_borrowed = metric(&client, &late_url, "ilm_kv_borrow_total").await;
    assert_eq!(
        late_borrowed, 0.0,
        "the late worker lends, it does not borrow"
    );

    // While a second long request runs, the blocks it borrows sit on the new worker.
    let again = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        prompt(PROMPT, 2),
        NEW_TOKENS,
    ));
    until_metric(
        &client,
        &late_url,
        "ilm_kv_blocks_lent",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    again.await.unwrap();
}
