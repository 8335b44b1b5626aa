//! The worker's HTTP API: OpenAI-compatible `/v1/*`, probes and metrics, and internal routes
//! behind the cluster token.
//!
//! ```text
//! /v1/completions, /v1/chat/completions, /v1/models   API key (optional)
//! /health, /ready, /metrics                           open (probes, Prometheus)
//! /drain                                              cluster token
//! /debug/panic-engine (only with ILM_TEST_HOOKS set)   cluster token
//! ```

mod auth;
mod chat;
mod completions;
mod drain;
mod errors;
mod extract;
mod generation;
mod openai_types;
mod ops;
mod params;
mod request_fields;
mod serve;
mod sse;
mod state;
mod stop_strings;
mod tokenize_gate;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::Response;
use axum::routing::{get, post};
use tracing::{Instrument, Span};

pub use auth::{Secret, SecretError, secret_from_file};
pub use drain::{DrainError, request_drain};
pub use errors::ApiError;
pub use serve::{
    DEMO_MODEL_DIR, EngineArgs, ServeArgs, folder_name, model_dir_or_demo, serve, stop_signal,
};

use crate::engine::EngineHandle;
use crate::tokenizer::TextTokenizer;
use state::{AppState, LoadedModel};

/// Set (to anything) in tests only: routes `POST /debug/panic-engine` (cluster token), which
/// makes the engine thread panic.
pub const TEST_HOOKS_ENV: &str = "ILM_TEST_HOOKS";

/// Request bodies larger than this are refused with 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name clients put in `model`.
    pub served_model_name: String,
    /// When set, `/v1/*` needs `Authorization: Bearer <api key>`.
    pub api_key: Option<Secret>,
    /// Guards internal routes; without it they are closed.
    pub cluster_token: Option<Secret>,
    pub max_body_bytes: usize,
    /// Names this worker in the logs of every request.
    pub worker_id: Option<String>,
}

/// The API of one worker. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.state.metrics
    }

    /// A server that answers probes at once and the API once [`Server::install`] is called.
    pub fn new(config: ServerConfig) -> Self {
        Self {
            state: Arc::new(AppState::new(config)),
        }
    }

    /// Hands the loaded model to the API; `/ready` turns 200.
    pub fn install(&self, engine: EngineHandle, tokenizer: TextTokenizer) {
        self.state.install(LoadedModel {
            engine,
            tokenizer: Arc::new(tokenizer),
            tokenize: Default::default(),
        });
    }

    /// Stops taking new requests and lending, and resolves once nothing depends on this
    /// worker: its requests are done and the blocks it lent are back.
    pub async fn drain(&self) {
        self.state.drain().await;
    }

    /// Resolves once a drain (`POST /drain` or [`Server::drain`]) has completed.
    pub async fn drained(&self) {
        self.state.wait_drained().await;
    }

    pub fn router(&self) -> Router {
        let config = &self.state.config;
        let worker_span = match &config.worker_id {
            Some(id) => tracing::info_span!("worker", id = %id),
            None => Span::none(),
        };
        let openai = Router::new()
            .route("/v1/completions", post(completions::create))
            .route("/v1/chat/completions", post(chat::create))
            .route("/v1/models", get(ops::models))
            .route_layer(from_fn_with_state(
                config.api_key.clone(),
                auth::require_api_key,
            ));
        let mut internal = Router::new().route("/drain", post(drain::handle));
        if std::env::var_os(TEST_HOOKS_ENV).is_some() {
            internal = internal.route("/debug/panic-engine", post(ops::panic_engine));
        }
        let internal = internal.route_layer(from_fn_with_state(
            config.cluster_token.clone(),
            auth::require_cluster_token,
        ));
        Router::new()
            .merge(openai)
            .merge(internal)
            .route("/health", get(ops::health))
            .route("/ready", get(ops::ready))
            .route("/metrics", get(ops::metrics))
            .fallback(route_not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(config.max_body_bytes))
            .layer(from_fn_with_state(worker_span, in_span))
            .with_state(self.state.clone())
    }
}

/// Runs each request inside the worker's span, so request logs carry the worker id.
async fn in_span(State(span): State<Span>, request: Request, next: Next) -> Response {
    next.run(request).instrument(span).await
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
