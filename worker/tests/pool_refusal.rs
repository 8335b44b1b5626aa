//! Creditors that refuse: engines in one process, peers over loopback TCP, and creditor advice
//! set by the test so that it names workers that cannot lend (a stale gManager view). The home
//! must pass over a refusing creditor, or keep what it holds and ask again, and the request's
//! text must equal one big worker's.

use std::time::{Duration, Instant};

use infinite_llm_protocol::gmanager::Creditor;
use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model};
use infinite_llm_worker::engine::{self, ClusterOptions, EngineHandle, EngineOptions, EngineStats};
use infinite_llm_worker::request::{Event, GenerateRequest};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::mpsc::error::TryRecvError;

const PROMPT: usize = 150;
const NEW_TOKENS: usize = 20;

fn options(id: &str, kv_blocks: usize, lend_fraction: f64) -> EngineOptions {
    EngineOptions {
        kv_blocks: Some(kv_blocks),
        lend_fraction,
        cluster: Some(ClusterOptions {
            worker_id: id.into(),
            peer_listen: "127.0.0.1:0".parse().unwrap(),
            token: infinite_llm_worker::server::Secret::new("test"),
            transport: Default::default(),
            rejects: Default::default(),
        }),
        ..EngineOptions::default()
    }
}

/// Advice that claims `engine` can lend plenty, whatever it really can.
fn advised(id: &str, engine: &EngineHandle) -> Creditor {
    Creditor {
        worker_id: id.into(),
        peer_addr: engine.peer_addr().unwrap().to_string(),
        lendable_blocks: 64,
        running_requests: 0,
    }
}

fn submit(engine: &EngineHandle) -> UnboundedReceiver<Event> {
    let prompt = (0..PROMPT as u32).map(|i| (i * 7919 + 3) % 1000).collect();
    engine
        .submit(GenerateRequest::greedy(prompt, NEW_TOKENS))
        .unwrap()
}

fn tokens(mut rx: UnboundedReceiver<Event>) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { id, .. } => out.push(id),
            Event::Failed { message, .. } => panic!("the request failed: {message}"),
            Event::Finished { .. } => break,
        }
    }
    out
}

/// Waits until `cond` holds for `engine`'s stats; panics after a generous deadline (a hang).
fn until(engine: &EngineHandle, what: &str, cond: impl Fn(&EngineStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond(&engine.stats()) {
        assert!(
            Instant::now() < deadline,
            "never {what}: {:?}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_refusing_creditor_is_passed_over_or_waited_out_and_the_text_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    write_demo_model(dir.path(), &DemoModelSpec::default()).unwrap();
    let big = engine::start(
        dir.path(),
        EngineOptions {
            kv_blocks: Some(64),
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let want = tokens(submit(&big));
    assert_eq!(want.len(), NEW_TOKENS);

    // 170 tokens need 11 blocks: 4 at home, 7 borrowed.
    let home = engine::start(dir.path(), options("home", 4, 0.0)).unwrap();
    let never = engine::start(dir.path(), options("never", 16, 0.0)).unwrap();
    let some = engine::start(dir.path(), options("some", 16, 0.25)).unwrap();
    let plenty = engine::start(dir.path(), options("plenty", 16, 1.0)).unwrap();

    // First advised: a creditor whose lend cap is 0. It refuses; the next one lends.
    home.set_creditors(vec![advised("never", &never), advised("plenty", &plenty)]);
    assert_eq!(tokens(submit(&home)), want);
    let s = home.stats();
    assert!(s.kv_borrow_refusals_total >= 1, "{s:?}");
    assert_eq!(s.kv_borrow_total, 7);
    assert_eq!(never.stats().kv_blocks_lent, 0);
    until(&plenty, "took its blocks back", |s| s.kv_blocks_lent == 0);

    // Nobody advised can lend all 7: one refuses, one has only 4. The request grows into what
    // it can hold (4 blocks here, 4 borrowed), keeps them, and asks again for the rest.
    home.set_creditors(vec![advised("never", &never), advised("some", &some)]);
    let refused = home.stats().kv_borrow_refusals_total;
    let mut rx = submit(&home);
    until(&home, "asked twice more", |s| {
        s.kv_borrow_refusals_total >= refused + 2
    });
    until(&some, "lent all it may", |s| s.kv_blocks_lent == 4);
    assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    let s = home.stats();
    assert_eq!(
        (s.waiting, s.running, s.kv_blocks_used, s.kv_blocks_borrowed),
        (0, 1, 4, 4),
        "{s:?}"
    );

    // Fresh advice with room: the waiting request borrows, runs, and its text is unchanged.
    home.set_creditors(vec![
        advised("never", &never),
        advised("some", &some),
        advised("plenty", &plenty),
    ]);
    assert_eq!(tokens(rx), want);
    until(&some, "took its blocks back", |s| s.kv_blocks_lent == 0);
    until(&plenty, "took its blocks back", |s| s.kv_blocks_lent == 0);
    until(&home, "freed its blocks", |s| {
        s.kv_blocks_used == 0 && s.kv_blocks_borrowed == 0
    });
}
