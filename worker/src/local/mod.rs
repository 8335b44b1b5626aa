//! Local mode: the pool on one machine, without Kubernetes. `infinite-llm-worker local` starts
//! the processes of a cluster on loopback and serves one OpenAI address in front of them:
//!
//! ```text
//! front door 127.0.0.1:P  (this process, front_door.rs)
//!   -> worker-0 127.0.0.1:P+10, worker-1 P+11, ...  (child `serve` processes, launcher.rs)
//! ```
//!
//! Cluster-wide services (the gManager) are further children started the same way, before the
//! workers, so that the workers can be pointed at them. A gManager that exits is started again
//! on the same port with the same token; its state is soft, and the workers re-register.

use std::path::Path;

mod front_door;
mod launcher;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::peer::Transport;
use crate::server::{EngineArgs, folder_name, model_dir_or_demo, stop_signal};
use clap::ValueEnum;
use front_door::{Backend, FrontDoor};
use launcher::{ChildProcess, free_port};

pub use launcher::Output;

/// How long workers get to finish running requests when the pool stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Workers listen from the front door's port plus this.
const WORKER_PORT_OFFSET: u16 = 10;
/// A gManager that exited is started again after this.
const RESTART_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// Worker processes to start.
    #[arg(long, env = "ILM_WORKERS", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,
    /// Port of the pool's OpenAI address; workers take the ports from P+10 up.
    #[arg(long, env = "ILM_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Hugging Face style model folder [default: a demo model, generated under models/demo if absent].
    #[arg(long, env = "ILM_MODEL")]
    pub model: Option<PathBuf>,
    /// The name clients use in `model` [default: the model folder's name].
    #[arg(long, env = "ILM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Lend fractions per worker, in order, comma-separated (such as `0.5,0,0.5`); workers past
    /// the list keep --lend-fraction.
    #[arg(long, env = "ILM_LEND_FRACTIONS", value_delimiter = ',')]
    pub lend_fractions: Vec<f64>,
    /// How long each worker may take to load the model.
    #[arg(long, env = "ILM_READY_TIMEOUT_SECS", default_value_t = 300)]
    pub ready_timeout_secs: u64,
    /// Devices of the workers, comma-separated (such as `cuda:0,cuda:1`): worker i takes the
    /// i-th, round robin [default: cpu for all].
    #[arg(long, env = "ILM_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Compute threads of each CPU worker [default: this machine's cores shared out among the
    /// CPU workers, at least one each: a thread per core in every worker would have them spin
    /// against each other, where GPU workers each have a device of their own].
    #[arg(long, env = "ILM_CPU_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub cpu_threads: Option<u16>,
    /// How workers exchange attention's queries and partial outputs: auto (NCCL between GPU
    /// workers), tcp or nccl.
    #[arg(long, env = "ILM_TRANSPORT", value_enum, default_value_t = Transport::Auto)]
    pub transport: Transport,
    /// Port of the gManager (the operator binary's `gmanager` mode, next to this one).
    #[arg(long, env = "ILM_GMANAGER_PORT", default_value_t = 8001)]
    pub gmanager_port: u16,
}

/// Starts the gManager with a fresh cluster token; returns it and the token file.
fn start_gmanager(port: u16, output: Output) -> anyhow::Result<(ChildProcess, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("infinite-llm-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let token_file = dir.join("cluster-token");
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    std::io::Write::write_all(&mut file.open(&token_file)?, token.as_bytes())?;
    Ok((spawn_gmanager(port, &token_file, output)?, token_file))
}

/// Starts the operator binary next to this one in `gmanager` mode.
fn spawn_gmanager(port: u16, token_file: &Path, output: Output) -> anyhow::Result<ChildProcess> {
    let exe = std::env::current_exe()?.with_file_name("infinite-llm-operator");
    anyhow::ensure!(
        exe.exists(),
        "local mode needs the gManager at {}: build the workspace (`make build`)",
        exe.display()
    );
    let args = vec![
        "gmanager".to_owned(),
        "--host=127.0.0.1".to_owned(),
        format!("--port={port}"),
        format!("--token-file={}", token_file.display()),
        "--exit-on-stdin-eof".to_owned(),
    ];
    Ok(ChildProcess::spawn_program(
        exe, "/healthz", "gmanager", args, port, output,
    )?)
}

/// Keeps the gManager running until `stop`: one that exits is started again on its port with
/// the same token, and the workers re-register with it when their heartbeats get 404.
async fn supervise_gmanager(
    mut gmanager: ChildProcess,
    token_file: PathBuf,
    output: Output,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            status = gmanager.exited() => {
                tracing::warn!(%status, "the gManager exited; starting it again");
                tokio::time::sleep(RESTART_DELAY).await;
                match spawn_gmanager(gmanager.port, &token_file, output) {
                    Ok(next) => {
                        tracing::info!(pid = next.pid, "gManager started again");
                        gmanager = next;
                    }
                    // The dead one stays in place, so the next round tries again.
                    Err(err) => tracing::error!(error = %err, "cannot start the gManager again"),
                }
            }
            _ = &mut stop => {
                gmanager.stop(STOP_TIMEOUT).await;
                return;
            }
        }
    }
}

