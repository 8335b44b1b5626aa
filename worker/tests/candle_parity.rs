//! Our engine's logits against candle-transformers' Llama on the same generated safetensors
//! model: several requests batched together, prefilled in chunks over non-contiguous rBlocks,
//! then decoded greedily, each step compared with candle running that request alone.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as candle_llama;
use infinite_llm_worker::backend::Backend;
use infinite_llm_worker::backend::cpu::Cpu;
use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model};
use infinite_llm_worker::model::llama::{Llama, NoExchange};
use infinite_llm_worker::rmanager::RManager;
use infinite_llm_worker::sampling::argmax;
use infinite_llm_worker::scheduler::{Scheduler, SchedulerConfig, StepRule};

const BLOCK_TOKENS: usize = 16;
const DECODE_STEPS: usize = 12;

struct Candle {
    model: candle_llama::Llama,
    config: candle_llama::Config,
}

impl Candle {
    fn load(dir: &Path) -> Self {
        let raw = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let config: candle_llama::LlamaConfig = serde_json::from_str(&raw).unwrap();
        let config = config.into_config(false);
        let files = [dir.join("model.safetensors")];
        // SAFETY: the file was written by this test and is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
            .unwrap();
        let model = candle_llama::Llama::load(vb, &config).unwrap();
        Self { model, config }
    }

    /// Logits after the prompt, then after each greedily chosen token: `steps + 1` rows.
    fn greedy(&self, prompt: &[u32], steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
        let mut cache =
            candle_llama::Cache::new(true, DType::F32, &self.config, &Device::Cpu).unwrap();
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        let mut input = prompt.to_vec();
        let mut pos = 0;
        for _ in 0..=steps {
            let x = Tensor::new(input.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits: Vec<f32> = self
                .model
                .forward(&x, pos, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            pos += input.len();
            let next = argmax(&logits);
            rows.push(logits);
            tokens.push(next);
            input = vec![next];
        }
        (rows, tokens)
    }
}

/// Runs all prompts together through our scheduler and model, feeding back greedy tokens.
fn ours(dir: &Path, prompts: &[Vec<u32>], steps: usize) -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
    let mut model = Llama::load(dir, Cpu::new()).unwrap();
    let blocks = 64;
    let mut kv = model
        .backend()
        .alloc_kv(model.kv_shape(blocks, BLOCK_TOKENS));
    let mut sched = Scheduler::new(
        SchedulerConfig {
            block_tokens: BLOCK_TOKENS,
            max_num_seqs: 8,
            // Smaller than the prompts: prefill goes in chunks, and the requests' blocks interleave.
            rule: StepRule {
                max_batched_tokens: 24,
                ..StepRule::default()
            },
        },
        RManager::new(blocks, 0.0),
    );
    for (i, p) in prompts.iter().enumerate() {
        sched.add(i as u64, p.clone(), steps);
    }
    let mut out: Vec<(Vec<Vec<f32>>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); prompts.len()];
    let vocab = model.config().vocab_size;
    while out.iter().any(|o| o.1.len() <= steps) {
        let step = sched.schedule();
        assert!(
            step.preempted.is_empty(),
            "the pool is large enough for this test"
        );
        let logits = model
            .forward(&mut kv, &step.input(), &mut NoExchange)
            .unwrap();
        for (row, item) in step.items.iter().filter(|it| it.samples).enumerate() {
            let l = logits[row * vocab..(row + 1) * vocab].to_vec();
            let next = argmax(&l);
            let o = &mut out[item.seq as usize];
            o.0.push(l);
            o.1.push(next);
            if o.1.len() <= steps {
                sched.append_token(item.seq, next);
            } else {
                sched.remove(item.seq);
            }
        }
    }
    out
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn check(spec: DemoModelSpec) {
    let dir = tempfile::tempdir().unwrap();
    write_demo_model(dir.path(), &spec).unwrap();
    let candle = Candle::load(dir.path());
    let vocab = candle.config.vocab_size as u32;
    // Prompts of 5, 37 and 70 tokens: one block, a partial third block, five blocks.
    let prompts: Vec<Vec<u32>> = [5usize, 37, 70]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n as u32)
                .map(|i| (i * 7919 + k as u32 * 104_729 + 3) % vocab)
                .collect()
        })
        .collect();
    let got = ours(dir.path(), &prompts, DECODE_STEPS);
    for (p, (our_logits, our_tokens)) in prompts.iter().zip(got) {
        let (ref_logits, ref_tokens) = candle.greedy(p, DECODE_STEPS);
        for (step, (a, b)) in our_logits.iter().zip(&ref_logits).enumerate() {
            let err = max_rel_err(a, b);
            assert!(
                err < 1e-4,
                "prompt of {} tokens, step {step}: max relative error {err:e} against candle",
                p.len()
            );
        }
        assert_eq!(
            our_tokens,
            ref_tokens,
            "greedy continuation of a {}-token prompt",
            p.len()
        );
    }
}

#[test]
fn gqa_with_llama3_rope_scaling_matches_candle() {
    let spec = DemoModelSpec::default();
    assert!(
        spec.num_key_value_heads < spec.num_attention_heads,
        "the demo model has GQA"
    );
    assert!(spec.rope_scaling_llama3);
    check(spec);
}

#[test]
fn plain_rope_with_tied_embeddings_matches_candle() {
    check(DemoModelSpec {
        rope_scaling_llama3: false,
        tie_word_embeddings: true,
        num_key_value_heads: 4,
        seed: 9,
        ..DemoModelSpec::default()
    });
}
