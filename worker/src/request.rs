//! What a client asks the engine for, and what the engine streams back.

use std::sync::Arc;
use std::time::Duration;

use crate::logit_adjust::LogitAdjust;

/// How the next token is chosen. Validated by the API layer before it reaches the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    /// Same seed, same prompt, same output. `None` draws a fresh seed.
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Number of most likely alternatives to report with each token (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Tokens that end the request besides end-of-sequence (even with `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Logit changes before the draw (bias, penalties, `min_p`, `min_tokens`).
    pub adjust: Option<Arc<LogitAdjust>>,
    /// Test hook (`/debug/panic-engine`): the engine thread panics on this request's first
    /// draw. Never set by the OpenAI API.
    pub panic_for_test: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            max_tokens: 16,
            logprobs: None,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            adjust: None,
            panic_for_test: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub sampling: SamplingParams,
    /// Tokens that end the request (the tokenizer's end-of-sequence ids), unless `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
}

impl GenerateRequest {
    /// Whether `token` ends the request: one of its `stop_token_ids`, or an end-of-sequence
    /// token unless it ignores them.
    pub fn ends_on(&self, token: u32) -> bool {
        self.sampling.stop_token_ids.contains(&token)
            || (!self.sampling.ignore_eos && self.stop_token_ids.contains(&token))
    }

    /// Greedy decoding of exactly `max_tokens` tokens, end-of-sequence or not: what benchmarks
    /// and tests that compare outputs want.
    pub fn greedy(prompt_tokens: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                max_tokens,
                ignore_eos: true,
                ..SamplingParams::default()
            },
            stop_token_ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was produced.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely tokens at this position with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// One item of a request's output stream. The stream ends after `Finished` or `Failed`.
/// Dropping the receiving end cancels the request and frees its KV blocks at the next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed {
        message: String,
        /// The client may retry elsewhere (for example after the engine was asked to shut down).
        retryable: bool,
    },
}

/// Why the engine refused a request before running it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error(
        "this model's maximum context length is {max} tokens; the request needs {requested} tokens ({prompt} in the prompt plus up to {max_tokens} to generate)"
    )]
    ContextLengthExceeded {
        max: usize,
        requested: usize,
        prompt: usize,
        max_tokens: usize,
    },
    #[error("the server is overloaded: {waiting} requests are already waiting")]
    Overloaded {
        waiting: usize,
        retry_after: Duration,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the prompt is empty")]
    EmptyPrompt,
}
