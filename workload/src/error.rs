//! What can go wrong in a replay, short of a request failing (that is an outcome, not an error).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("{0:?} is not an http:// or https:// URL")]
    Url(String),
    #[error("reading the stream: {0}")]
    Read(reqwest::Error),
    #[error("a stream event is not UTF-8")]
    Utf8(#[from] std::str::Utf8Error),
    #[error("a stream event is not a completion chunk: {0}")]
    Chunk(#[from] serde_json::Error),
    #[error("the server ended the stream with an error: {0}")]
    Server(String),
}
