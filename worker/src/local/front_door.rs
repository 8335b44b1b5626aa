//! The local pool's single address: forwards `/v1/*` to a worker (least outstanding work: the
//! body bytes of the requests it serves, a prompt's size standing for its KV and prefill; then
//! fewest requests; ties round-robin), streaming responses through as they come, so SSE stays
//! live. A worker
//! that is full (429), draining (503) or gone is passed over for the next; a worker that dies
//! mid-request ends it with a retryable 503, or with an error event on a stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures::StreamExt;
use serde_json::json;

use crate::server::{ApiError, DEFAULT_MAX_BODY_BYTES};

/// How long clients should wait before retrying when no worker answers.
const RETRY_AFTER: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One worker behind the front door.
pub struct Backend {
    pub name: String,
    pub base_url: String,
    outstanding: AtomicUsize,
    /// Body bytes of the outstanding requests.
    outstanding_bytes: AtomicUsize,
}

impl Backend {
    pub fn new(name: String, base_url: String) -> Self {
        Self {
            name,
            base_url,
            outstanding: AtomicUsize::new(0),
            outstanding_bytes: AtomicUsize::new(0),
        }
    }

    /// Orders backends for a new request: least outstanding work first.
    fn load(&self) -> (usize, usize) {
        (
            self.outstanding_bytes.load(Ordering::Acquire),
            self.outstanding.load(Ordering::Acquire),
        )
    }
}

/// Counts a request (and its body bytes) against its backend until the response body is
/// finished or dropped.
struct Outstanding {
    door: Arc<FrontDoor>,
    index: usize,
    bytes: usize,
}

impl Outstanding {
    fn new(door: &Arc<FrontDoor>, index: usize, bytes: usize) -> Self {
        let backend = &door.backends[index];
        backend.outstanding.fetch_add(1, Ordering::AcqRel);
        backend.outstanding_bytes.fetch_add(bytes, Ordering::AcqRel);
        Self {
            door: door.clone(),
            index,
            bytes,
        }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let backend = &self.door.backends[self.index];
        backend.outstanding.fetch_sub(1, Ordering::AcqRel);
        backend
            .outstanding_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

pub struct FrontDoor {
    backends: Vec<Backend>,
    next: AtomicUsize,
    client: reqwest::Client,
}

impl FrontDoor {
    pub fn new(backends: Vec<Backend>) -> reqwest::Result<Arc<Self>> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()?;
        Ok(Arc::new(Self {
            backends,
            next: AtomicUsize::new(0),
            client,
        }))
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/v1/{*rest}", any(forward))
            .fallback(|request: Request| async move {
                ApiError::route_not_found(request.method().as_str(), request.uri().path())
            })
            .with_state(self.clone())
    }

    /// Backends to try, best first: least outstanding work (a long prompt weighs more than a
    /// short one, so short requests go where no long prefill holds the KV), ties broken
    /// round-robin. The rest follow as fallbacks for a worker that cannot be reached.
    fn candidates(&self) -> Vec<usize> {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        // A stable sort keeps the round-robin order among equals.
        order.sort_by_key(|&i| self.backends[i].load());
        order
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// Ready while at least one worker is; the body lists each worker's state.
async fn ready(State(door): State<Arc<FrontDoor>>) -> Response {
    let checks = door.backends.iter().map(|backend| {
        let url = format!("{}/ready", backend.base_url);
        let client = door.client.clone();
        async move {
            let ok = client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            (backend.name.clone(), ok)
        }
    });
    let states = futures::future::join_all(checks).await;
    let any_ready = states.iter().any(|(_, ok)| *ok);
    let workers: serde_json::Map<_, _> = states
        .into_iter()
        .map(|(name, ok)| (name, json!(if ok { "ready" } else { "unavailable" })))
        .collect();
    if !any_ready {
        return ApiError::unavailable("No worker is ready.", RETRY_AFTER).into_response();
    }
    axum::Json(json!({"status": "ready", "workers": workers})).into_response()
}

async fn forward(State(door): State<Arc<FrontDoor>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Buffered so the request can go to another worker if the first cannot be reached.
    let body = match to_bytes(body, DEFAULT_MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(_) => return ApiError::payload_too_large().into_response(),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let candidates = door.candidates();
    let last = candidates.len() - 1;
    for (n, index) in candidates.into_iter().enumerate() {
        let backend = &door.backends[index];
        let guard = Outstanding::new(&door, index, body.len());
        let upstream = door
            .client
            .request(parts.method.clone(), format!("{}{path}", backend.base_url))
            .headers(forwarded_headers(&parts.headers))
            .body(body.clone())
            .send()
            .await;
        match upstream {
            // That worker's queue is full, or it drains; another may take the request. The
            // last answer goes back.
            Ok(response) if passes_on(response.status()) && n < last => {
                tracing::debug!(worker = %backend.name, status = %response.status(), "worker turned the request away; trying another");
            }
            Ok(response) => return relay(response, guard),
            Err(err) if err.is_connect() => {
                tracing::warn!(worker = %backend.name, error = %err, "worker unreachable; trying another");
            }
            Err(err) => {
                tracing::warn!(worker = %backend.name, error = %err, "worker failed the request");
                return ApiError::unavailable(
                    format!("The worker failed before answering: {err}"),
                    RETRY_AFTER,
                )
                .into_response();
            }
        }
    }
    ApiError::unavailable("No worker is available.", RETRY_AFTER).into_response()
}

/// Whether another worker may take a request this answer turned away.
fn passes_on(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::SERVICE_UNAVAILABLE
}

/// The worker's answer, body streamed chunk by chunk; `guard` lives as long as the body. A
/// stream whose worker dies half-way ends with an OpenAI-style error event the client can
/// act on (retry), rather than a cut connection.
fn relay(response: reqwest::Response, guard: Outstanding) -> Response {
    let status = response.status();
    let headers = forwarded_headers(response.headers());
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let body = response.bytes_stream().scan(false, move |ended, chunk| {
        let _counted = &guard;
        let item = match chunk {
            _ if *ended => None,
            Err(err) if sse => {
                *ended = true;
                tracing::warn!(error = %err, "worker failed mid-stream");
                let error = ApiError::unavailable(
                    format!("The worker failed while streaming ({err}); retry the request."),
                    RETRY_AFTER,
                );
                Some(Ok(format!("data: {}\n\n", error.to_json()).into()))
            }
            chunk => Some(chunk),
        };
        std::future::ready(item)
    });
    let mut out = Response::new(Body::from_stream(body));
    *out.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    *out.headers_mut() = headers;
    out
}

/// End-to-end headers only: hop-by-hop ones describe a single connection, and the body length
/// is set again by whoever sends it on.
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    const HOP_BY_HOP: [HeaderName; 7] = [
        header::CONNECTION,
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ];
    headers
        .iter()
        .filter(|(name, _)| !HOP_BY_HOP.contains(name) && name.as_str() != "keep-alive")
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_workers_mean_503_with_retry_after() {
        // Ports that were just free: nothing listens there.
        let dead: Vec<Backend> = (0..2)
            .map(|i| {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                Backend::new(format!("w{i}"), format!("http://127.0.0.1:{port}"))
            })
            .collect();
        let door = FrontDoor::new(dead).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, door.router()).into_future());
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!("http://{address}/v1/completions"))
            .body(r#"{"model": "m", "prompt": "hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["message"], "No worker is available.");
        assert_eq!(
            door.backends
                .iter()
                .map(|b| b.outstanding.load(Ordering::Acquire))
                .sum::<usize>(),
            0,
            "failed attempts are not counted as outstanding"
        );
    }

    /// A worker that always answers `status`, on a free port.
    async fn fake_worker(status: StatusCode) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().route(
            "/v1/completions",
            any(move || async move { (status, [(header::RETRY_AFTER, "3")], "answer") }),
        );
        tokio::spawn(axum::serve(listener, app).into_future());
        Backend::new(status.to_string(), url)
    }

