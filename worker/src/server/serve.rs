//! `infinite-llm-worker serve`: flags, model loading, and the process lifecycle (listen at once,
//! turn ready when the model is loaded, drain on SIGTERM/SIGINT or `POST /drain`, leave the
//! gManager, exit).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use infinite_llm_policy::StepRule;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{DEFAULT_MAX_BODY_BYTES, Secret, Server, ServerConfig};
use crate::demo_model::{DemoModelSpec, write_demo_model_if_missing};
use crate::engine::{self, Device, EngineHandle, EngineOptions};
use crate::gmanager_client::GManagerClient;
use crate::peer::Transport;
use crate::tokenizer::TextTokenizer;

/// Where the demo model goes when no model folder is given (relative to the working directory).
pub const DEMO_MODEL_DIR: &str = "models/demo";

/// How long the HTTP side may take to flush final bytes once requests are done.
const HTTP_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Engine sizing flags, shared by `serve` and `local` (which passes them on to its workers).
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Tokens per rBlock (a power of two).
    #[arg(long, env = "ILM_BLOCK_TOKENS", default_value_t = EngineOptions::default().block_tokens)]
    pub block_tokens: usize,
    /// Size of this worker's KV pool in rBlocks [default: as many as 2 GiB holds].
    #[arg(long, env = "ILM_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    /// Most requests in one running batch.
    #[arg(long, env = "ILM_MAX_NUM_SEQS", default_value_t = EngineOptions::default().max_num_seqs)]
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decodes) in one engine step. Decodes go first, then
    /// prefill chunks, short prompts ahead of long ones.
    #[arg(long, env = "ILM_MAX_BATCHED_TOKENS", default_value_t = StepRule::default().max_batched_tokens)]
    pub max_batched_tokens: usize,
    /// A prompt with more tokens than this left to prefill is long: short ones go ahead of it.
    #[arg(long, env = "ILM_LONG_PREFILL_TOKENS", default_value_t = StepRule::default().long_prefill_tokens)]
    pub long_prefill_tokens: usize,
    /// The most of a step's token budget one long prefill takes while other requests want
    /// the step (0 to 1).
    #[arg(long, env = "ILM_LONG_PREFILL_SHARE", default_value_t = StepRule::default().long_prefill_share)]
    pub long_prefill_share: f64,
    /// The most attention (query, key) pairs one long prefill chunk does in a step shared
    /// with other requests, so steps stay short deep into a long context (0: no bound).
    #[arg(long, env = "ILM_LONG_PREFILL_PAIRS", default_value_t = StepRule::default().long_prefill_pairs)]
    pub long_prefill_pairs: u64,
    /// Most requests queued before new ones get 429.
    #[arg(long, env = "ILM_MAX_WAITING", default_value_t = EngineOptions::default().max_waiting)]
    pub max_waiting: usize,
    /// Share of this worker's pool that other workers may borrow at once (0 to 1).
    #[arg(long, env = "ILM_LEND_FRACTION", default_value_t = EngineOptions::default().lend_fraction)]
    pub lend_fraction: f64,
    /// How long a request may wait for KV blocks (to start, or to start again after it
    /// yielded them) before it gets a retryable 503.
    #[arg(long, env = "ILM_QUEUE_TIMEOUT_SECS", default_value_t = EngineOptions::default().queue_timeout.as_secs_f64(), value_parser = parse_seconds)]
    pub queue_timeout_secs: f64,
    /// Workers the pool is configured with, this one included: requests up to this worker's
    /// pool plus their lend caps are accepted (and wait for blocks) even before all have joined.
    #[arg(long, env = "ILM_POOL_WORKERS", default_value_t = EngineOptions::default().pool_workers)]
    pub pool_workers: usize,
    /// On a GPU, the share of the memory left after the weights that the KV pool takes (0 to 1).
    #[arg(long, env = "ILM_GPU_MEMORY_FRACTION", default_value_t = EngineOptions::default().gpu_memory_fraction)]
    pub gpu_memory_fraction: f64,
    /// Benchmarks only: take every prompt as already in the KV cache but its last token, to
    /// time decode at contexts too long to prefill; the outputs mean nothing.
    #[arg(long, env = "ILM_UNFILLED_PROMPTS")]
    pub unfilled_prompts: bool,
    /// On a GPU, run every kernel of a decode step one by one instead of replaying recorded
    /// CUDA graphs (for debugging and for comparing the two).
    #[arg(long, env = "ILM_ENFORCE_EAGER")]
    pub enforce_eager: bool,
}

