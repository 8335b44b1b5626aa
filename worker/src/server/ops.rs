//! Endpoints for operators and probes: `/health`, `/ready`, `/metrics`, `/v1/models`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::errors::ApiError;
use super::openai_types::{ModelCard, ModelList};
use super::state::{AppState, unix_now};
use crate::metrics;
use crate::request::GenerateRequest;

/// Liveness: the process answers and its engine thread runs (one that died fails this, so
/// the kubelet restarts the pod).
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match engine_failure(&state) {
        Some(err) => err.into_response(),
        None => Json(json!({"status": "ok"})).into_response(),
    }
}

fn engine_failure(state: &AppState) -> Option<ApiError> {
    let failure = state.loaded()?.engine.failure()?;
    Some(ApiError::engine_dead(&failure))
}

/// Readiness: the model has loaded, its engine runs, and the worker takes new requests.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if let Some(err) = engine_failure(&state) {
        return err.into_response();
    }
    if state.is_draining() {
        return ApiError::unavailable("The worker is draining.", Duration::from_secs(1))
            .into_response();
    }
    if state.loaded().is_none() {
        return ApiError::not_ready().into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = state
        .loaded()
        .map(|model| model.engine.stats())
        .unwrap_or_default();
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(&stats),
    )
        .into_response()
}

pub async fn models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let model = state.loaded().ok_or_else(ApiError::not_ready)?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.config.served_model_name.clone(),
            object: "model",
            created: unix_now(),
            owned_by: "infinite-llm",
            max_model_len: model.engine.max_context_tokens(),
        }],
    }))
}

/// Test hook, routed only when `ILM_TEST_HOOKS` is set and behind the cluster token: makes
/// the engine thread panic (through a request whose first draw panics), so tests can see the
/// worker turn unhealthy.
pub async fn panic_engine(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let model = state.loaded().ok_or_else(ApiError::not_ready)?;
    let mut request = GenerateRequest::greedy(vec![0], 1);
    request.sampling.panic_for_test = true;
    let mut events = model
        .engine
        .submit(request)
        .map_err(|err| ApiError::from_submit(err, "prompt", Duration::from_secs(1)))?;
    // Held until the engine ends it: a dropped receiver would cancel the request unrun.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    Ok(Json(json!({"status": "engine panic requested"})).into_response())
}
