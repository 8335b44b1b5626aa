//! The OpenAI wire format: request bodies we accept and response bodies we send.
//!
//! Fields that take several JSON shapes (`prompt`, `stop`, message `content`) arrive as raw
//! `serde_json::Value`s and are checked by hand, so a bad one gets an error naming its field.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;

use serde_json::Value;

/// Sampling and streaming fields shared by `/v1/completions` and `/v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct CommonFields {
    pub model: String,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (as in vLLM): -1 or 0 turns it off.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string) to a bias from -100 to 100.
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// Extension (as in vLLM): keep generating past end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
    /// Extensions (as in vLLM).
    pub repetition_penalty: Option<f64>,
    pub min_p: Option<f64>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Vec<i64>>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The fields only `/v1/completions` takes.
#[derive(Debug, Deserialize)]
pub struct CompletionFields {
    pub prompt: Value,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
}

/// The fields only `/v1/chat/completions` takes.
#[derive(Debug, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<ChatMessageIn>,
    /// The newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Value>,
}

#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// The outer object of every completion answer and stream chunk; `C` is the choice type.
#[derive(Debug, Serialize)]
pub struct Envelope<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    /// Absent in plain stream chunks, `null` in chunks of a stream that will end with a usage
    /// chunk (OpenAI's `include_usage`), and the figures in full answers and that last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions logprobs object: parallel arrays, one entry per token.
#[derive(Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<TopLogprobs>,
    pub text_offset: Vec<usize>,
}

/// A token-text to log-probability object that keeps the best-first order on the wire.
#[derive(Debug, Clone, Default)]
pub struct TopLogprobs(pub Vec<(String, f32)>);

impl Serialize for TopLogprobs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

/// Chat's logprobs object: one entry per generated token.
#[derive(Debug, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, best first.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_absent_null_or_present() {
        let chunk = |usage| Envelope::<u8> {
            id: "x".into(),
            object: "o",
            created: 0,
            model: "m".into(),
            choices: vec![],
            usage,
        };
        let absent = serde_json::to_value(chunk(None)).unwrap();
        assert!(absent.get("usage").is_none());
        let null = serde_json::to_value(chunk(Some(None))).unwrap();
        assert!(null["usage"].is_null());
        let full = serde_json::to_value(chunk(Some(Some(Usage::new(3, 4))))).unwrap();
        assert_eq!(full["usage"]["total_tokens"], 7);
    }

    #[test]
    fn top_logprobs_keep_their_order() {
        let top = TopLogprobs(vec![("b".into(), -0.5), ("a".into(), -1.5)]);
        assert_eq!(
            serde_json::to_string(&top).unwrap(),
            r#"{"b":-0.5,"a":-1.5}"#
        );
    }
}
