//! The request body extractor of both completion endpoints: OpenAI-style errors for every
//! failure (never axum's plain text), unknown fields refused by name, wrong types named.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::errors::ApiError;
use super::openai_types::CommonFields;
use super::request_fields::{field_names, parse, screen, split};

/// A completion request: the fields both endpoints share, and `E`, the endpoint's own.
/// Lenient about `Content-Type` (curl users often leave it out).
pub struct OpenAiBody<E>(pub CommonFields, pub E);

impl<S, E> FromRequest<S> for OpenAiBody<E>
where
    S: Send + Sync,
    E: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large()
            } else {
                ApiError::malformed(format!("Could not read the request body: {rejection}"))
            }
        })?;
        let body = match serde_json::from_slice(&bytes) {
            Ok(Value::Object(body)) => body,
            Ok(_) => {
                return Err(ApiError::malformed(
                    "The request body must be a JSON object.",
                ));
            }
            Err(err) => return Err(ApiError::malformed(format!("Invalid JSON body: {err}"))),
        };
        screen(&body, &[field_names::<CommonFields>(), field_names::<E>()])?;
        let (common, own) = split::<CommonFields>(body);
        Ok(OpenAiBody(parse(common)?, parse(own)?))
    }
}
