//! Starting local mode from the built binary, for end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_infinite-llm-worker");

/// Kills the launcher if a check fails half-way (its workers follow it through stdin EOF).
pub struct Launcher(pub Child);

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads the launcher's banner up to its last line; returns the workers' URLs, and the pipe,
/// which must stay open while the launcher may still print.
pub fn worker_urls(launcher: &mut Child) -> (Vec<String>, BufReader<ChildStdout>) {
    let (workers, stdout) = workers(launcher);
    (workers.into_iter().map(|(_, url)| url).collect(), stdout)
}

/// Like `worker_urls`, with each worker's process id.
pub fn workers(launcher: &mut Child) -> (Vec<(u32, String)>, BufReader<ChildStdout>) {
    let mut stdout = BufReader::new(launcher.stdout.take().expect("stdout is piped"));
    let mut urls = Vec::new();
    let mut line = String::new();
    while stdout.read_line(&mut line).expect("banner line") > 0 {
        // "  worker-0  pid 1234     http://127.0.0.1:8010"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [name, "pid", pid, url] = fields[..]
            && name.starts_with("worker-")
        {
            urls.push((pid.parse().expect("a pid"), url.to_owned()));
        }
        if line.contains("Ctrl-C stops everything") {
            return (urls, stdout);
        }
        line.clear();
    }
    panic!("the launcher ended before printing its banner");
}

pub async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Local mode running: its launcher (killed on drop), the front door, and each worker's API URL
/// and process id.
pub struct Pool {
    pub launcher: Launcher,
    pub base: String,
    pub workers: Vec<String>,
    pub pids: Vec<u32>,
}

/// Starts local mode over `model` with `count` workers of `kv_blocks` rBlocks each, plus
/// `extra` flags, and waits until every worker is up.
pub fn start_pool(model: &Path, count: u16, kv_blocks: usize, extra: &[&str]) -> Pool {
    let port = free_port();
    let mut launcher = Launcher(
        Command::new(BIN)
            .arg("local")
            .arg(format!("--workers={count}"))
            .arg(format!("--kv-blocks={kv_blocks}"))
            .arg(format!("--port={port}"))
            .arg(format!("--gmanager-port={}", free_port()))
            .arg(format!("--model={}", model.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("launcher starts"),
    );
    let (started, _) = workers(&mut launcher.0);
    Pool {
        launcher,
        base: format!("http://127.0.0.1:{port}"),
        workers: started.iter().map(|(_, url)| url.clone()).collect(),
        pids: started.iter().map(|(pid, _)| *pid).collect(),
    }
}

/// A prompt of exactly `tokens` tokens, as token ids the demo vocabulary has.
pub fn prompt(tokens: usize, salt: usize) -> Vec<u32> {
    (0..tokens)
        .map(|i| ((i * 7919 + salt * 104_729) % 900 + 20) as u32)
        .collect()
}