impl EngineArgs {
    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            block_tokens: self.block_tokens,
            kv_blocks: self.kv_blocks,
            max_num_seqs: self.max_num_seqs,
            step_rule: StepRule {
                max_batched_tokens: self.max_batched_tokens,
                long_prefill_tokens: self.long_prefill_tokens,
                long_prefill_share: self.long_prefill_share,
                long_prefill_pairs: self.long_prefill_pairs,
            },
            max_waiting: self.max_waiting,
            lend_fraction: self.lend_fraction,
            queue_timeout: Duration::from_secs_f64(self.queue_timeout_secs),
            pool_workers: self.pool_workers,
            gpu_memory_fraction: self.gpu_memory_fraction,
            unfilled_prompts: self.unfilled_prompts,
            enforce_eager: self.enforce_eager,
            ..EngineOptions::default()
        }
    }

    /// The same settings as command-line flags, for a child `serve` process.
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = vec![
            format!("--block-tokens={}", self.block_tokens),
            format!("--max-num-seqs={}", self.max_num_seqs),
            format!("--max-batched-tokens={}", self.max_batched_tokens),
            format!("--max-waiting={}", self.max_waiting),
            format!("--long-prefill-tokens={}", self.long_prefill_tokens),
            format!("--long-prefill-share={}", self.long_prefill_share),
            format!("--long-prefill-pairs={}", self.long_prefill_pairs),
            format!("--lend-fraction={}", self.lend_fraction),
            format!("--queue-timeout-secs={}", self.queue_timeout_secs),
            format!("--pool-workers={}", self.pool_workers),
            format!("--gpu-memory-fraction={}", self.gpu_memory_fraction),
        ];
        if let Some(blocks) = self.kv_blocks {
            flags.push(format!("--kv-blocks={blocks}"));
        }
        if self.unfilled_prompts {
            flags.push("--unfilled-prompts".into());
        }
        if self.enforce_eager {
            flags.push("--enforce-eager".into());
        }
        flags
    }
}

/// A duration in seconds: finite, not negative, and at most a year (so it fits a `Duration`
/// and an `Instant` sum).
fn parse_seconds(value: &str) -> Result<f64, String> {
    let secs: f64 = value
        .parse()
        .map_err(|e| format!("{value:?} is not a number: {e}"))?;
    if (0.0..=365.0 * 86_400.0).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!(
            "{value} seconds is out of range; expected 0 to 31536000"
        ))
    }
}

