//! Where prompts are tokenized: after a cheap length check, and a bounded number at a time.
//! A flood of huge prompts then gets 429 with `Retry-After` instead of every core busy
//! tokenizing text that could never fit the context anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::errors::ApiError;

/// Prompts below this many bytes tokenize in microseconds: they skip the bound.
const SMALL_PROMPT_BYTES: usize = 16 << 10;
/// Normalizers may shrink text before it is split into tokens; the length check leaves this
/// much room for it, so it refuses only texts that cannot fit.
const NORMALIZE_SLACK: usize = 4;
/// What a client told to come back waits.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct TokenizeGate {
    slots: Arc<Semaphore>,
    /// Large prompts being tokenized or waiting for a slot.
    admitted: AtomicUsize,
    max_admitted: usize,
}

impl Default for TokenizeGate {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self::new(cores, 2 * cores)
    }
}

impl TokenizeGate {
    /// `slots` large prompts tokenize at once, `waiting` more wait for a slot; the rest get 429.
    pub fn new(slots: usize, waiting: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            admitted: AtomicUsize::new(0),
            max_admitted: slots + waiting,
        }
    }

    /// Refuses a text of `bytes` that has more tokens than `max_tokens` whatever it says.
    pub fn check_length(
        bytes: usize,
        max_token_bytes: usize,
        max_tokens: usize,
        field: &str,
    ) -> Result<(), ApiError> {
        let limit = max_tokens
            .saturating_mul(max_token_bytes)
            .saturating_mul(NORMALIZE_SLACK);
        if bytes > limit {
            return Err(ApiError::invalid_param(
                field,
                format!(
                    "The {field} is {bytes} bytes: more than the {max_tokens} tokens this model's context holds."
                ),
            )
            .context_length_exceeded());
        }
        Ok(())
    }

    /// Runs `work` (tokenizing `bytes` of text) off the async threads, under the bound.
    pub async fn run<T: Send + 'static>(
        &self,
        bytes: usize,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        if bytes < SMALL_PROMPT_BYTES {
            return blocking(work).await;
        }
        let admitted = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_admitted).then_some(n + 1)
            });
        if admitted.is_err() {
            return Err(ApiError::overloaded(
                "Too many long prompts are being tokenized; retry shortly.",
                RETRY_AFTER,
            ));
        }
        let _admitted = Admitted(&self.admitted);
        let _slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the tokenizer pool closed"))?;
        blocking(work).await
    }
}

struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| ApiError::internal(format!("Tokenizer task failed: {err}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_check_refuses_only_hopeless_texts() {
        assert!(TokenizeGate::check_length(1000, 8, 100, "prompt").is_ok());
        assert!(TokenizeGate::check_length(3200, 8, 100, "prompt").is_ok());
        let err = TokenizeGate::check_length(3201, 8, 100, "prompt").unwrap_err();
        assert_eq!(err.body().param.as_deref(), Some("prompt"));
        assert_eq!(err.body().code, Some("context_length_exceeded"));
    }

    #[tokio::test]
    async fn beyond_the_slots_and_the_queue_large_prompts_get_429() {
        let gate = Arc::new(TokenizeGate::new(1, 1));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let hold = Arc::new(std::sync::Mutex::new(hold));
        let big = SMALL_PROMPT_BYTES;
        let mut busy = Vec::new();
        for _ in 0..2 {
            let (gate, hold) = (gate.clone(), hold.clone());
            busy.push(tokio::spawn(async move {
                gate.run(big, move || {
                    let _ = hold.lock().unwrap().recv();
                    Ok(())
                })
                .await
            }));
        }
        while gate.admitted.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        let refused = gate.run(big, || Ok(())).await.unwrap_err();
        assert_eq!(refused.status().as_u16(), 429);
        // A small prompt is not held up.
        assert!(gate.run(10, || Ok(())).await.is_ok());
        release.send(()).unwrap();
        release.send(()).unwrap();
        for b in busy {
            assert!(b.await.unwrap().is_ok());
        }
        assert!(gate.run(big, || Ok(())).await.is_ok());
    }
}
