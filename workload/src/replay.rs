//! The replay: each planned request sent at its time (open loop: a slow server does not slow the
//! arrivals), at most `concurrency` in flight when capped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::measure::{self, Outcome, Target};
use crate::plan::Planned;

/// Every request's outcome, in plan order, and the wall time from the first send to the last
/// answer.
#[derive(Debug)]
pub struct Replay {
    pub outcomes: Vec<Outcome>,
    pub wall: Duration,
}

/// Replays `plan` against `target`.
pub async fn replay(target: Target, plan: Vec<Planned>, concurrency: Option<usize>) -> Replay {
    let target = Arc::new(target);
    schedule(plan, concurrency, move |request, start| {
        let target = Arc::clone(&target);
        async move { measure::send(&target, request, start).await }
    })
    .await
}

/// Calls `send` for each request at its planned time from the start; with a cap, a request
/// due while `concurrency` are in flight waits for one to end, and the ones after it wait
/// behind it (first come, first sent).
pub async fn schedule<F, Fut>(plan: Vec<Planned>, concurrency: Option<usize>, send: F) -> Replay
where
    F: Fn(Planned, Instant) -> Fut,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let start = Instant::now();
    let slots = concurrency.map(|n| Arc::new(Semaphore::new(n)));
    let mut running = Vec::with_capacity(plan.len());
    for request in plan {
        tokio::time::sleep_until(start + request.at).await;
        let slot = match &slots {
            Some(slots) => Some(
                Arc::clone(slots)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
            ),
            None => None,
        };
        let sending = send(request, start);
        running.push(tokio::spawn(async move {
            let outcome = sending.await;
            drop(slot);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(running.len());
    for task in running {
        outcomes.push(task.await.expect("a request task panicked"));
    }
    Replay {
        outcomes,
        wall: start.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::Status;

    fn planned(at_ms: &[u64]) -> Vec<Planned> {
        at_ms
            .iter()
            .enumerate()
            .map(|(index, &ms)| Planned {
                index,
                at: Duration::from_millis(ms),
                prompt_tokens: 1,
                max_tokens: 1,
            })
            .collect()
    }

    /// A server that answers every request 1.5 s after it is sent.
    async fn answer(request: Planned, start: Instant) -> Outcome {
        let sent = start.elapsed();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Outcome {
            index: request.index,
            prompt_tokens: request.prompt_tokens,
            max_tokens: request.max_tokens,
            sent,
            status: Status::Ok,
            ttft: None,
            itl: Vec::new(),
            e2e: Duration::from_millis(1500),
            output_tokens: 0,
            usage_tokens: None,
        }
    }

    fn sent_ms(replay: &Replay) -> Vec<u128> {
        replay.outcomes.iter().map(|o| o.sent.as_millis()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_sends_at_the_planned_times() {
        let replay = schedule(planned(&[0, 1000, 2000, 2500]), None, answer).await;
        assert_eq!(sent_ms(&replay), [0, 1000, 2000, 2500]);
        assert_eq!(replay.wall, Duration::from_millis(4000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cap_holds_requests_until_one_ends() {
        let replay = schedule(planned(&[0, 1000, 2000, 2500]), Some(1), answer).await;
        assert_eq!(sent_ms(&replay), [0, 1500, 3000, 4500]);
        assert_eq!(replay.wall, Duration::from_millis(6000));

        let replay = schedule(planned(&[0, 1000, 2000, 2500]), Some(2), answer).await;
        assert_eq!(sent_ms(&replay), [0, 1000, 2000, 2500]);
        let replay = schedule(planned(&[0, 0, 0, 100]), Some(2), answer).await;
        assert_eq!(sent_ms(&replay), [0, 0, 1500, 1500]);
        assert_eq!(
            replay.outcomes.iter().map(|o| o.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
    }
}
