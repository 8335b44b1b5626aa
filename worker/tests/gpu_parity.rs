//! The whole model on the CUDA backend against Hugging Face transformers, on the GPU machine.
//!
//! `tests/gpu/hf_reference.py DIR` writes a random-weight Llama (GQA 16/4, llama3 RoPE scaling)
//! in bf16 and transformers' logits for a prompt and its greedy continuation; this test loads
//! that folder onto the GPU, prefills the prompt in one step, then decodes transformers' tokens
//! one step at a time, and holds every step's logits to a relative error under 1e-2 and its
//! greedy token to transformers' wherever transformers' top-2 margin is clear: wider than twice
//! the largest difference between transformers' own bf16 and float32 logits at that step.
//! `make test-gpu` runs both; without ILM_HF_REFERENCE or a GPU the test says so and passes.

use std::path::PathBuf;

use infinite_llm_worker::backend::cuda::{self, Cuda};
use infinite_llm_worker::backend::{AttnSeq, Backend, KvSegment};
use infinite_llm_worker::model::llama::{Llama, NoExchange, StepInput};
use infinite_llm_worker::sampling::{RowDraw, argmax};
use serde::Deserialize;

const BLOCK_TOKENS: usize = 16;

#[derive(Deserialize)]
struct Reference {
    prompt: Vec<u32>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    logits: Vec<f32>,
    bf16_rel_err: f64,
    bf16_max_abs_err: f32,
    margin: f32,
    token: u32,
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert!(got.iter().all(|x| x.is_finite()), "logits have NaN or inf");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn logits_match_transformers() {
    let Some(dir) = std::env::var_os("ILM_HF_REFERENCE").map(PathBuf::from) else {
        eprintln!(
            "SKIPPED: ILM_HF_REFERENCE is not set (make test-gpu sets it on the GPU machine)"
        );
        return;
    };
    if !cuda::available() {
        eprintln!("SKIPPED: no CUDA GPU on this machine");
        return;
    }
    let reference: Reference =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let mut model = Llama::load(&dir.join("model"), Cuda::new(0).unwrap()).unwrap();
    let total = reference.prompt.len() + reference.steps.len();
    let blocks = total.div_ceil(BLOCK_TOKENS);
    let mut kv = model
        .backend()
        .alloc_kv(model.kv_shape(blocks + 2, BLOCK_TOKENS));
    // Blocks in reverse order, so the paging is not the identity.
    let block_of = |pos: usize| (blocks + 1 - pos / BLOCK_TOKENS) as u32;

    let mut tokens = reference.prompt.clone();
    let mut done = 0;
    let mut checked_tokens = 0;
    for (i, step) in reference.steps.iter().enumerate() {
        let new = &tokens[done..];
        let positions: Vec<u32> = (done..tokens.len()).map(|p| p as u32).collect();
        let slots: Vec<(u32, u32)> = (done..tokens.len())
            .map(|p| (block_of(p), (p % BLOCK_TOKENS) as u32))
            .collect();
        let segments = (0..tokens.len().div_ceil(BLOCK_TOKENS))
            .map(|b| KvSegment {
                block: block_of(b * BLOCK_TOKENS),
                first_pos: (b * BLOCK_TOKENS) as u32,
                tokens: (tokens.len() - b * BLOCK_TOKENS).min(BLOCK_TOKENS) as u32,
            })
            .collect();
        let seqs = [AttnSeq {
            rows: 0..new.len(),
            first_row_pos: done as u32,
            segments,
        }];
        let input = StepInput {
            tokens: new,
            positions: &positions,
            slots: &slots,
            seqs: &seqs,
            logit_rows: &[new.len() - 1],
            remote: &[],
        };
        let logits = model.forward(&mut kv, &input, &mut NoExchange).unwrap();
        let err = rel_err(&logits, &step.logits);
        let ours = argmax(&logits);
        // The same step again, choosing on the GPU: it must pick what the host picks.
        let on_gpu = model
            .forward_sampled(&mut kv, &input, &[RowDraw::greedy()], &mut NoExchange)
            .unwrap();
        assert_eq!(on_gpu, [ours], "step {i}: greedy choice on the GPU");
        eprintln!(
            "step {i}: relative error {err:.2e} (transformers bf16 vs f32: {:.2e}); token ours {ours} \
             transformers {} (top-2 margin {:.3})",
            step.bf16_rel_err, step.token, step.margin
        );
        assert!(err < 1e-2, "step {i}: logits relative error {err:e}");
        // Below transformers' own bf16 noise the greedy choice is a coin toss between roundings.
        if step.margin > 2.0 * step.bf16_max_abs_err {
            assert_eq!(ours, step.token, "step {i}: greedy token differs");
            checked_tokens += 1;
        }
        done = tokens.len();
        tokens.push(step.token);
    }
    eprintln!(
        "{} steps, greedy token checked at {checked_tokens} of them",
        reference.steps.len()
    );
    assert!(
        checked_tokens * 4 >= reference.steps.len(),
        "too few steps with a clear margin to say anything about greedy tokens"
    );
}
