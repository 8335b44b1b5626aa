//! A creditor that dies, or stops answering, in the middle of a long greedy generation that
//! borrowed from it, with real processes in local mode: the home gives up the blocks held
//! there, recomputes them from the request's token ids on another creditor, and the text is
//! the one a single big worker gives. No request fails and nothing hangs.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{
    LONG_NEW_TOKENS as NEW_TOKENS, LONG_PROMPT as PROMPT, greedy_text, lender, metric, prompt,
    reference_and_three_small, signal,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creditor_lost_mid_generation_costs_a_recompute_not_the_request() {
    let pools = reference_and_three_small().await;
    let (client, reference, pool) = (&pools.client, &pools.reference, &pools.pool);
    let home = pool.workers[0].clone();
    let long = |salt| prompt(PROMPT, salt);
    let recomputed = "ilm_kv_recomputed_blocks_total";

    // kill -9: the connection closes, and the home notices at once.
    let want = greedy_text(client.clone(), reference.base.clone(), long(1), NEW_TOKENS).await;
    let request = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        long(1),
        NEW_TOKENS,
    ));
    let creditor = lender(client, pool, &[1, 2]).await;
    wait_for_tokens(client, &home, 10.0).await;
    let killed = Instant::now();
    signal(pool.pids[creditor], "-9");
    let noticed = until_increases(client, &home, recomputed, 0.0).await;
    assert_eq!(request.await.unwrap(), want, "the text after the crash");
    assert!(
        metric(client, &home, "ilm_kv_borrow_total").await >= 8.0,
        "the lost blocks were borrowed again"
    );
    assert_eq!(metric(client, &home, "ilm_peer_losses_total").await, 1.0);
    eprintln!(
        "kill -9 of a creditor: the home was recomputing after {:?}",
        noticed - killed
    );

    // SIGSTOP: the connection stays open but nothing answers; the home gives up on it after
    // the peer timeout instead of waiting for ever.
    let survivor = 3 - creditor;
    let before = metric(client, &home, recomputed).await;
    let want = greedy_text(client.clone(), reference.base.clone(), long(2), NEW_TOKENS).await;
    let request = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        long(2),
        NEW_TOKENS,
    ));
    assert_eq!(lender(client, pool, &[survivor]).await, survivor);
    let generated = metric(client, &home, "ilm_generation_tokens_total").await;
    wait_for_tokens(client, &home, generated + 10.0).await;
    let stopped = Instant::now();
    signal(pool.pids[survivor], "-STOP");
    let noticed = until_increases(client, &home, recomputed, before).await;
    let waited = noticed - stopped;
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "a silent creditor is given up after the peer timeout, not {waited:?}"
    );
    // Back to life, it takes back what the home held there and lends again.
    signal(pool.pids[survivor], "-CONT");
    assert_eq!(request.await.unwrap(), want, "the text after the stall");
    eprintln!("SIGSTOP of a creditor: the home was recomputing after {waited:?}");
}

async fn wait_for_tokens(client: &reqwest::Client, home: &str, at_least: f64) {
    local_support::until_metric(
        client,
        home,
        "ilm_generation_tokens_total",
        at_least,
        Duration::from_secs(30),
    )
    .await;
}

/// Waits until `name` on `base` rises above `from`; returns when it did.
async fn until_increases(client: &reqwest::Client, base: &str, name: &str, from: f64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(client, base, name).await <= from {
        assert!(Instant::now() < deadline, "{name} never rose above {from}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Instant::now()
}
