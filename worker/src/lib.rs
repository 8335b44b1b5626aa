//! Infinite-LLM worker: a Llama-family inference engine with a paged KV cache of rBlocks,
//! served over an OpenAI-compatible HTTP API.

pub mod backend;
pub mod chat_template;
mod cluster_link;
mod creditor;
pub mod demo_model;
pub mod dist_attention;
pub mod engine;
pub mod gmanager_client;
mod inbox;
pub mod liveness;
pub mod local;
pub mod logit_adjust;
pub mod merge;
pub mod metrics;
pub mod migration;
mod migrator;
pub mod model;
pub mod peer;
pub mod rblock_pool;
pub mod request;
pub mod rmanager;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
