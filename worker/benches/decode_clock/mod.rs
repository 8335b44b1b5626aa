//! The decode clock the engine benches share: prefill stays out of the figure.

use std::time::Instant;

use infinite_llm_worker::request::Event;
use tokio::sync::mpsc::UnboundedReceiver;

/// Tokens/s over `streams` of submitted requests, timed from the moment every request has its
/// first token to the last token. Panics unless `tokens` tokens follow the first ones.
pub async fn decode_tokens_per_s(streams: Vec<UnboundedReceiver<Event>>, tokens: usize) -> f64 {
    let mut streams = futures::future::join_all(streams.into_iter().map(|mut rx| async move {
        assert!(matches!(rx.recv().await, Some(Event::Token { .. })));
        rx
    }))
    .await;
    let start = Instant::now();
    let mut seen = 0;
    for rx in &mut streams {
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { .. } => seen += 1,
                Event::Failed { message, .. } => panic!("request failed: {message}"),
                _ => {}
            }
        }
    }
    assert_eq!(seen, tokens, "every request decodes all its tokens");
    seen as f64 / start.elapsed().as_secs_f64()
}
