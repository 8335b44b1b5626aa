//! The load generator against a real local-mode pool: a small trace replayed at its arrival
//! times, every request accounted for, and the latencies it reports consistent with what the
//! server streamed.

mod local_support;

use std::time::Duration;

use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model_if_missing};
use infinite_llm_workload::measure::{Outcome, Status, Target};
use infinite_llm_workload::plan::{Planned, Shaping, plan};
use infinite_llm_workload::prompt::DEFAULT_TOKEN_IDS;
use infinite_llm_workload::replay::replay;
use infinite_llm_workload::report::Report;
use infinite_llm_workload::trace::TraceConfig;
use local_support::start_pool;

fn target(base: &str) -> Target {
    Target::new(
        base,
        None,
        "demo".to_owned(),
        7,
        DEFAULT_TOKEN_IDS,
        Duration::from_secs(60),
    )
    .unwrap()
}

/// What a successful streamed request must satisfy, whatever the timing.
fn check_ok(o: &Outcome, planned: &Planned) {
    assert_eq!(o.status, Status::Ok, "request {}", o.index);
    assert!(o.sent >= planned.at, "request {} sent early", o.index);
    assert_eq!(
        o.output_tokens, planned.max_tokens,
        "ignore_eos: all asked for"
    );
    assert_eq!(
        o.usage_tokens,
        Some(planned.max_tokens),
        "the server's usage agrees"
    );
    assert_eq!(o.itl.len(), o.output_tokens - 1);
    let ttft = o.ttft.expect("a first token");
    assert!(ttft + o.itl.iter().sum::<Duration>() <= o.e2e, "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_trace_is_fully_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("demo");
    write_demo_model_if_missing(&model, &DemoModelSpec::default()).unwrap();
    // Two workers of 1024 tokens each, lending half: 1536 tokens is the longest context.
    let pool = start_pool(&model, 2, 64, &["--lend-fraction=0.5"]);

    let mut trace = TraceConfig::short();
    trace.rate_per_instance = 20.0;
    let shaping = Shaping {
        scale_tokens: 0.01,
        max_prompt_tokens: Some(500),
        max_output_tokens: Some(12),
        time_scale: 1.0,
    };
    let mut requests = plan(&trace, Some(16), &shaping);
    assert!(requests.iter().any(|p| p.max_tokens > 1));
    // One more than the pool can ever hold: refused with 400, and counted as such.
    let last = requests.last().unwrap().at;
    requests.push(Planned {
        index: requests.len(),
        at: last,
        prompt_tokens: 3000,
        max_tokens: 8,
    });

    let replayed = replay(target(&pool.base), requests.clone(), None).await;
    assert_eq!(replayed.outcomes.len(), requests.len());
    for (o, p) in replayed.outcomes.iter().zip(&requests) {
        assert_eq!(o.index, p.index);
        if p.prompt_tokens == 3000 {
            assert_eq!(o.status, Status::Http(400));
            assert_eq!((o.output_tokens, o.ttft), (0, None));
        } else {
            check_ok(o, p);
        }
    }
    assert!(replayed.wall >= last, "the replay spans the trace");

    let report = Report::of(&replayed);
    let asked: usize = requests[..16].iter().map(|p| p.max_tokens).sum();
    assert_eq!((report.requests, report.ok, report.failed), (17, 16, 1));
    assert_eq!(report.failures.get("400"), Some(&1));
    assert_eq!(report.output_tokens, asked);
    let per_s = asked as f64 / replayed.wall.as_secs_f64();
    assert!((report.output_tokens_per_s - per_s).abs() < 1e-9 * per_s);
    let (p50, p99) = (report.ttft_ms.p50.unwrap(), report.ttft_ms.p99.unwrap());
    assert!(p50 <= p99 && p99 <= report.e2e_ms.p99.unwrap());

    // Capped at one in flight, each request is sent only once the one before has ended.
    let replayed = replay(target(&pool.base), requests[..4].to_vec(), Some(1)).await;
    for pair in replayed.outcomes.windows(2) {
        check_ok(&pair[1], &requests[pair[1].index]);
        assert!(pair[1].sent >= pair[0].sent + pair[0].e2e, "{pair:?}");
    }
}
