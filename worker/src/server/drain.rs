//! Draining: `POST /drain` (behind the cluster token) stops new requests and lending, asks the
//! homes that borrowed here to take their blocks back, and answers once nothing depends on
//! this worker; the process then leaves the gManager and exits, as on SIGTERM.
//! [`request_drain`] is the client the Kubernetes preStop hook runs.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::json;

use super::auth::Secret;
use super::state::AppState;

pub async fn handle(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    tracing::info!("drain requested: no new requests; waiting for running ones and loans");
    state.drain().await;
    tracing::info!("drained");
    Json(json!({"status": "drained"}))
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("sending the drain request to {url}: {source}")]
    Send { url: String, source: reqwest::Error },
    #[error("the worker at {url} refused to drain ({status}): {body}")]
    Refused {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
}

/// Asks the worker at `base_url` to drain and waits until it has.
pub async fn request_drain(base_url: &str, token: &Secret) -> Result<(), DrainError> {
    let url = format!("{}/drain", base_url.trim_end_matches('/'));
    let send_error = |source| DrainError::Send {
        url: url.clone(),
        source,
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(send_error)?;
    let response = client
        .post(&url)
        .bearer_auth(token.expose())
        .send()
        .await
        .map_err(send_error)?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    Err(DrainError::Refused { url, status, body })
}
