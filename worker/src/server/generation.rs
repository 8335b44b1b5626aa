//! One request's run through the engine, as the API sees it: token events in; text deltas (with
//! stop sequences applied and logprobs aligned to the text) out. Both endpoints, streaming or not,
//! read their output from here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::Span;

use super::errors::ApiError;
use super::openai_types::Usage;
use super::stop_strings::{Scan, StopMatcher};
use crate::metrics::Metrics;
use crate::request::{Event, TokenLogprob};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};

/// Text released since the previous delta, with the logprobs of the tokens it completes.
#[derive(Debug, Default)]
pub struct Delta {
    pub text: String,
    /// Empty unless logprobs were asked for.
    pub tokens: Vec<TokenInfo>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && self.tokens.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub text: String,
    pub logprob: f32,
    /// Best first.
    pub top: Vec<(String, f32)>,
    /// Character offset of this token's text in the completion.
    pub text_offset: usize,
}

#[derive(Debug)]
pub enum Piece {
    Delta(Delta),
    /// The last piece; nothing follows it.
    Finished {
        delta: Delta,
        reason: &'static str,
        usage: Usage,
    },
}

/// A whole completion, for non-streaming answers.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub reason: &'static str,
    pub usage: Usage,
}

/// A token whose text has not been fully shown yet (held back by a possible stop sequence).
#[derive(Debug)]
struct PendingToken {
    id: u32,
    logprob: Option<TokenLogprob>,
    start_byte: usize,
    end_byte: usize,
    start_char: usize,
}

/// Owns the engine receiver: dropping a `Generation` cancels the request and frees its blocks.
pub struct Generation {
    events: mpsc::UnboundedReceiver<Event>,
    tokenizer: Arc<TextTokenizer>,
    /// Taken when the engine finishes, to flush what it still holds back.
    decoder: Option<IncrementalDecoder>,
    stops: StopMatcher,
    want_logprobs: bool,
    pending: VecDeque<PendingToken>,
    decoded_bytes: usize,
    decoded_chars: usize,
    released_bytes: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    arrived: Instant,
    last_token: Option<Instant>,
    metrics: Arc<Metrics>,
    span: Span,
    done: bool,
}

/// What a `Generation` needs besides the engine's receiver.
pub struct GenerationSetup {
    pub tokenizer: Arc<TextTokenizer>,
    /// Started from the prompt, so the first token's text comes out as in the full text.
    pub decoder: IncrementalDecoder,
    pub prompt_tokens: usize,
    pub stop: Vec<String>,
    pub want_logprobs: bool,
    pub arrived: Instant,
    pub metrics: Arc<Metrics>,
    pub span: Span,
}

impl Generation {
    pub fn new(events: mpsc::UnboundedReceiver<Event>, setup: GenerationSetup) -> Self {
        Self {
            events,
            decoder: Some(setup.decoder),
            tokenizer: setup.tokenizer,
            stops: StopMatcher::new(setup.stop),
            want_logprobs: setup.want_logprobs,
            pending: VecDeque::new(),
            decoded_bytes: 0,
            decoded_chars: 0,
            released_bytes: 0,
            prompt_tokens: setup.prompt_tokens,
            completion_tokens: 0,
            arrived: setup.arrived,
            last_token: None,
            metrics: setup.metrics,
            span: setup.span,
            done: false,
        }
    }

