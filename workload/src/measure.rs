//! One streamed request against the endpoint, timed from the moment it is sent.

use std::ops::Range;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::error::Error;
use crate::plan::Planned;
use crate::prompt::token_ids;
use crate::sse::{self, SseDecoder};

/// Where and what to send.
#[derive(Debug, Clone)]
pub struct Target {
    client: reqwest::Client,
    completions_url: String,
    api_key: Option<String>,
    model: String,
    /// Seeds the prompts, with each request's index.
    seed: u64,
    token_ids: Range<u32>,
}

impl Target {
    /// `base` is the server's address without `/v1`, such as `http://127.0.0.1:8000`.
    pub fn new(
        base: &str,
        api_key: Option<String>,
        model: String,
        seed: u64,
        token_ids: Range<u32>,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let base = base.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Url(base.to_owned()));
        }
        // Benchmarks talk to loopback or cluster addresses: a proxy from the environment would
        // only add its own latency.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .build()
            .map_err(Error::Client)?;
        Ok(Target {
            client,
            completions_url: format!("{base}/v1/completions"),
            api_key,
            model,
            seed,
            token_ids,
        })
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The server answered with this HTTP status instead of a stream.
    Http(u16),
    /// No answer: connection refused or reset, or the timeout.
    Transport,
    /// The stream broke off, carried an error, or was not a completion stream.
    Stream,
}

/// What one request measured. Latencies of a failed request are those it got before failing.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub index: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// When it was sent, from the start of the replay: later than planned when the
    /// concurrency cap held it back.
    pub sent: Duration,
    pub status: Status,
    /// From sending to the first token.
    pub ttft: Option<Duration>,
    /// One gap per token after the first.
    pub itl: Vec<Duration>,
    /// From sending to the end of the stream (or the failure).
    pub e2e: Duration,
    /// Tokens streamed.
    pub output_tokens: usize,
    /// The completion tokens the server's closing usage reports, when it sends one.
    pub usage_tokens: Option<usize>,
}

/// Turns the arrival times of chunks into time to first token and inter-token gaps. A chunk
/// carrying k tokens splits its gap evenly over them, so the gaps always number tokens - 1 and
/// sum to the time from first to last token; extra tokens in the first chunk came with it (gap
/// zero).
#[derive(Debug)]
pub struct TokenClock {
    sent: Instant,
    last: Option<Instant>,
    ttft: Option<Duration>,
    itl: Vec<Duration>,
    tokens: usize,
}

impl TokenClock {
    pub fn new(sent: Instant) -> Self {
        TokenClock {
            sent,
            last: None,
            ttft: None,
            itl: Vec::new(),
            tokens: 0,
        }
    }

    pub fn chunk(&mut self, at: Instant, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let (first_gap, gap) = match self.last {
            None => {
                self.ttft = Some(at - self.sent);
                (None, Duration::ZERO)
            }
            Some(previous) => {
                let gap = (at - previous) / tokens as u32;
                (Some(gap), gap)
            }
        };
        self.itl.extend(first_gap);
        self.itl.extend(std::iter::repeat_n(gap, tokens - 1));
        self.tokens += tokens;
        self.last = Some(at);
    }
}

/// Sends `request` now and reads its stream to the end. `start` is the start of the replay.
pub async fn send(target: &Target, request: Planned, start: Instant) -> Outcome {
    let body = json!({
        "model": target.model,
        "prompt": token_ids(target.seed, request.index, request.prompt_tokens, target.token_ids.clone()),
        "max_tokens": request.max_tokens,
        // Greedy and past end-of-sequence: every run produces the same tokens, as many as asked.
        "temperature": 0,
        "ignore_eos": true,
        // The token count of each chunk (see `sse::parse`).
        "logprobs": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut http = target.client.post(&target.completions_url).json(&body);
    if let Some(key) = &target.api_key {
        http = http.bearer_auth(key);
    }
    let sent = Instant::now();
    let mut clock = TokenClock::new(sent);
    let mut usage_tokens = None;
    let status = read(http, &mut clock, &mut usage_tokens, request.index).await;
    Outcome {
        index: request.index,
        prompt_tokens: request.prompt_tokens,
        max_tokens: request.max_tokens,
        sent: sent - start,
        status,
        ttft: clock.ttft,
        itl: clock.itl,
        e2e: sent.elapsed(),
        output_tokens: clock.tokens,
        usage_tokens,
    }
}

async fn read(
    http: reqwest::RequestBuilder,
    clock: &mut TokenClock,
    usage_tokens: &mut Option<usize>,
    index: usize,
) -> Status {
    let response = match http.send().await {
        Ok(response) => response,
        Err(err) => {
            tracing::warn!(index, error = %err, "request failed");
            return Status::Transport;
        }
    };
    let code = response.status();
    if !code.is_success() {
        let body = response.text().await.unwrap_or_default();
        tracing::debug!(index, status = code.as_u16(), body, "request refused");
        return Status::Http(code.as_u16());
    }
    let mut bytes = response.bytes_stream();
    let mut decoder = SseDecoder::default();
    while let Some(read) = bytes.next().await {
        let at = Instant::now();
        let events = match read.map_err(Error::Read).and_then(|b| decoder.push(&b)) {
            Ok(events) => events,
            Err(err) => {
                tracing::warn!(index, error = %err, "stream broke off");
                return Status::Stream;
            }
        };
        for event in events {
            match sse::parse(&event) {
                Ok(sse::Event::Done) => return Status::Ok,
                Ok(sse::Event::Chunk {
                    tokens,
                    completion_tokens,
                }) => {
                    clock.chunk(at, tokens);
                    *usage_tokens = completion_tokens.or(*usage_tokens);
                }
                Err(err) => {
                    tracing::warn!(index, error = %err, "bad stream");
                    return Status::Stream;
                }
            }
        }
    }
    tracing::warn!(index, "the stream ended without [DONE]");
    Status::Stream
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_number_tokens_minus_one_and_split_multi_token_chunks() {
        let sent = Instant::now();
        let ms = |n| sent + Duration::from_millis(n);
        let mut clock = TokenClock::new(sent);
        clock.chunk(ms(5), 0);
        clock.chunk(ms(40), 2);
        clock.chunk(ms(50), 1);
        clock.chunk(ms(51), 0);
        clock.chunk(ms(80), 3);
        assert_eq!(clock.ttft, Some(Duration::from_millis(40)));
        let gaps: Vec<u64> = clock.itl.iter().map(|d| d.as_millis() as u64).collect();
        assert_eq!(gaps, [0, 10, 10, 10, 10]);
        assert_eq!(clock.tokens, 6);
        assert_eq!(clock.itl.len(), clock.tokens - 1);
    }
}