    async fn post_through(door: &Arc<FrontDoor>) -> reqwest::Response {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, door.router()).into_future());
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!("http://{address}/v1/completions"))
            .body("{}")
            .send()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_worker_with_a_full_queue_passes_the_request_to_another() {
        let busy = fake_worker(StatusCode::TOO_MANY_REQUESTS).await;
        let free = fake_worker(StatusCode::OK).await;
        // Round robin starts at the busy one.
        let door = FrontDoor::new(vec![busy, free]).unwrap();
        assert_eq!(post_through(&door).await.status(), 200);

        let all_busy = vec![
            fake_worker(StatusCode::TOO_MANY_REQUESTS).await,
            fake_worker(StatusCode::TOO_MANY_REQUESTS).await,
        ];
        let door = FrontDoor::new(all_busy).unwrap();
        let response = post_through(&door).await;
        assert_eq!(response.status(), 429, "the last worker's answer");
        assert_eq!(response.headers()["retry-after"], "3");

        let draining = fake_worker(StatusCode::SERVICE_UNAVAILABLE).await;
        let free = fake_worker(StatusCode::OK).await;
        let door = FrontDoor::new(vec![draining, free]).unwrap();
        assert_eq!(post_through(&door).await.status(), 200);
    }

    #[tokio::test]
    async fn a_stream_whose_worker_dies_ends_with_a_retryable_error_event() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().route(
            "/v1/completions",
            any(|| async {
                // The failure comes after the first event has gone out.
                let chunks = futures::stream::iter([true, false]).then(|first| async move {
                    if first {
                        Ok("data: {\"choices\": []}\n\n")
                    } else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Err(std::io::Error::other("the worker died"))
                    }
                });
                (
                    [(header::CONTENT_TYPE, "text/event-stream")],
                    Body::from_stream(chunks),
                )
            }),
        );
        tokio::spawn(axum::serve(listener, app).into_future());
        let door = FrontDoor::new(vec![Backend::new("dying".into(), url)]).unwrap();
        let response = post_through(&door).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("the stream ends cleanly");
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 2, "{text}");
        let error: serde_json::Value =
            serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(error["error"]["code"], "service_unavailable");
    }

    #[test]
    fn least_outstanding_work_first_ties_round_robin() {
        let door = FrontDoor::new(
            (0..3)
                .map(|i| Backend::new(format!("w{i}"), String::new()))
                .collect(),
        )
        .unwrap();
        assert_eq!(door.candidates()[0], 0);
        assert_eq!(door.candidates()[0], 1);
        assert_eq!(door.candidates()[0], 2);
        let _a = Outstanding::new(&door, 0, 100);
        let _b = Outstanding::new(&door, 0, 100);
        let _c = Outstanding::new(&door, 1, 100);
        assert_eq!(door.candidates(), vec![2, 1, 0], "least work");
        let long = Outstanding::new(&door, 2, 10_000);
        assert_eq!(
            door.candidates(),
            vec![1, 0, 2],
            "one long prompt weighs more than two short ones"
        );
        drop(long);
        assert_eq!(door.candidates()[0], 2, "counted until its answer ends");
    }
}
