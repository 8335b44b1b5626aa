use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use infinite_llm_operator::children::Settings;
use infinite_llm_operator::gmanager::placement::{CostModelError, Measured, PlacementConfig};
use infinite_llm_operator::gmanager::{self, GManagerConfig, Tokens};
use infinite_llm_operator::leader::Election;
use infinite_llm_operator::{Config, crd, external_metrics};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "infinite-llm-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print the InfiniteLLMCluster CRD as YAML.
    Crd {
        /// Print it as the Helm chart's template instead (charts/infinite-llm/templates/crd.yaml).
        #[arg(long)]
        chart: bool,
    },
    /// Run the operator (the default).
    Run,
    /// Serve only the gManager, without Kubernetes (local mode).
    Gmanager(GManagerArgs),
    /// Simulate static and pooled clusters on the same traces and print the comparison.
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Instance counts to simulate, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = infinite_llm_operator::simulate::SCALES)]
    instances: Vec<usize>,
    /// Simulated workers of these measured figures (the gManager's `--cost-model` file).
    #[arg(long, env = "ILM_COST_MODEL")]
    cost_model: Option<PathBuf>,
}

#[derive(clap::Args)]
struct GManagerArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = gmanager::DEFAULT_PORT)]
    port: u16,
    /// File holding the cluster token workers must present.
    #[arg(long)]
    token_file: PathBuf,
    /// How often workers heartbeat; a worker silent for three intervals is expired.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_interval_ms: u64,
    /// Stop when stdin reaches end of file: local mode's launcher holds the other end, so the
    /// gManager goes when the launcher does, even when it is killed.
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// JSON file of measured figures for placement's cost model (fields of `Measured`);
    /// those left out keep the H100 and Llama-3-8B defaults.
    #[arg(long, env = "ILM_COST_MODEL")]
    cost_model: Option<PathBuf>,
}

/// The figures of the cost-model `file`, or the defaults.
fn measured(file: Option<&std::path::Path>) -> Result<Measured, CostModelError> {
    file.map_or_else(|| Ok(Measured::default()), Measured::from_file)
}

/// Placement with the cost model of `file`, or the defaults.
fn placement(file: Option<&std::path::Path>) -> Result<PlacementConfig, CostModelError> {
    measured(file).map(|m| PlacementConfig::for_measured(&m))
}

#[derive(clap::Args)]
struct RunArgs {
    /// Reconcile only this namespace; all namespaces when unset.
    #[arg(long, env = "ILM_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace of the leader Lease: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "infinite-llm-system")]
    lease_namespace: String,
    #[arg(long, env = "ILM_LEASE_NAME", default_value = "infinite-llm-operator")]
    lease_name: String,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, env = "ILM_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Seconds before expiry the leader renews.
    #[arg(long, env = "ILM_LEASE_GRACE", default_value_t = 5)]
    lease_grace: u64,
    /// Unique name of this replica in the election: the Pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// This replica's Pod, in the lease namespace: the leader labels it so that the gManager
    /// Service selects the leader only. Unset outside a Pod.
    #[arg(long = "pod-name", env = "POD_NAME")]
    pod: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "ILM_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Where the leader serves the gManager.
    #[arg(long, env = "ILM_GMANAGER_ADDR", default_value = "0.0.0.0:8001")]
    gmanager_addr: SocketAddr,
    /// gManager URL handed to workers; defaults to the operator Service in the lease namespace.
    #[arg(long, env = "ILM_GMANAGER_URL")]
    gmanager_url: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "ILM_LOG_JSON")]
    log_json: bool,
    /// JSON file of measured figures for the gManager's cost model (see `gmanager --help`).
    #[arg(long, env = "ILM_COST_MODEL")]
    cost_model: Option<PathBuf>,
    /// Where the leader serves the external metrics API (HTTPS), when given a certificate.
    #[arg(long, env = "ILM_METRICS_API_ADDR", default_value = "0.0.0.0:6443")]
    metrics_api_addr: SocketAddr,
    /// PEM serving certificate of the external metrics API; the API is off without it.
    #[arg(
        long,
        env = "ILM_METRICS_API_CERT_FILE",
        requires = "metrics_api_key_file"
    )]
    metrics_api_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(
        long,
        env = "ILM_METRICS_API_KEY_FILE",
        requires = "metrics_api_cert_file"
    )]
    metrics_api_key_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Crd { chart }) = cli.command {
        let yaml = if chart {
            crd::chart_crd_template()
        } else {
            crd::crd_yaml()
        };
        return match yaml {
            Ok(yaml) => {
                print!("{yaml}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Simulate(args)) = &cli.command {
        let measured = match measured(args.cost_model.as_deref()) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let mut out = std::io::stdout().lock();
        return match infinite_llm_operator::simulate::report(&mut out, &args.instances, &measured) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cli.run.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Colour only for a person at a terminal: `kubectl logs` shows escape codes raw.
        tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_env_filter(filter)
            .init();
    }
    if let Some(Command::Gmanager(args)) = cli.command {
        return match serve_gmanager(args).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "gManager failed");
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let args = cli.run;

    let identity = args.identity.unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".to_owned());
        format!("{host}-{}", std::process::id())
    });
    let gmanager_url = args.gmanager_url.unwrap_or_else(|| {
        format!(
            "http://infinite-llm-operator-gmanager.{}.svc:8001",
            args.lease_namespace
        )
    });
    let config = Config {
        namespace: args.watch_namespace,
        election: Election {
            lease_name: args.lease_name,
            lease_namespace: args.lease_namespace,
            identity,
            duration: args.lease_duration,
            grace: args.lease_grace,
            pod: args.pod,
        },
        metrics_addr: args.metrics_addr,
        gmanager_addr: args.gmanager_addr,
        settings: Settings { gmanager_url },
        metrics_api: args
            .metrics_api_cert_file
            .zip(args.metrics_api_key_file)
            .map(|(cert_file, key_file)| external_metrics::Config {
                addr: args.metrics_api_addr,
                cert_file,
                key_file,
            }),
        placement: match placement(args.cost_model.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "bad cost model");
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };

    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    match infinite_llm_operator::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "operator failed");
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Local mode: one cluster, whose token is read from a file (and never logged).
async fn serve_gmanager(args: GManagerArgs) -> Result<(), String> {
    let path = args.token_file.display();
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| format!("reading the token file {path}: {e}"))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("the token file {path} is empty"));
    }
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("binding {}:{}: {e}", args.host, args.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let config = GManagerConfig {
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
        placement: placement(args.cost_model.as_deref()).map_err(|e| e.to_string())?,
        ..GManagerConfig::default()
    };
    tracing::info!(%addr, heartbeat_interval_ms = args.heartbeat_interval_ms, "serving the gManager");
    let watch_stdin = args.exit_on_stdin_eof;
    gmanager::serve(
        listener,
        config,
        Tokens::single("local", token),
        async move {
            tokio::select! {
                () = wait_for_signal() => {}
                () = stdin_closed(watch_stdin) => tracing::info!("stdin closed"),
            }
        },
    )
    .await
    .map_err(|e| format!("serving the gManager on {addr}: {e}"))?;
    tracing::info!("gManager stopped");
    Ok(())
}

/// Resolves once stdin is at its end (never, unless `watch`). The read runs on a plain thread,
/// which the runtime's shutdown does not wait for.
async fn stdin_closed(watch: bool) {
    if !watch {
        return std::future::pending().await;
    }
    let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        while std::io::Read::read(&mut stdin, &mut [0; 256]).is_ok_and(|n| n > 0) {}
        drop(closed);
    });
    let _ = on_close.await;
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
