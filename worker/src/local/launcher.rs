//! Child processes of local mode: each is this same binary with a subcommand. A child watches
//! its stdin and shuts down gracefully when the pipe closes, which happens when we stop it and
//! also when this process dies in any way, so no child outlives the pool.

use std::net::{Ipv4Addr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

const READY_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("finding this program's path: {0}")]
    CurrentExe(std::io::Error),
    #[error("starting {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} {status} before it was ready (its log is above)")]
    Exited { name: String, status: String },
    #[error("{name} was not ready after {secs} s")]
    NotReady { name: String, secs: u64 },
}

/// What happens to a child's stdout and stderr.
#[derive(Debug, Clone, Copy)]
pub enum Output {
    /// Each line is copied to our stderr behind `[name]`.
    Prefixed,
    /// The child writes to our stderr directly (structured logs stay one object per line).
    Inherited,
}

/// A running child. Dropping it kills the child.
pub struct ChildProcess {
    pub name: String,
    pub pid: u32,
    pub port: u16,
    /// Closing it asks the child to stop.
    stdin: Option<ChildStdin>,
    /// A description of how the child ended, once it has.
    exit: watch::Receiver<Option<String>>,
    /// Sending (or dropping) it kills the child.
    kill: Option<oneshot::Sender<()>>,
    /// The path that answers 200 once the child is ready.
    ready_path: &'static str,
}

impl ChildProcess {
    /// Starts `<this program> <args>` (a worker); `port` is where it will serve HTTP.
    pub fn spawn(
        name: &str,
        args: Vec<String>,
        port: u16,
        output: Output,
    ) -> Result<Self, LaunchError> {
        let exe = std::env::current_exe().map_err(LaunchError::CurrentExe)?;
        Self::spawn_program(exe, "/ready", name, args, port, output)
    }

    /// Starts `program <args>`, ready when `ready_path` on `port` answers 200.
    pub fn spawn_program(
        exe: std::path::PathBuf,
        ready_path: &'static str,
        name: &str,
        args: Vec<String>,
        port: u16,
        output: Output,
    ) -> Result<Self, LaunchError> {
        let (stdout, stderr) = match output {
            Output::Prefixed => (Stdio::piped(), Stdio::piped()),
            Output::Inherited => (Stdio::inherit(), Stdio::inherit()),
        };
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                name: name.to_owned(),
                source,
            })?;
        let pid = child.id().unwrap_or_default();
        if let Some(pipe) = child.stdout.take() {
            copy_lines(name.to_owned(), pipe);
        }
        if let Some(pipe) = child.stderr.take() {
            copy_lines(name.to_owned(), pipe);
        }
        let stdin = child.stdin.take();
        let (exit_tx, exit) = watch::channel(None);
        let (kill, killed) = oneshot::channel::<()>();
        let label = name.to_owned();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = killed => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let description = match status {
                Ok(status) => format!("exited ({status})"),
                Err(err) => format!("could not be waited for ({err})"),
            };
            tracing::info!(child = %label, "{description}");
            exit_tx.send_replace(Some(description));
        });
        Ok(Self {
            name: name.to_owned(),
            pid,
            port,
            stdin,
            exit,
            kill: Some(kill),
            ready_path,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Polls `GET /ready` until it answers 200, the child exits, or `timeout` passes.
    pub async fn wait_ready(
        &mut self,
        client: &reqwest::Client,
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}{}", self.base_url(), self.ready_path);
        loop {
            if let Some(status) = self.exit.borrow().clone() {
                return Err(LaunchError::Exited {
                    name: self.name.clone(),
                    status,
                });
            }
            let ready = client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::NotReady {
                    name: self.name.clone(),
                    secs: timeout.as_secs(),
                });
            }
            tokio::select! {
                () = tokio::time::sleep(READY_POLL) => {}
                _ = self.exit.changed() => {}
            }
        }
    }

    /// Resolves once the child has exited, with how it ended.
    pub async fn exited(&mut self) -> String {
        match self.exit.wait_for(Option::is_some).await {
            Ok(status) => status.clone().unwrap_or_default(),
            Err(_) => "ended unobserved".to_owned(),
        }
    }

    /// Asks the child to stop, and kills it if it has not within `timeout`.
    pub async fn stop(mut self, timeout: Duration) {
        drop(self.stdin.take());
        let stopped = tokio::time::timeout(timeout, self.exit.wait_for(Option::is_some))
            .await
            .is_ok();
        if !stopped {
            tracing::warn!(child = %self.name, "did not stop in time; killing it");
            if let Some(kill) = self.kill.take() {
                let _ = kill.send(());
            }
            let _ = self.exit.wait_for(Option::is_some).await.map(drop);
        }
    }
}

/// A loopback port for a child: `preferred` if it is free, else one the OS picks.
pub fn free_port(preferred: u16) -> std::io::Result<u16> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, preferred)) {
        Ok(_) => Ok(preferred),
        Err(_) => Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port()),
    }
}

fn copy_lines(name: String, pipe: impl AsyncRead + Unpin + Send + 'static) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{name}] {line}");
        }
    });
}