fn parse_device(value: &str) -> Result<Device, String> {
    match value {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device {other:?}; expected cpu, cuda or cuda:N")),
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Hugging Face style model folder [default: a demo model, generated under models/demo if absent].
    #[arg(long, env = "ILM_MODEL")]
    pub model: Option<PathBuf>,
    /// Write the demo model into --model first when that folder holds no model (the
    /// operator's `demo` model source).
    #[arg(long, env = "ILM_WRITE_DEMO_MODEL", requires = "model")]
    pub write_demo_model: bool,
    /// The name clients use in `model` [default: the model folder's name].
    #[arg(long, env = "ILM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Address to listen on (0.0.0.0 for all interfaces).
    #[arg(long, env = "ILM_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port of the API, probes and metrics.
    #[arg(long, env = "ILM_PORT", default_value_t = 8000)]
    pub port: u16,
    /// The gManager to join: with it this worker lends and borrows KV blocks (needs --token-file).
    #[arg(long, env = "ILM_GMANAGER_URL")]
    pub gmanager_url: Option<String>,
    /// Port of the peer transport (DistAttention between workers), when in a pool.
    #[arg(long, env = "ILM_PEER_PORT", default_value_t = 8101)]
    pub peer_port: u16,
    /// Address other workers and the gManager reach this one at [default: --host].
    #[arg(long, env = "ILM_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// `cpu`, or a GPU: `cuda` (the first) or `cuda:N`.
    #[arg(long, env = "ILM_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// How attention's queries and partial outputs travel between workers: `auto` (NCCL
    /// between GPU workers, TCP otherwise), `tcp`, or `nccl` (refuse to start without it).
    #[arg(long, env = "ILM_TRANSPORT", value_enum, default_value_t = Transport::Auto)]
    pub transport: Transport,
    /// Threads of the CPU backend's matrix and attention work [default: every core this
    /// process may use]. Workers sharing a machine (local mode) each take a share of its cores,
    /// as GPU workers each have their own device.
    #[arg(long, env = "ILM_CPU_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub cpu_threads: Option<u16>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// File holding the cluster token that guards internal routes such as /drain.
    #[arg(long, env = "ILM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// File holding an API key that /v1/* then require as a bearer token.
    #[arg(long, env = "ILM_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// The API key itself, for deployments that inject it from a Secret as an environment
    /// variable (the operator does); never echoed in `--help`.
    #[arg(
        long,
        env = "ILM_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<String>,
    /// Name of this worker in logs.
    #[arg(long, env = "ILM_WORKER_ID")]
    pub worker_id: Option<String>,
    /// On SIGTERM/SIGINT, how long running requests may take to finish before the process exits.
    #[arg(long, env = "ILM_GRACE_PERIOD_SECS", default_value_t = 60)]
    pub grace_period_secs: u64,
    /// Shut down (as on SIGTERM) when stdin closes: local mode sets it so that its workers never
    /// outlive it, even when it is killed outright.
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
}

/// The model folder to serve: the given one, or the demo model (written if absent).
pub fn model_dir_or_demo(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = model {
        return Ok(dir);
    }
    demo_model_at(PathBuf::from(DEMO_MODEL_DIR))
}

/// `dir`, with the demo model written there unless it holds one already.
fn demo_model_at(dir: PathBuf) -> anyhow::Result<PathBuf> {
    write_demo_model_if_missing(&dir, &DemoModelSpec::default())
        .with_context(|| format!("writing the demo model to {}", dir.display()))?;
    Ok(dir)
}

/// The default served name: the model folder's own name.
pub fn folder_name(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    dir.file_name()
        .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned())
}

fn read_secret(path: Option<&Path>) -> anyhow::Result<Option<Secret>> {
    path.map(super::secret_from_file)
        .transpose()
        .map_err(Into::into)
}

