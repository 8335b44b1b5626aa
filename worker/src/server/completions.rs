//! `POST /v1/completions`.

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
    CommonFields, CompletionChoice, CompletionFields, CompletionLogprobs, TopLogprobs,
};
use super::params;
use super::sse::{self, ChunkFormat, ResponseMeta};
use super::state::{AppState, PromptField, request_id, unix_now};

/// OpenAI's default for this endpoint.
const DEFAULT_MAX_TOKENS: usize = 16;
const MAX_LOGPROBS: i64 = 5;

enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    OpenAiBody(common, request): OpenAiBody<CompletionFields>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let id = request_id("cmpl");
    let span = tracing::info_span!("completion", id = %id);
    handle(state, common, request, id, arrived)
        .instrument(span)
        .await
}

async fn handle(
    state: Arc<AppState>,
    common: CommonFields,
    request: CompletionFields,
    id: String,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let model = state.model(&common.model)?;
    reject_unsupported(&request)?;
    let logprobs = match request.logprobs {
        Some(n) if !(0..=MAX_LOGPROBS).contains(&n) => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {n}."),
            ));
        }
        other => other.map(|n| n as usize),
    };
    let max_tokens = common.max_tokens.map(|v| (v, "max_tokens"));
    let vocab = model.tokenizer.vocab_size();
    let params = params::validate(&common, max_tokens, logprobs, vocab)?;
    let prompt = match parse_prompt(request.prompt)? {
        Prompt::Text(text) => model.encode(text).await?,
        Prompt::Tokens(ids) => {
            model.check_token_ids(&ids)?;
            ids
        }
    };
    let generation = state.start(
        model,
        prompt,
        &params,
        params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        PromptField::Prompt,
        arrived,
    )?;
    let meta = ResponseMeta {
        id,
        created: unix_now(),
        model: common.model,
    };
    let format = CompletionFormat {
        logprobs: logprobs.is_some(),
    };
    if params.stream {
        return Ok(sse::respond(generation, format, meta, params.include_usage));
    }
    let done = generation.collect().await?;
    let choice = format.choice(done.text, done.tokens, Some(done.reason));
    let mut body = meta.envelope(CompletionFormat::OBJECT, vec![choice]);
    body.usage = Some(Some(done.usage));
    Ok(Json(body).into_response())
}

fn reject_unsupported(request: &CompletionFields) -> Result<(), ApiError> {
    if request.echo == Some(true) {
        return Err(ApiError::invalid_param("echo", "echo is not supported."));
    }
    if request.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid_param(
            "best_of",
            "Only best_of=1 is supported.",
        ));
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "suffix is not supported.",
        ));
    }
    Ok(())
}

/// A string, a list of token ids, or a list holding exactly one of those.
fn parse_prompt(value: Value) -> Result<Prompt, ApiError> {
    let invalid = || {
        ApiError::invalid_param(
            "prompt",
            "prompt must be a string, a list of token ids, or a list holding one of those.",
        )
    };
    let empty = || ApiError::invalid_param("prompt", "The prompt is empty.");
    let prompt = match value {
        Value::String(text) => Prompt::Text(text),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            Prompt::Tokens(token_ids(&items).ok_or_else(invalid)?)
        }
        Value::Array(mut items) if items.len() == 1 => match items.pop() {
            Some(Value::String(text)) => Prompt::Text(text),
            Some(Value::Array(ids)) => Prompt::Tokens(token_ids(&ids).ok_or_else(invalid)?),
            _ => return Err(invalid()),
        },
        Value::Array(items) if items.len() > 1 => {
            return Err(ApiError::invalid_param(
                "prompt",
                "Batched prompts are not supported; send one prompt per request.",
            ));
        }
        _ => return Err(invalid()),
    };
    match &prompt {
        Prompt::Text(text) if text.is_empty() => Err(empty()),
        Prompt::Tokens(ids) if ids.is_empty() => Err(empty()),
        _ => Ok(prompt),
    }
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect()
}

struct CompletionFormat {
    logprobs: bool,
}

impl CompletionFormat {
    fn choice(
        &self,
        text: String,
        tokens: Vec<TokenInfo>,
        finish_reason: Option<&'static str>,
    ) -> CompletionChoice {
        CompletionChoice {
            index: 0,
            text,
            logprobs: self.logprobs.then(|| logprobs_object(tokens)),
            finish_reason,
        }
    }
}

impl ChunkFormat for CompletionFormat {
    type Choice = CompletionChoice;
    const OBJECT: &'static str = "text_completion";

    fn opening(&self) -> Option<CompletionChoice> {
        None
    }

    fn delta(&self, delta: Delta) -> CompletionChoice {
        self.choice(delta.text, delta.tokens, None)
    }

    fn finish(&self, reason: &'static str) -> CompletionChoice {
        self.choice(String::new(), Vec::new(), Some(reason))
    }
}

fn logprobs_object(tokens: Vec<TokenInfo>) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for token in tokens {
        out.tokens.push(token.text);
        out.token_logprobs.push(token.logprob);
        out.top_logprobs.push(TopLogprobs(token.top));
        out.text_offset.push(token.text_offset);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn param(err: ApiError) -> Option<String> {
        err.body().param.clone()
    }

    #[test]
    fn prompt_shapes() {
        assert!(matches!(parse_prompt(json!("hi")), Ok(Prompt::Text(t)) if t == "hi"));
        assert!(matches!(parse_prompt(json!([1, 2])), Ok(Prompt::Tokens(t)) if t == [1, 2]));
        assert!(matches!(parse_prompt(json!(["hi"])), Ok(Prompt::Text(t)) if t == "hi"));
        assert!(matches!(parse_prompt(json!([[3]])), Ok(Prompt::Tokens(t)) if t == [3]));
        for bad in [
            json!(""),
            json!([]),
            json!(["a", "b"]),
            json!([-1]),
            json!(3),
            json!({}),
        ] {
            let err = parse_prompt(bad.clone()).err().expect("rejected");
            assert_eq!(param(err).as_deref(), Some("prompt"), "{bad}");
        }
    }
}
