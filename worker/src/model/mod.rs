pub mod config;
pub mod weights;
pub mod llama;
