//! Every error the API answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::request::SubmitError;

/// An error answer. Build it with the constructors so status, type and code stay consistent.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
struct ErrorEnvelope<'a> {
    error: &'a ErrorBody,
}

/// The inner object; also sent as an SSE event when a stream fails after it started.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

const INVALID_REQUEST: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                message: message.into(),
                kind,
                param: None,
                code: None,
            },
            retry_after: None,
        }
    }

    fn with_param(mut self, param: &str) -> Self {
        self.body.param = Some(param.to_owned());
        self
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.body.code = Some(code);
        self
    }

    fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// A bad body: malformed JSON, a field of the wrong type, a missing field.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message)
    }

    /// A well-formed body with an invalid value for `param`.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message).with_param(param)
    }

    /// Marks a prompt error as the context being too small for it.
    pub fn context_length_exceeded(self) -> Self {
        self.with_code("context_length_exceeded")
    }

    /// Too much work queued: come back after `retry_after`.
    pub fn overloaded(message: impl Into<String>, retry_after: Duration) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            .with_code("server_overloaded")
            .with_retry_after(retry_after)
    }

    pub fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID_REQUEST,
            "The request body is too large.",
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            format!("Invalid URL ({method} {path})"),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID_REQUEST,
            format!("Method {method} is not allowed for {path}"),
        )
    }

    pub fn invalid_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            INVALID_REQUEST,
            "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`.",
        )
        .with_code("invalid_api_key")
    }

    pub fn invalid_cluster_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            INVALID_REQUEST,
            "This endpoint needs the cluster token as `Authorization: Bearer <token>`.",
        )
        .with_code("invalid_cluster_token")
    }

    /// The model is still loading; clients should come back shortly.
    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            "The model is still loading.",
        )
        .with_code("model_loading")
        .with_retry_after(Duration::from_secs(5))
    }

    /// No backend could take the request (used by the local front door too).
    pub fn unavailable(message: impl Into<String>, retry_after: Duration) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, message)
            .with_code("service_unavailable")
            .with_retry_after(retry_after)
    }

    /// The engine thread is gone: the worker cannot serve until it restarts.
    pub fn engine_dead(why: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            format!("The engine is not running ({why}); this worker needs a restart."),
        )
        .with_code("engine_dead")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, SERVER_ERROR, message)
    }

    /// Maps an engine refusal. `prompt_param` names the field that carried the prompt
    /// (`prompt` or `messages`), so clients know what to shorten.
    pub fn from_submit(err: SubmitError, prompt_param: &str, retry_after: Duration) -> Self {
        let message = err.to_string();
        match err {
            SubmitError::ContextLengthExceeded { .. } => {
                Self::invalid_param(prompt_param, message).context_length_exceeded()
            }
            SubmitError::EmptyPrompt => Self::invalid_param(prompt_param, message),
            SubmitError::Overloaded { retry_after, .. } => Self::overloaded(message, retry_after),
            SubmitError::ShuttingDown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, message)
                    .with_code("shutting_down")
                    .with_retry_after(retry_after)
            }
        }
    }

    /// The engine gave up on a request it had accepted.
    pub fn engine_failed(message: String, retryable: bool) -> Self {
        if retryable {
            Self::unavailable(message, Duration::from_secs(1))
        } else {
            Self::internal(message)
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn body(&self) -> &ErrorBody {
        &self.body
    }

    /// The `data:` payload for a stream that fails after its first chunk.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&ErrorEnvelope { error: &self.body })
            .expect("error bodies always serialize")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response();
        if let Some(after) = self.retry_after {
            // Retry-After takes whole seconds; round up so clients never retry too early.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.body.message, self.status)
    }
}

impl std::error::Error for ApiError {}
