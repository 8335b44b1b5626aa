//! Bearer-token checks: the optional API key on `/v1/*` and the cluster token on internal routes.

use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::errors::ApiError;

pub use infinite_llm_protocol::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path} is empty")]
    Empty { path: PathBuf },
}

/// Reads a secret file and trims surrounding whitespace (Kubernetes Secrets often end in a
/// newline).
pub fn secret_from_file(path: &Path) -> Result<Secret, SecretError> {
    let raw = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        path: path.to_owned(),
        source,
    })?;
    let value = raw.trim();
    if value.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(value))
}

/// True when `headers` carry `Authorization: Bearer <secret>`.
fn authorizes(secret: &Secret, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|presented| secret.matches(presented.trim()))
}

/// Middleware: `/v1/*` needs the API key when one is configured.
pub async fn require_api_key(
    State(key): State<Option<Secret>>,
    request: Request,
    next: Next,
) -> Response {
    match key {
        Some(key) if !authorizes(&key, request.headers()) => {
            ApiError::invalid_api_key().into_response()
        }
        _ => next.run(request).await,
    }
}

/// Middleware: internal routes need the cluster token. Without a configured token they are closed,
/// since an open drain endpoint would let anyone take the worker out of service.
pub async fn require_cluster_token(
    State(token): State<Option<Secret>>,
    request: Request,
    next: Next,
) -> Response {
    match token {
        Some(token) if authorizes(&token, request.headers()) => next.run(request).await,
        _ => ApiError::invalid_cluster_token().into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_is_required() {
        let secret = Secret::new("tok");
        let mut headers = HeaderMap::new();
        assert!(!authorizes(&secret, &headers));
        headers.insert(header::AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert!(authorizes(&secret, &headers));
        headers.insert(header::AUTHORIZATION, "Bearer tok2".parse().unwrap());
        assert!(!authorizes(&secret, &headers));
        headers.insert(header::AUTHORIZATION, "Basic tok".parse().unwrap());
        assert!(!authorizes(&secret, &headers));
    }
}
