//! Decode time per token with half of a request's KV on a creditor (DistAttention over loopback
//! TCP) against the same request with all of its KV local, same model, same context, same run.
//! Run with `make bench`.

use std::time::Instant;

use infinite_llm_protocol::gmanager::Creditor;
use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model};
use infinite_llm_worker::engine::{self, ClusterOptions, EngineHandle, EngineOptions};
use infinite_llm_worker::request::{Event, GenerateRequest};

const BLOCK_TOKENS: usize = 16;
const CONTEXT: usize = 2048;
const NEW_TOKENS: usize = 64;

fn member(id: &str, kv_blocks: usize) -> EngineOptions {
    EngineOptions {
        kv_blocks: Some(kv_blocks),
        lend_fraction: 1.0,
        cluster: Some(ClusterOptions {
            worker_id: id.into(),
            peer_listen: "127.0.0.1:0".parse().unwrap(),
            token: infinite_llm_worker::server::Secret::new("bench"),
            transport: Default::default(),
            rejects: Default::default(),
        }),
        ..EngineOptions::default()
    }
}

/// Seconds per decoded token (after the first) and the tokens themselves.
fn decode(rt: &tokio::runtime::Runtime, engine: &EngineHandle) -> (f64, Vec<u32>) {
    let prompt: Vec<u32> = (0..(CONTEXT - NEW_TOKENS) as u32)
        .map(|i| (i * 7919 + 3) % 1000)
        .collect();
    let mut rx = engine
        .submit(GenerateRequest::greedy(prompt, NEW_TOKENS))
        .unwrap();
    rt.block_on(async {
        let mut tokens = Vec::new();
        let mut start = Instant::now();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { id, .. } => {
                    if tokens.is_empty() {
                        start = Instant::now();
                    }
                    tokens.push(id);
                }
                Event::Failed { message, .. } => panic!("{message}"),
                Event::Finished { .. } => break,
            }
        }
        (
            start.elapsed().as_secs_f64() / (tokens.len() - 1) as f64,
            tokens,
        )
    })
}

/// Rounds of (all local, split). Each round compares two runs made a second apart, and the
/// median over rounds shrugs off the rounds that other processes on the machine slowed down.
const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    write_demo_model(dir.path(), &DemoModelSpec::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blocks = CONTEXT / BLOCK_TOKENS;

    let local = engine::start(dir.path(), member("local", 2 * blocks)).unwrap();
    let creditor = engine::start(dir.path(), member("creditor", 2 * blocks)).unwrap();
    let home = engine::start(dir.path(), member("home", blocks / 2)).unwrap();
    home.set_creditors(vec![Creditor {
        worker_id: "creditor".into(),
        peer_addr: creditor.peer_addr().unwrap().to_string(),
        lendable_blocks: 2 * blocks as u64,
        running_requests: 0,
    }]);
    let (mut t_local, mut t_split, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut want = None;
    for _ in 0..ROUNDS {
        let (l, a) = decode(&rt, &local);
        let (s, b) = decode(&rt, &home);
        assert_eq!(a, b, "the split request must produce the same tokens");
        assert_eq!(&a, want.get_or_insert_with(|| a.clone()));
        t_local.push(l);
        t_split.push(s);
        ratios.push(s / l);
    }
    // Each split request borrows anew: the previous one gave its blocks back.
    let borrowed = home.stats().kv_borrow_total / ROUNDS as u64;
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));

    println!(
        "demo model (hidden 256, 4 layers, 8/2 heads); context {CONTEXT} tokens, {NEW_TOKENS} decoded; {} threads per engine; median of {ROUNDS} rounds",
        rayon::current_num_threads()
    );
    println!(
        "all KV local:                  {:7.2} ms/token",
        median(t_local) * 1e3
    );
    println!(
        "half the KV on a creditor:     {:7.2} ms/token  ({borrowed} blocks borrowed over loopback TCP)",
        median(t_split) * 1e3
    );
    println!(
        "ratio split / local:           {:7.2}x  (rounds from {lo:.2}x to {hi:.2}x)",
        median(ratios)
    );
}
