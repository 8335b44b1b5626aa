//! `POST /v1/chat/completions`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tracing::Instrument;

use super::errors::ApiError;
use super::extract::OpenAiBody;
use super::generation::{Delta, TokenInfo};
use super::openai_types::{
    ChatChoice, ChatChunkChoice, ChatDelta, ChatFields, ChatLogprobs, ChatMessageIn,
    ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, CommonFields,
};
use super::params;
use super::sse::{self, ChunkFormat, ResponseMeta};
use super::state::{AppState, PromptField, request_id, unix_now};
use crate::tokenizer::ChatMessage;

const ASSISTANT: &str = "assistant";
/// OpenAI's bound on `top_logprobs`.
const MAX_TOP_LOGPROBS: i64 = 20;

pub async fn create(
    State(state): State<Arc<AppState>>,
    OpenAiBody(common, request): OpenAiBody<ChatFields>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let id = request_id("chatcmpl");
    let span = tracing::info_span!("chat_completion", id = %id);
    handle(state, common, request, id, arrived)
        .instrument(span)
        .await
}

async fn handle(
    state: Arc<AppState>,
    common: CommonFields,
    request: ChatFields,
    id: String,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let model = state.model(&common.model)?;
    let logprobs = logprobs(&request)?;
    let max_tokens = match (request.max_completion_tokens, common.max_tokens) {
        (Some(v), _) => Some((v, "max_completion_tokens")),
        (None, Some(v)) => Some((v, "max_tokens")),
        (None, None) => None,
    };
    let vocab = model.tokenizer.vocab_size();
    let params = params::validate(&common, max_tokens, logprobs, vocab)?;
    let prompt = model.encode_chat(chat_messages(request.messages)?).await?;
    // As in vLLM: without a limit, a reply may fill whatever context the prompt leaves.
    let max_tokens = params.max_tokens.unwrap_or_else(|| {
        model
            .engine
            .max_context_tokens()
            .saturating_sub(prompt.len())
            .max(1)
    });
    let generation = state.start(
        model,
        prompt,
        &params,
        max_tokens,
        PromptField::Messages,
        arrived,
    )?;
    let meta = ResponseMeta {
        id,
        created: unix_now(),
        model: common.model,
    };
    let format = ChatFormat {
        logprobs: logprobs.is_some(),
    };
    if params.stream {
        return Ok(sse::respond(generation, format, meta, params.include_usage));
    }
    let done = generation.collect().await?;
    let choice = ChatChoice {
        index: 0,
        message: ChatMessageOut {
            role: ASSISTANT,
            content: done.text,
        },
        logprobs: format.logprobs(done.tokens),
        finish_reason: done.reason,
    };
    let mut body = meta.envelope("chat.completion", vec![choice]);
    body.usage = Some(Some(done.usage));
    Ok(Json(body).into_response())
}

/// How many alternatives each token's logprobs list (`None`: no logprobs): `logprobs: true`
/// with `top_logprobs` from 0 to 20.
fn logprobs(request: &ChatFields) -> Result<Option<usize>, ApiError> {
    match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (_, Some(n)) if !(0..=MAX_TOP_LOGPROBS).contains(&n) => Err(ApiError::invalid_param(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}."),
        )),
        (false, Some(_)) => Err(ApiError::invalid_param(
            "top_logprobs",
            "top_logprobs needs logprobs set to true.",
        )),
        (true, n) => Ok(Some(n.unwrap_or(0) as usize)),
        (false, None) => Ok(None),
    }
}

/// Message content is a string or a list of `{"type": "text", "text": ...}` parts, joined.
fn chat_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must hold at least one message.",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let content = match message.content {
                Some(Value::String(text)) => text,
                Some(Value::Array(parts)) => text_parts(&parts).ok_or_else(|| {
                    ApiError::invalid_param(
                        &format!("messages[{i}].content"),
                        "Only content parts of type \"text\" are supported.",
                    )
                })?,
                _ => {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].content"),
                        "content must be a string or a list of text parts.",
                    ));
                }
            };
            Ok(ChatMessage {
                role: message.role,
                content,
            })
        })
        .collect()
}

fn text_parts(parts: &[Value]) -> Option<String> {
    parts
        .iter()
        .map(
            |part| match (part.get("type")?.as_str()?, part.get("text")?.as_str()) {
                ("text", Some(text)) => Some(text),
                _ => None,
            },
        )
        .collect()
}

struct ChatFormat {
    logprobs: bool,
}

impl ChatFormat {
    fn logprobs(&self, tokens: Vec<TokenInfo>) -> Option<ChatLogprobs> {
        self.logprobs.then(|| ChatLogprobs {
            content: tokens
                .into_iter()
                .map(|t| ChatTokenLogprob {
                    bytes: t.text.as_bytes().to_vec(),
                    top_logprobs: t
                        .top
                        .into_iter()
                        .map(|(token, logprob)| ChatTopLogprob {
                            bytes: token.as_bytes().to_vec(),
                            token,
                            logprob,
                        })
                        .collect(),
                    token: t.text,
                    logprob: t.logprob,
                })
                .collect(),
        })
    }
}

impl ChunkFormat for ChatFormat {
    type Choice = ChatChunkChoice;
    const OBJECT: &'static str = "chat.completion.chunk";

    fn opening(&self) -> Option<ChatChunkChoice> {
        Some(ChatChunkChoice {
            index: 0,
            delta: ChatDelta {
                role: Some(ASSISTANT),
                content: Some(String::new()),
            },
            logprobs: None,
            finish_reason: None,
        })
    }

    fn delta(&self, delta: Delta) -> ChatChunkChoice {
        ChatChunkChoice {
            index: 0,
            delta: ChatDelta {
                role: None,
                content: Some(delta.text),
            },
            logprobs: self.logprobs(delta.tokens),
            finish_reason: None,
        }
    }

    fn finish(&self, reason: &'static str) -> ChatChunkChoice {
        ChatChunkChoice {
            index: 0,
            delta: ChatDelta::default(),
            logprobs: None,
            finish_reason: Some(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn messages(value: Value) -> Result<Vec<ChatMessage>, ApiError> {
        chat_messages(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn content_is_a_string_or_text_parts() {
        let out = messages(json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]))
        .unwrap();
        assert_eq!(out[0].content, "be brief");
        assert_eq!(out[1].content, "ab");
        assert_eq!(out[1].role, "user");
    }

    #[test]
    fn bad_content_names_the_message() {
        let err =
            messages(json!([{"role": "user", "content": [{"type": "image_url"}]}])).unwrap_err();
        assert_eq!(err.body().param.as_deref(), Some("messages[0].content"));
        let err = messages(json!([])).unwrap_err();
        assert_eq!(err.body().param.as_deref(), Some("messages"));
    }
}
