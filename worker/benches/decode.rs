//! CPU decode throughput of our engine against candle-transformers' Llama, same model, same run.
//!
//! Prints tokens/s for candle at batch 1, ours at batch 1 and ours at batch 16, and the ratios.
//! Run with `make bench`.

mod decode_clock;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as candle_llama;
use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model};
use infinite_llm_worker::engine::{self, EngineOptions};
use infinite_llm_worker::request::GenerateRequest;
use infinite_llm_worker::sampling::argmax;

const PROMPT: usize = 32;
const NEW_TOKENS: usize = 64;

fn prompt(k: u32, vocab: u32) -> Vec<u32> {
    (0..PROMPT as u32)
        .map(|i| (i * 7919 + k * 104_729 + 3) % vocab)
        .collect()
}

fn candle_tokens_per_s(dir: &Path) -> f64 {
    let raw = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config: candle_llama::LlamaConfig = serde_json::from_str(&raw).unwrap();
    let config = config.into_config(false);
    // SAFETY: the model file is written once before the bench and not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let model = candle_llama::Llama::load(vb, &config).unwrap();
    let mut cache = candle_llama::Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
    let mut input = prompt(0, config.vocab_size as u32);
    let mut pos = 0;
    let mut start = Instant::now();
    for step in 0..=NEW_TOKENS {
        if step == 1 {
            // Decode only: the clock starts after the prompt is in.
            start = Instant::now();
        }
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<f32> = model
            .forward(&x, pos, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        pos += input.len();
        input = vec![argmax(&logits)];
    }
    NEW_TOKENS as f64 / start.elapsed().as_secs_f64()
}

/// Decode tokens/s of our engine with `batch` concurrent greedy requests.
fn ours_tokens_per_s(rt: &tokio::runtime::Runtime, dir: &Path, vocab: u32, batch: usize) -> f64 {
    let engine = engine::start(dir, EngineOptions::default()).unwrap();
    rt.block_on(async {
        let streams: Vec<_> = (0..batch)
            .map(|k| {
                engine
                    .submit(GenerateRequest::greedy(
                        prompt(k as u32, vocab),
                        NEW_TOKENS + 1,
                    ))
                    .unwrap()
            })
            .collect();
        // Decode only, as for candle.
        decode_clock::decode_tokens_per_s(streams, batch * NEW_TOKENS).await
    })
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let spec = DemoModelSpec {
        hidden_size: 1024,
        intermediate_size: 2816,
        num_hidden_layers: 8,
        num_attention_heads: 16,
        num_key_value_heads: 4,
        ..DemoModelSpec::default()
    };
    write_demo_model(dir.path(), &spec).unwrap();
    let raw = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let vocab = serde_json::from_str::<serde_json::Value>(&raw).unwrap()["vocab_size"]
        .as_u64()
        .unwrap() as u32;
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!(
        "model: hidden {}, {} layers, {}/{} heads, vocab {vocab}, f32; prompt {PROMPT}, {NEW_TOKENS} new tokens; {} threads",
        spec.hidden_size,
        spec.num_hidden_layers,
        spec.num_attention_heads,
        spec.num_key_value_heads,
        rayon::current_num_threads()
    );
    let candle = candle_tokens_per_s(dir.path());
    let ours1 = ours_tokens_per_s(&rt, dir.path(), vocab, 1);
    let ours16 = ours_tokens_per_s(&rt, dir.path(), vocab, 16);
    println!("candle-transformers  batch 1:  {candle:8.1} tok/s");
    println!(
        "infinite-llm         batch 1:  {ours1:8.1} tok/s  ({:.2}x candle)",
        ours1 / candle
    );
    println!(
        "infinite-llm         batch 16: {ours16:8.1} tok/s  ({:.2}x candle batch 1, {:.2}x ours batch 1)",
        ours16 / candle,
        ours16 / ours1
    );
}
