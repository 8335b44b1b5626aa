//! The gManager's state is soft, with real processes in local mode: `kill -9` of the gManager
//! while requests (one of them borrowing) run. Serving goes on with the placements made, the
//! launcher starts the gManager again, the workers re-register and re-report, and its pool view
//! then lists every worker with the figures the worker itself shows. Nothing is lost.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{
    LONG_NEW_TOKENS as NEW_TOKENS, LONG_PROMPT as PROMPT, Pool, greedy_text, metric, pool_view,
    prompt, reference_and_three_small, signal, until_metric,
};

const SHORT: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gmanager_loses_nothing() {
    let pools = reference_and_three_small().await;
    let (client, reference, pool) = (&pools.client, &pools.reference, &pools.pool);
    let long = |salt| prompt(PROMPT, salt);
    let shorts: Vec<Vec<u32>> = (0..4).map(|k| prompt(SHORT, k + 3)).collect();
    let want = greedy_text(client.clone(), reference.base.clone(), long(1), NEW_TOKENS).await;
    let mut wants = Vec::new();
    for p in &shorts {
        wants.push(greedy_text(client.clone(), reference.base.clone(), p.clone(), SHORT).await);
    }

    let home = pool.workers[0].clone();
    let request = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        long(1),
        NEW_TOKENS,
    ));
    let others: Vec<_> = shorts
        .iter()
        .map(|p| {
            tokio::spawn(greedy_text(
                client.clone(),
                pool.base.clone(),
                p.clone(),
                SHORT,
            ))
        })
        .collect();
    until_metric(
        client,
        &home,
        "ilm_generation_tokens_total",
        5.0,
        Duration::from_secs(30),
    )
    .await;
    signal(pool.gmanager_pid, "-9");
    let killed = Instant::now();
    assert_eq!(request.await.unwrap(), want, "the borrowing request");
    for (k, task) in others.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), wants[k], "short request {k}");
    }

    // Started again, the gManager hears from every worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while listed(client, pool).await < 3 {
        assert!(
            Instant::now() < deadline,
            "the workers are not all back in the gManager's view"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "gManager killed: all workers listed again after {:?}",
        killed.elapsed()
    );
    // Borrowing works on the new gManager's advice, from another home.
    let want = greedy_text(client.clone(), reference.base.clone(), long(2), NEW_TOKENS).await;
    let before = metric(client, &pool.workers[1], "ilm_kv_borrow_total").await;
    let got = greedy_text(client.clone(), pool.workers[1].clone(), long(2), NEW_TOKENS).await;
    assert_eq!(got, want);
    assert!(metric(client, &pool.workers[1], "ilm_kv_borrow_total").await > before);

    // Once the figures settle, the ledger equals what each worker shows.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mismatches = compare(client, pool).await;
        if mismatches.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gManager's view differs: {mismatches:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn listed(client: &reqwest::Client, pool: &Pool) -> usize {
    pool_view(client, pool)
        .await
        .map_or(0, |v| v["workers"].as_array().unwrap().len())
}

/// Each worker's figures in the gManager's view against its own `/metrics`.
async fn compare(client: &reqwest::Client, pool: &Pool) -> Vec<String> {
    let Some(view) = pool_view(client, pool).await else {
        return vec!["no pool view".into()];
    };
    let mut out = Vec::new();
    for url in &pool.workers {
        let Some(w) = view["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["api_url"] == url.as_str())
        else {
            out.push(format!("{url} is not listed"));
            continue;
        };
        let lent = metric(client, url, "ilm_kv_blocks_lent").await;
        let expected = [
            (
                "total_blocks",
                metric(client, url, "ilm_kv_blocks_total").await,
            ),
            (
                "used_blocks",
                metric(client, url, "ilm_kv_blocks_used").await - lent,
            ),
            ("lent_blocks", lent),
            (
                "borrowed_blocks",
                metric(client, url, "ilm_kv_blocks_borrowed").await,
            ),
            (
                "running_requests",
                metric(client, url, "ilm_requests_running").await,
            ),
            (
                "waiting_requests",
                metric(client, url, "ilm_requests_waiting").await,
            ),
        ];
        for (field, want) in expected {
            let got = w["pool"][field].as_f64().unwrap();
            if got != want {
                out.push(format!(
                    "{url} {field}: {got} in the view, {want} at the worker"
                ));
            }
        }
    }
    out
}
