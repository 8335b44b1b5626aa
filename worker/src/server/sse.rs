//! Server-Sent Events for `stream: true`, shared by both endpoints: each endpoint only says how its
//! chunks look. The stream owns the `Generation`, so a client that goes away cancels the request.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, stream};
use serde::Serialize;

use super::generation::{Delta, Generation, Piece};
use super::openai_types::Envelope;

/// How one endpoint shapes its stream chunks.
pub trait ChunkFormat: Send + 'static {
    type Choice: Serialize;
    /// The `object` field of every chunk.
    const OBJECT: &'static str;

    /// A chunk sent before any text (chat announces the assistant role).
    fn opening(&self) -> Option<Self::Choice>;
    fn delta(&self, delta: Delta) -> Self::Choice;
    fn finish(&self, reason: &'static str) -> Self::Choice;
}

/// The fields every chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseMeta {
    pub fn envelope<C>(&self, object: &'static str, choices: Vec<C>) -> Envelope<C> {
        Envelope {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
        }
    }
}

enum Phase {
    Opening,
    Generating,
    Done,
}

struct StreamState<F> {
    generation: Generation,
    format: F,
    meta: ResponseMeta,
    include_usage: bool,
    phase: Phase,
}

impl<F: ChunkFormat> StreamState<F> {
    fn chunk(&self, choices: Vec<F::Choice>) -> Event {
        let mut envelope = self.meta.envelope(F::OBJECT, choices);
        // With include_usage, every chunk carries `usage: null` until the last one.
        envelope.usage = self.include_usage.then_some(None);
        json_event(&envelope)
    }

    /// The events for the next step of the stream; `None` once it is over.
    async fn advance(&mut self) -> Option<Vec<Event>> {
        match self.phase {
            Phase::Opening => {
                self.phase = Phase::Generating;
                Some(
                    self.format
                        .opening()
                        .map(|choice| self.chunk(vec![choice]))
                        .into_iter()
                        .collect(),
                )
            }
            Phase::Generating => {
                let piece = self.generation.next().await;
                Some(match piece {
                    Some(Ok(Piece::Delta(delta))) => {
                        vec![self.chunk(vec![self.format.delta(delta)])]
                    }
                    Some(Ok(Piece::Finished {
                        delta,
                        reason,
                        usage,
                    })) => {
                        self.phase = Phase::Done;
                        let mut events = Vec::with_capacity(4);
                        if !delta.is_empty() {
                            events.push(self.chunk(vec![self.format.delta(delta)]));
                        }
                        events.push(self.chunk(vec![self.format.finish(reason)]));
                        if self.include_usage {
                            let mut last = self.meta.envelope::<F::Choice>(F::OBJECT, Vec::new());
                            last.usage = Some(Some(usage));
                            events.push(json_event(&last));
                        }
                        events.push(done_event());
                        events
                    }
                    Some(Err(err)) => {
                        self.phase = Phase::Done;
                        vec![Event::default().data(err.to_json()), done_event()]
                    }
                    None => {
                        self.phase = Phase::Done;
                        vec![done_event()]
                    }
                })
            }
            Phase::Done => None,
        }
    }
}

/// The SSE response for a started generation.
pub fn respond<F: ChunkFormat>(
    generation: Generation,
    format: F,
    meta: ResponseMeta,
    include_usage: bool,
) -> Response {
    let state = StreamState {
        generation,
        format,
        meta,
        include_usage,
        phase: Phase::Opening,
    };
    let events = stream::unfold(state, |mut state| async move {
        let events = state.advance().await?;
        Some((events, state))
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    // Keep-alive comments hold idle proxies open while a request queues, and let a write fail
    // (cancelling the request) soon after a client disconnects even before the first token.
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn json_event<T: Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).expect("response chunks always serialize"))
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}
