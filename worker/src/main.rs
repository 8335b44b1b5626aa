//! `infinite-llm-worker`: serve a model, run a local pool, write the demo model, or drain a worker.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model_if_missing};
use infinite_llm_worker::local::{self, LocalArgs};
use infinite_llm_worker::server::{self, DEMO_MODEL_DIR, ServeArgs};

#[derive(Debug, Parser)]
#[command(name = "infinite-llm-worker", version, about)]
struct Cli {
    /// Log lines as text or as JSON objects (level filter: RUST_LOG, default info).
    #[arg(long, global = true, env = "ILM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API for one model.
    Serve(ServeArgs),
    /// Start a pool of workers on this machine behind one OpenAI address.
    Local(LocalArgs),
    /// Write the small random-weight demo model folder.
    DemoModel {
        #[arg(long, default_value = DEMO_MODEL_DIR)]
        out: PathBuf,
    },
    /// Ask the worker on this machine to drain, and wait until it has (the preStop hook).
    Drain {
        #[arg(long, env = "ILM_PORT", default_value_t = 8000)]
        port: u16,
        /// File holding the cluster token.
        #[arg(long, env = "ILM_TOKEN_FILE")]
        token_file: PathBuf,
        /// Seconds to keep serving before the drain: a Pod being deleted leaves its Service's
        /// endpoints while this hook runs, and new requests must stop arriving before the
        /// worker turns them away.
        #[arg(long, default_value_t = 0)]
        delay_secs: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command, cli.log_format).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            write_termination_message(&format!("{err:#}"));
            ExitCode::FAILURE
        }
    }
}

/// In a Kubernetes container, the file whose text the Pod's status shows as the reason the
/// container stopped (and so the operator's conditions and Events); absent elsewhere.
const TERMINATION_LOG: &str = "/dev/termination-log";

fn write_termination_message(message: &str) {
    let path = std::path::Path::new(TERMINATION_LOG);
    if path.exists()
        && let Err(err) = std::fs::write(path, message)
    {
        tracing::warn!(%err, "cannot write the termination message");
    }
}

async fn run(command: Command, log_format: LogFormat) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => server::serve(args).await,
        Command::Local(args) => {
            // Text logs of the workers get a name prefix; JSON logs carry the worker id instead.
            let output = match log_format {
                LogFormat::Text => local::Output::Prefixed,
                LogFormat::Json => local::Output::Inherited,
            };
            let flag = log_format
                .to_possible_value()
                .expect("no variant is skipped");
            let worker_flags = vec![format!("--log-format={}", flag.get_name())];
            local::run(args, worker_flags, output).await
        }
        Command::DemoModel { out } => {
            write_demo_model_if_missing(&out, &DemoModelSpec::default())
                .with_context(|| format!("writing the demo model to {}", out.display()))?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Drain {
            port,
            token_file,
            delay_secs,
        } => {
            let token = server::secret_from_file(&token_file)?;
            tokio::time::sleep(std::time::Duration::from_secs(delay_secs)).await;
            server::request_drain(&format!("http://127.0.0.1:{port}"), &token).await?;
            tracing::info!(port, "worker drained");
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