/// Runs a worker until it is told to stop, then drains it.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let model_dir = match args.model {
        Some(dir) if args.write_demo_model => demo_model_at(dir)?,
        model => model_dir_or_demo(model)?,
    };
    let cluster_token = read_secret(args.token_file.as_deref())?;
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("{}:{}", args.host, args.port));
    let advertise = args
        .advertise_host
        .clone()
        .unwrap_or_else(|| args.host.clone());
    if let Some(threads) = args.cpu_threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(usize::from(threads))
            .build_global()
            .context("setting up the CPU threads")?;
    }
    let mut options = args.engine.options();
    options.device = args.device;
    if args.gmanager_url.is_some() {
        let token = cluster_token.as_ref().context(
            "--gmanager-url needs --token-file: peers and the gManager check the cluster token",
        )?;
        if advertise == "0.0.0.0" || advertise == "::" {
            anyhow::bail!(
                "listening on all interfaces: set --advertise-host to the address peers reach"
            );
        }
        let listen = format!("{}:{}", args.host, args.peer_port);
        options.cluster = Some(engine::ClusterOptions {
            worker_id: worker_id.clone(),
            peer_listen: listen
                .parse()
                .with_context(|| format!("peer address {listen}"))?,
            token: token.clone(),
            transport: args.transport,
            rejects: Default::default(),
        });
    }
    let served_model_name = args
        .served_model_name
        .unwrap_or_else(|| folder_name(&model_dir));
    let server = Server::new(ServerConfig {
        served_model_name: served_model_name.clone(),
        api_key: match args.api_key {
            Some(key) => Some(Secret::new(key)),
            None => read_secret(args.api_key_file.as_deref())?,
        },
        cluster_token: cluster_token.clone(),
        max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        worker_id: Some(worker_id.clone()),
    });
    options.remote_attention = Some(server.metrics().remote_attention());
    if let Some(c) = &mut options.cluster {
        c.rejects = server.metrics().peer_rejects();
    }
    // Listen before loading, so liveness probes pass (and readiness reports 503) during a long load.
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    tracing::info!(
        address = %listener.local_addr()?,
        device = ?args.device,
        model = %model_dir.display(),
        served_model_name,
        "listening; loading the model"
    );
    let (close_http, http_closed) = oneshot::channel::<()>();
    let http = tokio::spawn(
        axum::serve(listener, server.router())
            .with_graceful_shutdown(async {
                let _ = http_closed.await;
            })
            .into_future(),
    );

    let grace = Duration::from_secs(args.grace_period_secs);
    let shutdown = shutdown_requested(args.exit_on_stdin_eof);
    tokio::pin!(shutdown);
    tokio::select! {
        loaded = load_model(model_dir, options) => {
            let (engine, tokenizer) = loaded?;
            let member = args.gmanager_url.as_deref().zip(engine.peer_addr()).map(|(url, peer)| {
                GManagerClient::new(
                    url,
                    cluster_token.as_ref().map(|t| t.expose().to_string()).unwrap_or_default(),
                    worker_id.clone(),
                    format!("http://{advertise}:{}", args.port),
                    format!("{advertise}:{}", peer.port()),
                    &engine,
                )
            });
            let (leave, left) = oneshot::channel();
            let (registered, joined) = oneshot::channel();
            let heartbeats = member.map(|m| tokio::spawn(m.run(engine.clone(), registered, left)));
            // In a pool, ready once registered: before that no peer lends here and the pool's
            // size is unknown to the gManager.
            let stopped = heartbeats.is_some()
                && tokio::select! {
                    _ = joined => false,
                    () = &mut shutdown => true,
                };
            server.install(engine, tokenizer);
            if !stopped {
                tracing::info!("ready");
                tokio::select! {
                    () = &mut shutdown => {}
                    () = server.drained() => tracing::info!("drained on request"),
                }
            }
            // Still a member while draining: heartbeats report the loans going back, and
            // the gManager advises no one to borrow here (nothing is lendable any more).
            tracing::info!(
                grace_secs = grace.as_secs(),
                "shutting down: refusing new requests and loans, finishing running ones"
            );
            if tokio::time::timeout(grace, server.drain()).await.is_err() {
                tracing::warn!("grace period over with requests or loans left; exiting anyway");
            }
            let _ = leave.send(());
            if let Some(h) = heartbeats {
                let _ = tokio::time::timeout(HTTP_CLOSE_TIMEOUT, h).await;
            }
        }
        () = &mut shutdown => tracing::info!("stop requested while loading the model"),
    }
    let _ = close_http.send(());
    match tokio::time::timeout(HTTP_CLOSE_TIMEOUT, http).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => tracing::warn!(error = %err, "HTTP server error while closing"),
        Ok(Err(err)) => tracing::warn!(error = %err, "HTTP server task failed"),
        Err(_) => tracing::warn!("connections still open after the drain; closing them"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Loads the engine and tokenizer off the async threads (it reads and converts all weights).
async fn load_model(
    dir: PathBuf,
    options: EngineOptions,
) -> anyhow::Result<(EngineHandle, TextTokenizer)> {
    tokio::task::spawn_blocking(move || {
        let tokenizer = TextTokenizer::from_model_dir(&dir)
            .with_context(|| format!("loading the tokenizer from {}", dir.display()))?;
        let engine = engine::start(&dir, options)?;
        Ok((engine, tokenizer))
    })
    .await
    .context("the model loading task failed")?
}

/// Resolves on SIGTERM, SIGINT, or (when asked) stdin reaching end of file.
async fn shutdown_requested(watch_stdin: bool) {
    let stdin_closed = async {
        if watch_stdin {
            stdin_eof().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = stop_signal() => {}
        () = stdin_closed => tracing::info!("stdin closed (the parent went away)"),
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn stop_signal() {
    tokio::select! {
        () = terminate_signal() => tracing::info!("SIGTERM received"),
        result = tokio::signal::ctrl_c() => match result {
            Ok(()) => tracing::info!("SIGINT received"),
            Err(err) => tracing::error!(error = %err, "cannot listen for SIGINT; stopping"),
        },
    }
}

#[cfg(unix)]
async fn terminate_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(not(unix))]
async fn terminate_signal() {
    std::future::pending::<()>().await;
}

/// Reads stdin on a plain thread: a tokio stdin read would keep the runtime from shutting down.
async fn stdin_eof() {
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = tx.send(());
        });
    match spawned {
        Ok(_) => {
            let _ = rx.await;
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot watch stdin");
            std::future::pending::<()>().await;
        }
    }
}
