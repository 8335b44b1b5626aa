//! Shared by the `api_*` tests: a real server on the demo model, in this process, on a loopback port.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::time::Duration;

use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model_if_missing};
use infinite_llm_worker::engine::{self, EngineHandle, EngineOptions};
use infinite_llm_worker::server::{DEFAULT_MAX_BODY_BYTES, Secret, Server, ServerConfig};
use infinite_llm_worker::tokenizer::TextTokenizer;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;
use tempfile::TempDir;

pub const MODEL: &str = "demo";
pub const CLUSTER_TOKEN: &str = "cluster-token-for-tests";

pub struct Options {
    pub engine: EngineOptions,
    pub api_key: Option<&'static str>,
    pub max_body_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            engine: EngineOptions {
                kv_blocks: Some(256),
                ..EngineOptions::default()
            },
            api_key: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

pub struct TestServer {
    pub base: String,
    pub engine: EngineHandle,
    pub client: reqwest::Client,
    _model_dir: TempDir,
}

pub async fn start(options: Options) -> TestServer {
    let model_dir = tempfile::tempdir().expect("temp dir");
    let dir = model_dir.path().to_owned();
    let engine_options = options.engine;
    let (engine, tokenizer) = tokio::task::spawn_blocking(move || {
        write_demo_model_if_missing(&dir, &DemoModelSpec::default()).expect("demo model");
        let engine = engine::start(&dir, engine_options).expect("engine starts");
        let tokenizer = TextTokenizer::from_model_dir(&dir).expect("tokenizer loads");
        (engine, tokenizer)
    })
    .await
    .expect("loading task");
    let server = Server::new(ServerConfig {
        served_model_name: MODEL.to_owned(),
        api_key: options.api_key.map(Secret::new),
        cluster_token: Some(Secret::new(CLUSTER_TOKEN)),
        max_body_bytes: options.max_body_bytes,
        worker_id: None,
    });
    server.install(engine.clone(), tokenizer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(axum::serve(listener, server.router()).into_future());
    TestServer {
        base,
        engine,
        client: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        _model_dir: model_dir,
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.send(self.client.post(self.url(path)).json(body)).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(self.client.get(self.url(path))).await
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {text:?}"));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// The `data:` payloads of a streaming request, in order (`[DONE]` included).
    pub async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "streams are SSE"
        );
        let text = response.text().await.expect("body");
        sse_data(&text)
    }

    /// Polls until `check` holds on the engine's stats, or panics after `timeout`.
    pub async fn wait_for_stats(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&engine::EngineStats) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let stats = self.engine.stats();
            if check(&stats) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: still {stats:?} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Splits an SSE body into its `data:` payloads, skipping comments (keep-alives).
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data: ").or(line.strip_prefix("data:")))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Asserts an OpenAI-style error answer.
pub fn assert_error(
    answer: &Answer,
    status: u16,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) {
    assert_eq!(answer.status.as_u16(), status, "status of {}", answer.body);
    assert_eq!(
        answer.headers["content-type"], "application/json",
        "errors are JSON"
    );
    let error = &answer.body["error"];
    let keys: Vec<&str> = error
        .as_object()
        .unwrap_or_else(|| panic!("no error object in {}", answer.body))
        .keys()
        .map(String::as_str)
        .collect();
    for key in ["message", "type", "param", "code"] {
        assert!(keys.contains(&key), "{key} missing from {}", answer.body);
    }
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        answer.body
    );
    assert_eq!(error["type"], kind, "type in {}", answer.body);
    assert_eq!(error["param"].as_str(), param, "param in {}", answer.body);
    assert_eq!(error["code"].as_str(), code, "code in {}", answer.body);
}
