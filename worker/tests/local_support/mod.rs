//! Starting local mode from the built binary, for end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_infinite-llm-worker");

/// The worker binary: `ILM_WORKER_BIN` where the tests run away from their build (the GPU
/// machine runs a bundle), else the one cargo built.
pub fn bin() -> String {
    std::env::var("ILM_WORKER_BIN").unwrap_or_else(|_| BIN.to_owned())
}

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
    let (banner, stdout) = banner(launcher);
    (banner.workers, stdout)
}

/// What the launcher's banner says about the processes it started.
pub struct Banner {
    /// Process id and API URL of each worker, in order.
    pub workers: Vec<(u32, String)>,
    /// Process id and URL of the gManager.
    pub gmanager: (u32, String),
    /// The file holding the cluster token.
    pub token_file: PathBuf,
}

/// Reads the launcher's banner up to its last line.
pub fn banner(launcher: &mut Child) -> (Banner, BufReader<ChildStdout>) {
    let mut stdout = BufReader::new(launcher.stdout.take().expect("stdout is piped"));
    let mut banner = Banner {
        workers: Vec::new(),
        gmanager: (0, String::new()),
        token_file: PathBuf::new(),
    };
    let mut line = String::new();
    while stdout.read_line(&mut line).expect("banner line") > 0 {
        // "  worker-0  pid 1234     http://127.0.0.1:8010", "  token     /tmp/.../cluster-token"
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            [name, "pid", pid, url] if name.starts_with("worker-") => banner
                .workers
                .push((pid.parse().expect("a pid"), url.to_owned())),
            ["gmanager", "pid", pid, url] => {
                banner.gmanager = (pid.parse().expect("a pid"), url.to_owned())
            }
            ["token", path] => banner.token_file = PathBuf::from(path),
            _ => {}
        }
        if line.contains("Ctrl-C stops everything") {
            return (banner, stdout);
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

/// Local mode running: its launcher (killed on drop), the front door, each worker's API URL
/// and process id, and the gManager.
pub struct Pool {
    pub launcher: Launcher,
    pub base: String,
    pub workers: Vec<String>,
    pub pids: Vec<u32>,
    pub gmanager_pid: u32,
    pub gmanager_url: String,
    /// The cluster token, for the gManager's API and workers' internal routes.
    pub token: String,
    /// Where the token is, for a worker that joins later.
    pub token_file: PathBuf,
}

/// Starts local mode over `model` with `count` workers of `kv_blocks` rBlocks each, plus
/// `extra` flags, and waits until every worker is up.
pub fn start_pool(model: &Path, count: u16, kv_blocks: usize, extra: &[&str]) -> Pool {
    let port = free_port();
    let mut launcher = Launcher(
        Command::new(bin())
            .arg("local")
            .arg(format!("--workers={count}"))
            .arg(format!("--kv-blocks={kv_blocks}"))
            .arg(format!("--port={port}"))
            .arg(format!("--gmanager-port={}", free_port()))
            .arg(format!("--model={}", model.display()))
            .args(extra)
            .stdout(Stdio::piped())
            // ILM_TEST_LOGS=1 shows the pool's logs, for a failure on a machine far away.
            .stderr(match std::env::var_os("ILM_TEST_LOGS") {
                Some(_) => Stdio::inherit(),
                None => Stdio::null(),
            })
            .spawn()
            .expect("launcher starts"),
    );
    let (started, _) = banner(&mut launcher.0);
    Pool {
        launcher,
        base: format!("http://127.0.0.1:{port}"),
        workers: started.workers.iter().map(|(_, url)| url.clone()).collect(),
        pids: started.workers.iter().map(|(pid, _)| *pid).collect(),
        gmanager_pid: started.gmanager.0,
        gmanager_url: started.gmanager.1,
        token: std::fs::read_to_string(&started.token_file).expect("the cluster token file"),
        token_file: started.token_file,
    }
}

/// Sends `signal` (such as `-9` or `-STOP`) to a process.
pub fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} {pid}");
}

/// The gManager's view of the pool (`GET /v1/pool`), or `None` while it does not answer.
pub async fn pool_view(client: &reqwest::Client, pool: &Pool) -> Option<serde_json::Value> {
    let resp = client
        .get(format!("{}/v1/pool", pool.gmanager_url))
        .bearer_auth(&pool.token)
        .send()
        .await
        .ok()?;
    resp.status().is_success().then_some(())?;
    resp.json().await.ok()
}

