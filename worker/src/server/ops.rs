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

/// Liveness: the process answers.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the model has loaded and the worker takes new requests.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
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
