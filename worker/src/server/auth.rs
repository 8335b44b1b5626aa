//! Bearer-token checks: the optional API key on `/v1/*` and the cluster token on internal routes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::errors::ApiError;

/// A credential read from a file. Its `Debug` never shows the value, so it cannot leak into logs.
#[derive(Clone)]
pub struct Secret(Arc<str>);

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

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Arc::from(value.into()))
    }

    /// Reads the file and trims surrounding whitespace (Kubernetes Secrets often end in a newline).
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
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
        Ok(Self::new(value))
    }

    /// The value, for clients that must present it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when `headers` carry `Authorization: Bearer <this secret>`.
    pub fn authorizes(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|presented| {
                constant_time_eq(presented.trim().as_bytes(), self.0.as_bytes())
            })
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..len {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Middleware: `/v1/*` needs the API key when one is configured.
pub async fn require_api_key(
    State(key): State<Option<Secret>>,
    request: Request,
    next: Next,
) -> Response {
    match key {
        Some(key) if !key.authorizes(request.headers()) => {
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
        Some(token) if token.authorizes(request.headers()) => next.run(request).await,
        _ => ApiError::invalid_cluster_token().into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_matches_only_equal_inputs() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_header_is_required() {
        let secret = Secret::new("tok");
        let mut headers = HeaderMap::new();
        assert!(!secret.authorizes(&headers));
        headers.insert(header::AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert!(secret.authorizes(&headers));
        headers.insert(header::AUTHORIZATION, "Basic tok".parse().unwrap());
        assert!(!secret.authorizes(&headers));
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    }
}
