//! Rebalancing, with real processes in local mode: a home whose two long requests fill its pool
//! while a third waits, with no worker to borrow from, becomes a debtor. When a worker joins,
//! the home's blocks reach it two ways, racing: the gManager's placement round plans moves of
//! the home's blocks and hands them to the home in a heartbeat answer (the home migrates them
//! while the requests decode), and the home borrows on it as its requests grow (the advice
//! names it within a heartbeat, and borrowing needs no placement round, so it often wins).
//! Which of them happens, if any before the requests end, depends on timing (it varies from run
//! to run on a loaded machine), so the test asserts what holds in every case: every text is a
//! single big worker's, the newcomer migrates nothing of its own, its loans come back, and what
//! the home migrated is what the gManager reports. (With a lender there from the start, the
//! borrowing is asserted: `local_growth`.)

mod local_support;

use std::time::{Duration, Instant};

use local_support::{demo_model, greedy_text, metric, pool_view, prompt, start_pool, until_zero};

/// 49 blocks of prompt each: two of them leave 30 of the home's 128 blocks free.
const LONG_PROMPT: usize = 780;
/// Its first chunk (512 tokens, 32 blocks) does not fit next to the long ones: it waits.
const WAITING_PROMPT: usize = 520;
const WAITING_NEW_TOKENS: usize = 16;

/// The two long requests and the waiting one, sent in order to `base`; their texts.
async fn run_all(client: &reqwest::Client, base: &str, long_new_tokens: usize) -> Vec<String> {
    let jobs = [
        (prompt(LONG_PROMPT, 1), long_new_tokens),
        (prompt(LONG_PROMPT, 2), long_new_tokens),
        (prompt(WAITING_PROMPT, 3), WAITING_NEW_TOKENS),
    ];
    let mut tasks = Vec::new();
    for (p, n) in jobs {
        tasks.push(tokio::spawn(greedy_text(
            client.clone(),
            base.to_owned(),
            p,
            n,
        )));
        // In order, so the short one arrives last and waits.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut texts = Vec::new();
    for t in tasks {
        texts.push(t.await.unwrap());
    }
    texts
}

/// Long enough that the requests still run once a worker started after them has joined; each
/// ends at 93 blocks, so the two fit in the home's 128 and the newcomer's 64 lendable.
const LATE_LONG_NEW_TOKENS: usize = 700;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_mid_request_changes_no_text_and_the_ledger_agrees() {
    let (_dir, model) = demo_model();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let reference = start_pool(&model, 1, 512, &[]);
    let want = run_all(&client, &reference.base, LATE_LONG_NEW_TOKENS).await;
    // One worker that lends nothing: a debtor with nowhere to move blocks, until one joins.
    let pool = start_pool(&model, 1, 128, &["--lend-fractions=0"]);
    let home = pool.workers[0].clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let requests = tokio::spawn({
        let (client, home) = (client.clone(), home.clone());
        async move { run_all(&client, &home, LATE_LONG_NEW_TOKENS).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&client, &home, "ilm_kv_migrated_blocks_total").await,
        0.0,
        "nowhere to move blocks yet"
    );
    let (_late, late_url) = local_support::start_late_worker(&model, &pool, 128);
    // The home's blocks sit on the newcomer while the requests run.
    let mut held = 0.0;
    while !requests.is_finished() && held == 0.0 {
        held = lent_now(&client, &late_url).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = requests.await.unwrap();
    let took = started.elapsed();
    assert_eq!(got, want, "the texts of one big worker");
    let migrated = metric(&client, &home, "ilm_kv_migrated_blocks_total").await;
    assert_eq!(
        metric(&client, &late_url, "ilm_kv_migrated_blocks_total").await,
        0.0,
        "the newcomer only received blocks"
    );
    // They go back when their requests end (the release trails the answer).
    until_zero(
        &client,
        std::slice::from_ref(&late_url),
        "ilm_kv_blocks_lent",
    )
    .await;
    // The next heartbeat carries the figure to the gManager.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = pool_view(&client, &pool)
            .await
            .expect("the gManager answers");
        let reported = view["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["worker_id"] == "worker-0")
            .map_or(0.0, |w| w["migrated_blocks"].as_f64().unwrap_or(0.0));
        if reported == migrated {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gManager reports {reported} migrated blocks, the home {migrated}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "with a worker started later: {took:?}; {migrated} blocks migrated, {held} seen on it"
    );
}

/// `ilm_kv_blocks_lent` of a worker, 0 while it does not answer yet.
async fn lent_now(client: &reqwest::Client, base: &str) -> f64 {
    let Ok(resp) = client.get(format!("{base}/metrics")).send().await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("ilm_kv_blocks_lent ")?.trim().parse().ok())
        .unwrap_or(0.0)
}