/// Runs the pool until SIGINT/SIGTERM, then stops every process it started.
/// `worker_flags` are passed to every worker as well (such as the log format).
pub async fn run(args: LocalArgs, worker_flags: Vec<String>, output: Output) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.lend_fractions.len() <= usize::from(args.workers),
        "{} lend fractions for {} workers",
        args.lend_fractions.len(),
        args.workers
    );
    let model = model_dir_or_demo(args.model)?;
    let model = model
        .canonicalize()
        .with_context(|| format!("finding the model folder {}", model.display()))?;
    let served = args
        .served_model_name
        .unwrap_or_else(|| folder_name(&model));
    // Bind first: if the address is taken, fail before starting anything.
    let listener = TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{}", args.port))?;

    let gmanager_port = free_port(args.gmanager_port).context("finding a free gManager port")?;
    let (mut gmanager, token_file) = start_gmanager(gmanager_port, output)?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let timeout = Duration::from_secs(args.ready_timeout_secs);
    gmanager.wait_ready(&client, timeout).await?;
    let gmanager_url = gmanager.base_url();

    let device_of = |i: u16| {
        (!args.devices.is_empty()).then(|| &args.devices[usize::from(i) % args.devices.len()])
    };
    let on_cpu = |i: u16| device_of(i).is_none_or(|d| d == "cpu");
    let cpu_threads = args.cpu_threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let cpu_workers = (0..args.workers).filter(|&i| on_cpu(i)).count();
        u16::try_from(cores / cpu_workers.max(1))
            .unwrap_or(u16::MAX)
            .max(1)
    });
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let name = format!("worker-{i}");
        let preferred = args
            .port
            .checked_add(WORKER_PORT_OFFSET + i)
            .unwrap_or_default();
        let port = free_port(preferred).context("finding a free port for a worker")?;
        let mut flags = vec![
            "serve".to_owned(),
            format!("--model={}", model.display()),
            format!("--served-model-name={served}"),
            "--host=127.0.0.1".to_owned(),
            format!("--port={port}"),
            format!("--worker-id={name}"),
            format!("--gmanager-url={gmanager_url}"),
            format!("--token-file={}", token_file.display()),
            // The worker binds any free port and reports the one it got to the gManager.
            "--peer-port=0".to_owned(),
            "--exit-on-stdin-eof".to_owned(),
            format!(
                "--transport={}",
                args.transport
                    .to_possible_value()
                    .expect("no variant is skipped")
                    .get_name()
            ),
        ];
        if let Some(device) = device_of(i) {
            flags.push(format!("--device={device}"));
        }
        if on_cpu(i) {
            flags.push(format!("--cpu-threads={cpu_threads}"));
        }
        let mut engine = args.engine.clone();
        // Every worker started here is in the pool from the start, joined or not yet.
        engine.pool_workers = engine.pool_workers.max(usize::from(args.workers));
        if let Some(&f) = args.lend_fractions.get(usize::from(i)) {
            engine.lend_fraction = f;
        }
        flags.extend(engine.to_flags());
        flags.extend(worker_flags.iter().cloned());
        workers.push(ChildProcess::spawn(&name, flags, port, output)?);
    }

    let all_ready = async {
        for worker in &mut workers {
            worker.wait_ready(&client, timeout).await?;
        }
        anyhow::Ok(())
    };
    let started = tokio::select! {
        ready = all_ready => ready,
        () = stop_signal() => Err(anyhow::anyhow!("stopped before the pool was ready")),
    };
    if let Err(err) = started {
        stop_all(workers).await;
        gmanager.stop(STOP_TIMEOUT).await;
        return Err(err);
    }

    let door = FrontDoor::new(
        workers
            .iter()
            .map(|w| Backend::new(w.name.clone(), w.base_url()))
            .collect(),
    )?;
    let (close, closed) = oneshot::channel::<()>();
    let http = tokio::spawn(
        axum::serve(listener, door.router())
            .with_graceful_shutdown(async {
                let _ = closed.await;
            })
            .into_future(),
    );
    print_banner(&model, &served, args.port, &gmanager, &workers, &token_file);
    let (stop_gmanager, gmanager_stopped) = oneshot::channel();
    let supervisor = tokio::spawn(supervise_gmanager(
        gmanager,
        token_file.clone(),
        output,
        gmanager_stopped,
    ));

    stop_signal().await;
    println!("Stopping the pool...");
    let _ = close.send(());
    stop_all(workers).await;
    let _ = stop_gmanager.send(());
    let _ = supervisor.await;
    let _ = std::fs::remove_file(&token_file);
    let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
    Ok(())
}

async fn stop_all(workers: Vec<ChildProcess>) {
    futures::future::join_all(workers.into_iter().map(|w| w.stop(STOP_TIMEOUT))).await;
}

fn print_banner(
    model: &Path,
    served: &str,
    port: u16,
    gmanager: &ChildProcess,
    workers: &[ChildProcess],
    token_file: &Path,
) {
    let base = format!("http://127.0.0.1:{port}");
    println!();
    println!("Infinite-LLM local pool is up");
    println!(
        "  {:<10}{} (served as {served:?})",
        "model",
        model.display()
    );
    for w in std::iter::once(gmanager).chain(workers) {
        println!("  {:<10}pid {:<8} {}", w.name, w.pid, w.base_url());
    }
    println!("  {:<10}{}", "token", token_file.display());
    println!(
        "  {:<10}{base}/v1  (requests are spread over the workers)",
        "API"
    );
    println!();
    println!("Try it:");
    let model_json = serde_json::Value::from(served);
    let body = format!(
        r#"{{"model": {model_json}, "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}"#
    );
    println!("  curl {base}/v1/chat/completions \\");
    println!("    -H 'Content-Type: application/json' \\");
    println!("    -d '{body}'");
    println!();
    println!("Ctrl-C stops everything.");
}