    /// The next non-empty piece of output; `None` after the last one or an error.
    pub async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        if self.done {
            return None;
        }
        loop {
            let event = self.events.recv().await;
            let piece = match event {
                Some(Event::Token { id, logprob }) => self.on_token(id, logprob),
                Some(Event::Finished { reason, .. }) => self.on_finished(reason.as_openai()),
                Some(Event::Failed { message, retryable }) => {
                    Err(ApiError::engine_failed(message, retryable))
                }
                None => Err(ApiError::internal(
                    "The engine stopped before finishing the request.",
                )),
            };
            match piece {
                Ok(Some(piece)) => return Some(Ok(piece)),
                Ok(None) => continue,
                Err(err) => {
                    self.done = true;
                    tracing::warn!(parent: &self.span, error = %err, "request failed");
                    return Some(Err(err));
                }
            }
        }
    }

    /// Reads the whole output.
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut out = Collected::default();
        while let Some(piece) = self.next().await {
            let (delta, end) = match piece? {
                Piece::Delta(delta) => (delta, None),
                Piece::Finished {
                    delta,
                    reason,
                    usage,
                } => (delta, Some((reason, usage))),
            };
            out.text.push_str(&delta.text);
            out.tokens.extend(delta.tokens);
            if let Some((reason, usage)) = end {
                out.reason = reason;
                out.usage = usage;
                return Ok(out);
            }
        }
        Err(ApiError::internal("The request ended without a result."))
    }

    fn on_token(
        &mut self,
        id: u32,
        logprob: Option<TokenLogprob>,
    ) -> Result<Option<Piece>, ApiError> {
        let now = Instant::now();
        match self.last_token.replace(now) {
            None => self
                .metrics
                .first_token(now - self.arrived, self.prompt_tokens),
            Some(previous) => self.metrics.next_token(now - previous),
        }
        self.completion_tokens += 1;
        let text = match self.decoder.as_mut() {
            Some(decoder) => decoder
                .push(id)
                .map_err(|err| ApiError::internal(format!("Decoding token {id}: {err}")))?,
            None => String::new(),
        };
        if self.want_logprobs {
            self.pending.push_back(PendingToken {
                id,
                logprob,
                start_byte: self.decoded_bytes,
                end_byte: self.decoded_bytes + text.len(),
                start_char: self.decoded_chars,
            });
        }
        self.decoded_bytes += text.len();
        self.decoded_chars += text.chars().count();
        match self.stops.push(&text) {
            Scan::Continue(shown) => {
                let delta = self.release(shown, false);
                Ok((!delta.is_empty()).then_some(Piece::Delta(delta)))
            }
            Scan::Stopped(shown) => {
                // Closing the channel tells the engine to drop the request at its next step.
                self.events.close();
                Ok(Some(self.finish(shown, "stop")))
            }
        }
    }

    /// The engine ended the request: what the decoder still held (an incomplete character) is
    /// text too, and may itself complete a stop sequence.
    fn on_finished(&mut self, reason: &'static str) -> Result<Option<Piece>, ApiError> {
        let tail = match self.decoder.take() {
            Some(decoder) => decoder
                .finish()
                .map_err(|err| ApiError::internal(format!("Decoding the last tokens: {err}")))?,
            None => String::new(),
        };
        self.decoded_bytes += tail.len();
        self.decoded_chars += tail.chars().count();
        Ok(Some(match self.stops.push(&tail) {
            Scan::Stopped(shown) => self.finish(shown, "stop"),
            Scan::Continue(shown) => {
                let held = self.stops.finish();
                self.finish(shown + &held, reason)
            }
        }))
    }

    /// Shows `text` and the tokens it completes. In the last delta, a token that ran into a stop
    /// sequence counts as shown too, since its text was cut there.
    fn release(&mut self, text: String, last: bool) -> Delta {
        self.released_bytes += text.len();
        let mut tokens = Vec::new();
        while let Some(token) = self.pending.front() {
            let shown = token.end_byte <= self.released_bytes
                || (last && token.start_byte < self.released_bytes);
            if !shown {
                break;
            }
            let token = self.pending.pop_front().expect("front exists");
            tokens.push(self.token_info(token));
        }
        if last {
            self.pending.clear();
        }
        Delta { text, tokens }
    }

    fn token_info(&self, token: PendingToken) -> TokenInfo {
        let (logprob, top) = match token.logprob {
            Some(lp) => (
                lp.logprob,
                lp.top
                    .into_iter()
                    .map(|(id, p)| (self.tokenizer.token_text(id), p))
                    .collect(),
            ),
            None => (0.0, Vec::new()),
        };
        TokenInfo {
            text: self.tokenizer.token_text(token.id),
            logprob,
            top,
            text_offset: token.start_char,
        }
    }

    fn finish(&mut self, text: String, reason: &'static str) -> Piece {
        self.done = true;
        let delta = self.release(text, true);
        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
        let elapsed = self.arrived.elapsed();
        self.metrics.finished(reason, elapsed);
        tracing::info!(
            parent: &self.span,
            finish_reason = reason,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            elapsed_ms = elapsed.as_millis() as u64,
            "request finished"
        );
        Piece::Finished {
            delta,
            reason,
            usage,
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(
                parent: &self.span,
                completion_tokens = self.completion_tokens,
                "request cancelled: the client went away"
            );
        }
    }
}
