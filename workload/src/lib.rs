//! Workloads for Infinite-LLM: seeded request traces (`trace`, shared with the operator's
//! simulator) and a load generator that replays one against a running OpenAI endpoint and
//! measures it (the `infinite-llm-loadgen` binary).

pub mod error;
pub mod measure;
pub mod percentiles;
pub mod plan;
pub mod prompt;
pub mod replay;
pub mod report;
pub mod sse;
pub mod trace;

pub use error::Error;
