pub mod config;
pub mod llama;
pub mod weights;
