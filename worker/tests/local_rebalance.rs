//! Rebalancing, with real processes in local mode: a home whose two long requests fill its pool
//! while a third waits becomes a debtor; the gManager's placement round plans moves of its
//! blocks to an idle worker and hands them to the home in a heartbeat answer; the home migrates
//! those blocks while the requests decode. Every text is a single big worker's.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{demo_model, greedy_text, metric, pool_view, prompt, start_pool};

/// 49 blocks of prompt each: two of them leave 30 of the home's 128 blocks free.
const LONG_PROMPT: usize = 780;
/// Each long request ends at 80 blocks: together they outgrow the home.
const LONG_NEW_TOKENS: usize = 500;
/// Its first chunk (512 tokens, 32 blocks) does not fit next to the long ones: it waits.
const WAITING_PROMPT: usize = 520;
const WAITING_NEW_TOKENS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_moves_put_a_debtors_blocks_on_an_idle_worker() {
    let (_dir, model) = demo_model();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let reference = start_pool(&model, 1, 512, &[]);
    // worker-0 lends nothing; worker-1 idles and may lend half of its 128 blocks.
    let pool = start_pool(&model, 2, 128, &["--lend-fractions=0,0.5"]);
    let (home, idle) = (pool.workers[0].clone(), pool.workers[1].clone());
    let jobs = [
        (prompt(LONG_PROMPT, 1), LONG_NEW_TOKENS),
        (prompt(LONG_PROMPT, 2), LONG_NEW_TOKENS),
        (prompt(WAITING_PROMPT, 3), WAITING_NEW_TOKENS),
    ];
    let run_all = |base: String| {
        let client = client.clone();
        let jobs = jobs.clone();
        async move {
            let mut tasks = Vec::new();
            for (p, n) in jobs {
                tasks.push(tokio::spawn(greedy_text(
                    client.clone(),
                    base.clone(),
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
    };
    let want = run_all(reference.base.clone()).await;
    // Let the workers' heartbeats make them known to each other.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let got = run_all(home.clone()).await;
    let took = started.elapsed();
    assert_eq!(got, want, "the texts of one big worker");

    let migrated = metric(&client, &home, "ilm_kv_migrated_blocks_total").await;
    assert!(migrated > 0.0, "the home carried out the planned moves");
    assert_eq!(
        metric(&client, &idle, "ilm_kv_migrated_blocks_total").await,
        0.0,
        "the idle worker only received blocks"
    );
    assert_eq!(
        metric(&client, &idle, "ilm_kv_blocks_lent").await,
        0.0,
        "the moved blocks went back when their requests ended"
    );
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
    eprintln!("rebalanced run took {took:?}; {migrated} blocks migrated by planned moves");
}
