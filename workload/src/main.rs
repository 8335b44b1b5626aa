//! `infinite-llm-loadgen`: replays a seeded trace against an OpenAI endpoint and reports
//! throughput, TTFT and inter-token latency percentiles.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use infinite_llm_workload::measure::Target;
use infinite_llm_workload::plan::{Shaping, plan};
use infinite_llm_workload::prompt::DEFAULT_TOKEN_IDS;
use infinite_llm_workload::replay::replay;
use infinite_llm_workload::report::Report;
use infinite_llm_workload::trace::TraceConfig;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Trace {
    /// Prompts from 1 to 60K tokens, log-uniform.
    Short,
    /// A quarter of the prompts Pareto-distributed from 60K up to 2M tokens, the rest short.
    Long,
}

/// Streams `/v1/completions` requests with token-id prompts of the trace's lengths at the trace's
/// arrival times (greedy, `ignore_eos`), then prints a report.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The server, without `/v1`.
    #[arg(long, env = "ILM_LOADGEN_URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Sent as a bearer token.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long, default_value = "demo")]
    model: String,
    #[arg(long, value_enum, default_value = "short")]
    trace: Trace,
    /// Requests per second against the endpoint [default: the trace's rate for one instance].
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of trace to replay [default: the trace's 600].
    #[arg(long)]
    duration: Option<f64>,
    /// Replay at most this many requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Seeds the trace and the prompts [default: the trace's].
    #[arg(long)]
    seed: Option<u64>,
    /// Multiplies arrival times (0.5 replays twice as fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Multiplies prompt and output lengths, for models with short contexts.
    #[arg(long, default_value_t = 1.0)]
    scale_tokens: f64,
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    #[arg(long)]
    max_output_tokens: Option<usize>,
    /// Requests in flight at most; later arrivals wait [default: no cap].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Also report the TTFT of the requests whose prompt plus max_tokens is at most this many
    /// tokens (those a cluster of smaller pools serves too).
    #[arg(long)]
    fit_tokens: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    for (name, value) in [
        ("--time-scale", Some(args.time_scale)),
        ("--scale-tokens", Some(args.scale_tokens)),
        ("--rate", args.rate),
        ("--duration", args.duration),
    ] {
        anyhow::ensure!(
            value.is_none_or(|v| v > 0.0 && v.is_finite()),
            "{name} must be a positive number"
        );
    }
    anyhow::ensure!(
        args.concurrency != Some(0),
        "--concurrency must be at least 1"
    );

    let mut trace = match args.trace {
        Trace::Short => TraceConfig::short(),
        Trace::Long => TraceConfig::long(),
    };
    trace.rate_per_instance = args.rate.unwrap_or(trace.rate_per_instance);
    trace.duration_s = args.duration.unwrap_or(trace.duration_s);
    trace.seed = args.seed.unwrap_or(trace.seed);
    let shaping = Shaping {
        scale_tokens: args.scale_tokens,
        max_prompt_tokens: args.max_prompt_tokens,
        max_output_tokens: args.max_output_tokens,
        time_scale: args.time_scale,
    };
    let planned = plan(&trace, args.requests, &shaping);
    tracing::info!(
        trace = trace.name,
        requests = planned.len(),
        prompt_tokens = planned.iter().map(|p| p.prompt_tokens).sum::<usize>(),
        max_tokens = planned.iter().map(|p| p.max_tokens).sum::<usize>(),
        last_arrival_s = planned.last().map_or(0.0, |p| p.at.as_secs_f64()),
        url = args.url,
        "replaying"
    );
    let target = Target::new(
        &args.url,
        args.api_key,
        args.model,
        trace.seed,
        DEFAULT_TOKEN_IDS,
        Duration::from_secs(args.timeout_secs),
    )
    .context("setting up the client")?;
    let replayed = replay(target, planned, args.concurrency).await;
    // One line a request (RUST_LOG=infinite_llm_loadgen=debug), to find what made a tail slow.
    for o in &replayed.outcomes {
        tracing::debug!(
            index = o.index,
            sent_ms = o.sent.as_millis() as u64,
            prompt_tokens = o.prompt_tokens,
            max_tokens = o.max_tokens,
            status = ?o.status,
            ttft_ms = o.ttft.map(|t| t.as_millis() as u64),
            e2e_ms = o.e2e.as_millis() as u64,
            "request"
        );
    }
    let report = match args.fit_tokens {
        Some(n) => Report::of(&replayed).with_fitting(&replayed, n),
        None => Report::of(&replayed),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
