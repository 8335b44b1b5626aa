//! Graceful leave under load, with real processes in local mode: `POST /drain` on a worker that
//! lends blocks to a long generation while other requests come and go. The drained worker takes
//! no new requests (the front door sends them elsewhere), asks the home to take its blocks back
//! (the home copies them to the other creditor while the generation goes on, recomputing
//! nothing), answers once nothing depends on it, leaves the gManager and exits. No request
//! fails and every text is a single big worker's.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{
    LONG_NEW_TOKENS as NEW_TOKENS, LONG_PROMPT as PROMPT, greedy_text, lender, metric, pool_view,
    prompt, reference_and_three_small, until_metric,
};

/// Short requests fit in any worker: 3 blocks each.
const SHORT: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_creditor_under_load_fails_no_request() {
    let pools = reference_and_three_small().await;
    let (client, reference, pool) = (&pools.client, &pools.reference, &pools.pool);
    let home = pool.workers[0].clone();
    let long = prompt(PROMPT, 1);
    let shorts: Vec<Vec<u32>> = (0..6).map(|k| prompt(SHORT, k + 2)).collect();
    let want = greedy_text(
        client.clone(),
        reference.base.clone(),
        long.clone(),
        NEW_TOKENS,
    )
    .await;
    let mut wants = Vec::new();
    for p in &shorts {
        wants.push(greedy_text(client.clone(), reference.base.clone(), p.clone(), SHORT).await);
    }
    let short = |k: usize| {
        tokio::spawn(greedy_text(
            client.clone(),
            pool.base.clone(),
            shorts[k].clone(),
            SHORT,
        ))
    };

    let request = tokio::spawn(greedy_text(
        client.clone(),
        home.clone(),
        long.clone(),
        NEW_TOKENS,
    ));
    let drained = lender(client, pool, &[1, 2]).await;
    let creditor = pool.workers[drained].clone();
    until_metric(
        client,
        &home,
        "ilm_generation_tokens_total",
        10.0,
        Duration::from_secs(30),
    )
    .await;
    let before: Vec<_> = (0..3).map(short).collect();
    let started = Instant::now();
    let drain = tokio::spawn({
        let (client, url, token) = (client.clone(), creditor.clone(), pool.token.clone());
        async move {
            client
                .post(format!("{url}/drain"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    });
    // Requests that arrive while it drains (or once it is gone) go to the other workers.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let during: Vec<_> = (3..6).map(short).collect();

    let answer = drain.await.unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["status"], "drained");
    let took = started.elapsed();
    assert_eq!(request.await.unwrap(), want, "the long generation's text");
    for (k, task) in before.into_iter().chain(during).enumerate() {
        assert_eq!(task.await.unwrap(), wants[k], "short request {k}");
    }
    let migrated = metric(client, &home, "ilm_kv_migrated_blocks_total").await;
    assert!(
        migrated >= 4.0,
        "the home copied the 4 blocks off the draining worker, not {migrated}"
    );
    assert_eq!(
        metric(client, &home, "ilm_kv_recomputed_blocks_total").await,
        0.0,
        "the other creditor had room: nothing was recomputed"
    );

    // Drained, it leaves the gManager and exits.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive = client
            .get(format!("{creditor}/health"))
            .send()
            .await
            .is_ok();
        let listed = pool_view(client, pool).await.is_some_and(|v| {
            v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["api_url"] == creditor.as_str())
        });
        if !alive && !listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the drained worker is still up ({alive}) or listed ({listed})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pool serves on without it.
    assert_eq!(
        greedy_text(client.clone(), pool.base.clone(), shorts[0].clone(), SHORT).await,
        wants[0]
    );
    eprintln!("drain of a creditor under load answered after {took:?}, {migrated} blocks migrated");
}