/// A prompt of exactly `tokens` tokens, as token ids the demo vocabulary has.
pub fn prompt(tokens: usize, salt: usize) -> Vec<u32> {
    (0..tokens)
        .map(|i| ((i * 7919 + salt * 104_729) % 900 + 20) as u32)
        .collect()
}

/// Posts a greedy completion of exactly `max_tokens` tokens.
pub async fn post_greedy(
    client: &reqwest::Client,
    base: &str,
    prompt: &[u32],
    max_tokens: usize,
) -> reqwest::Response {
    let body = serde_json::json!({
        "model": "demo", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true,
    });
    client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The text of a greedy completion; panics unless it succeeded with every token asked for.
pub async fn greedy_text(
    client: reqwest::Client,
    base: String,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> String {
    let resp = post_greedy(&client, &base, &prompt, max_tokens).await;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    assert_eq!(v["usage"]["completion_tokens"], max_tokens);
    v["choices"][0]["text"].as_str().unwrap().to_owned()
}

/// Waits until `metric` on `base` reaches `at_least`; panics after `within`.
pub async fn until_metric(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    at_least: f64,
    within: std::time::Duration,
) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let v = metric(client, base, name).await;
        if v >= at_least {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{base}: {name} stays at {v}, below {at_least}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until the `name` gauge of every one of `workers` reads 0; panics after a generous
/// deadline (gauges are published after the step that changes them, so they lag answers).
pub async fn until_zero(client: &reqwest::Client, workers: &[String], name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        for w in workers {
            let v = metric(client, w, name).await;
            if v != 0.0 {
                left.push(format!("{w}: {v}"));
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} stays non-zero: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The index, among `candidates`, of the first worker seen lending blocks.
pub async fn lender(client: &reqwest::Client, pool: &Pool, candidates: &[usize]) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        for &i in candidates {
            if metric(client, &pool.workers[i], "ilm_kv_blocks_lent").await > 0.0 {
                return i;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "none of {candidates:?} lends"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The demo model, written to a fresh temporary folder that lives as long as the guard.
pub fn demo_model() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("demo");
    infinite_llm_worker::demo_model::write_demo_model_if_missing(
        &model,
        &infinite_llm_worker::demo_model::DemoModelSpec::default(),
    )
    .unwrap();
    (dir, model)
}

/// A long greedy request of the membership tests: 64 + 120 tokens, 12 blocks of 16 where a
/// worker holds 8, so it borrows 4.
pub const LONG_PROMPT: usize = 64;
pub const LONG_NEW_TOKENS: usize = 120;

/// What the membership tests start from: one worker with a big pool whose texts are the
/// reference, and three workers of 8 blocks lending half, known to the gManager.
pub struct Pools {
    pub client: reqwest::Client,
    pub reference: Pool,
    pub pool: Pool,
    _model: tempfile::TempDir,
}

pub async fn reference_and_three_small() -> Pools {
    let (dir, model) = demo_model();
    let reference = start_pool(&model, 1, 256, &[]);
    let pool = start_pool(&model, 3, 8, &["--lend-fraction=0.5"]);
    // Let the workers' first heartbeats reach the gManager, so creditors are known.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    Pools {
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        reference,
        pool,
        _model: dir,
    }
}

/// Starts a worker that joins `pool` later (`serve` against its gManager), with `kv_blocks`
/// rBlocks lending half; returns it (killed on drop) and its API URL.
pub fn start_late_worker(model: &Path, pool: &Pool, kv_blocks: usize) -> (Launcher, String) {
    let port = free_port();
    let late = Launcher(
        Command::new(BIN)
            .arg("serve")
            .arg(format!("--model={}", model.display()))
            .arg("--served-model-name=demo")
            .arg("--host=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg("--worker-id=worker-late")
            .arg(format!("--gmanager-url={}", pool.gmanager_url))
            .arg(format!("--token-file={}", pool.token_file.display()))
            .arg("--peer-port=0")
            .arg(format!("--kv-blocks={kv_blocks}"))
            .arg("--lend-fraction=0.5")
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the late worker starts"),
    );
    (late, format!("http://127.0.0.1:{port}"))
}
