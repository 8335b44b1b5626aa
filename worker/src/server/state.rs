//! What every handler shares: the loaded model, the metrics, and whether the worker is draining.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::Span;

use super::ServerConfig;
use super::errors::ApiError;
use super::generation::{Generation, GenerationSetup};
use super::params::Params;
use super::tokenize_gate::TokenizeGate;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::request::GenerateRequest;
use crate::tokenizer::{ChatMessage, TextTokenizer, TokenizerError};

pub struct AppState {
    pub config: ServerConfig,
    pub metrics: Arc<Metrics>,
    /// Set once the model has loaded; until then the API answers 503.
    model: OnceLock<LoadedModel>,
    draining: AtomicBool,
    /// Turns true once a drain is complete: the process may leave the pool and exit.
    drained: watch::Sender<bool>,
}

pub struct LoadedModel {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    /// Bounds how many long prompts tokenize at once.
    pub tokenize: TokenizeGate,
}

/// Where a request's prompt came from, so errors about it name the right field.
#[derive(Debug, Clone, Copy)]
pub enum PromptField {
    Prompt,
    Messages,
}

impl PromptField {
    pub fn name(self) -> &'static str {
        match self {
            PromptField::Prompt => "prompt",
            PromptField::Messages => "messages",
        }
    }
}

impl AppState {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config,
            metrics: Arc::new(Metrics::new()),
            model: OnceLock::new(),
            draining: AtomicBool::new(false),
            drained: watch::Sender::new(false),
        }
    }

    /// Installs the loaded model; a second call is ignored.
    pub fn install(&self, model: LoadedModel) {
        let _ = self.model.set(model);
        // Set first, then check: a drain that began meanwhile either sees the model or is seen.
        if self.draining.load(Ordering::SeqCst) {
            self.begin_drain();
        }
    }

    pub fn loaded(&self) -> Option<&LoadedModel> {
        self.model.get()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops taking new requests and lending; running ones go on, and homes take back what
    /// they borrowed here.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        if let Some(model) = self.model.get() {
            model.engine.begin_drain();
        }
    }

    /// The one drain path of `POST /drain` and SIGTERM: resolves once no request runs or
    /// waits here and no block is lent, and says so to [`AppState::wait_drained`].
    pub async fn drain(&self) {
        self.begin_drain();
        if let Some(model) = self.model.get() {
            model.engine.wait_drained().await;
        }
        self.drained.send_replace(true);
    }

    /// Resolves once a drain has completed.
    pub async fn wait_drained(&self) {
        let _ = self.drained.subscribe().wait_for(|done| *done).await;
    }

    /// The model a request names, if it is the one served here and it has loaded.
    pub fn model(&self, requested: &str) -> Result<&LoadedModel, ApiError> {
        let model = self.model.get().ok_or_else(ApiError::not_ready)?;
        if requested != self.config.served_model_name {
            return Err(ApiError::model_not_found(requested));
        }
        Ok(model)
    }

    /// Submits a tokenized prompt and returns its output stream.
    pub fn start(
        &self,
        model: &LoadedModel,
        prompt: Vec<u32>,
        params: &Params,
        max_tokens: usize,
        field: PromptField,
        arrived: Instant,
    ) -> Result<Generation, ApiError> {
        let mut sampling = params.sampling.clone();
        sampling.max_tokens = max_tokens;
        if let Some(adjust) = &mut sampling.adjust {
            let adjust = Arc::make_mut(adjust);
            adjust.stops = sampling.stop_token_ids.clone();
            if !sampling.ignore_eos {
                adjust.stops.extend(model.tokenizer.eos_token_ids());
            }
            if adjust.repetition_penalty != 1.0 {
                adjust.prompt = prompt.clone();
                adjust.prompt.sort_unstable();
                adjust.prompt.dedup();
            }
        }
        let decoder = model.tokenizer.incremental_decoder(&prompt);
        let prompt_tokens = prompt.len();
        let request = GenerateRequest {
            prompt_tokens: prompt,
            sampling,
            stop_token_ids: model.tokenizer.eos_token_ids().to_vec(),
        };
        let events = model
            .engine
            .submit(request)
            .map_err(|err| ApiError::from_submit(err, field.name(), model.engine.retry_after()))?;
        Ok(Generation::new(
            events,
            GenerationSetup {
                tokenizer: model.tokenizer.clone(),
                decoder,
                prompt_tokens,
                stop: params.stop.clone(),
                want_logprobs: params.sampling.logprobs.is_some(),
                arrived,
                metrics: self.metrics.clone(),
                span: Span::current(),
            },
        ))
    }
}

impl LoadedModel {
    /// Tokenizes off the async threads, after the length check and under the gate: a prompt
    /// can be megabytes long.
    pub async fn encode(&self, text: String) -> Result<Vec<u32>, ApiError> {
        self.check_length(text.len(), PromptField::Prompt)?;
        let tokenizer = self.tokenizer.clone();
        self.tokenize
            .run(text.len(), move || {
                tokenizer
                    .encode(&text, true)
                    .map_err(|err| ApiError::internal(format!("Tokenizing the prompt: {err}")))
            })
            .await
    }

    /// Renders the chat template and tokenizes the result (the template adds special tokens).
    pub async fn encode_chat(&self, messages: Vec<ChatMessage>) -> Result<Vec<u32>, ApiError> {
        let bytes = messages.iter().map(|m| m.content.len()).sum();
        self.check_length(bytes, PromptField::Messages)?;
        let tokenizer = self.tokenizer.clone();
        self.tokenize
            .run(bytes, move || {
                let text =
                    tokenizer
                        .apply_chat_template(&messages, true)
                        .map_err(|err| match err {
                            TokenizerError::NoChatTemplate { .. } => ApiError::invalid_param(
                                "messages",
                                "This model has no chat template; use /v1/completions instead.",
                            ),
                            err => ApiError::invalid_param(
                                "messages",
                                format!("The chat template rejected the messages: {err}"),
                            ),
                        })?;
                tokenizer
                    .encode(&text, false)
                    .map_err(|err| ApiError::internal(format!("Tokenizing the messages: {err}")))
            })
            .await
    }

    /// Refuses, before tokenizing, a text too long for the context whatever its tokens.
    fn check_length(&self, bytes: usize, field: PromptField) -> Result<(), ApiError> {
        TokenizeGate::check_length(
            bytes,
            self.tokenizer.max_token_bytes(),
            self.engine.max_context_tokens(),
            field.name(),
        )
    }

    /// Token ids sent by the client must exist in the vocabulary.
    pub fn check_token_ids(&self, ids: &[u32]) -> Result<(), ApiError> {
        let vocab = self.tokenizer.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(ApiError::invalid_param(
                "prompt",
                format!("Token id {id} is out of the vocabulary (size {vocab})."),
            )),
            None => Ok(()),
        }
    }
}

/// A fresh id such as `cmpl-3f2a…`.
pub fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
