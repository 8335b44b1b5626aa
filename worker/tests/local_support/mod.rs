//! Starting local mode from the built binary, for end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout};

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
