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

/// The folder `tests/gpu/hf_reference.py` wrote and its reference, or why the test is skipped.
fn reference() -> Option<(PathBuf, Reference)> {
    let Some(dir) = std::env::var_os("ILM_HF_REFERENCE").map(PathBuf::from) else {
        eprintln!(
            "SKIPPED: ILM_HF_REFERENCE is not set (make test-gpu sets it on the GPU machine)"
        );
        return None;
    };
    if !cuda::available() {
        eprintln!("SKIPPED: no CUDA GPU on this machine");
        return None;
    }
    let reference =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    Some((dir, reference))
}

#[test]
fn logits_match_transformers() {
    let Some((dir, reference)) = reference() else {
        return;
    };
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

/// Greedy decode of several sequences in one batch, all prompts prefilled in the first step;
/// the last sequence stops halfway so the batch shrinks. Returns every step's logits.
fn batched_greedy(model: &mut Llama<Cuda>, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<f32>> {
    let vocab = model.config().vocab_size;
    let per_seq = (prompts.iter().map(Vec::len).max().unwrap() + steps).div_ceil(BLOCK_TOKENS);
    let mut kv = model
        .backend()
        .alloc_kv(model.kv_shape(per_seq * prompts.len(), BLOCK_TOKENS));
    let mut seqs_tokens = prompts.to_vec();
    let mut done = vec![0; prompts.len()];
    let mut out = Vec::new();
    for step in 0..steps {
        let live = if step < steps / 2 {
            prompts.len()
        } else {
            prompts.len() - 1
        };
        let (mut tokens, mut positions, mut slots, mut seqs, mut logit_rows) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, toks) in seqs_tokens.iter().enumerate().take(live) {
            let first = tokens.len();
            let block_of = |pos: usize| (i * per_seq + pos / BLOCK_TOKENS) as u32;
            for (p, &t) in toks.iter().enumerate().skip(done[i]) {
                tokens.push(t);
                positions.push(p as u32);
                slots.push((block_of(p), (p % BLOCK_TOKENS) as u32));
            }
            seqs.push(AttnSeq {
                rows: first..tokens.len(),
                first_row_pos: done[i] as u32,
                segments: (0..toks.len().div_ceil(BLOCK_TOKENS))
                    .map(|b| KvSegment {
                        block: block_of(b * BLOCK_TOKENS),
                        first_pos: (b * BLOCK_TOKENS) as u32,
                        tokens: (toks.len() - b * BLOCK_TOKENS).min(BLOCK_TOKENS) as u32,
                    })
                    .collect(),
            });
            logit_rows.push(tokens.len() - 1);
        }
        let input = StepInput {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            seqs: &seqs,
            logit_rows: &logit_rows,
            remote: &[],
        };
        let logits = model.forward(&mut kv, &input, &mut NoExchange).unwrap();
        for (i, row) in logits.chunks(vocab).enumerate() {
            done[i] = seqs_tokens[i].len();
            seqs_tokens[i].push(argmax(row));
        }
        out.push(logits);
    }
    out
}

/// Decode steps replayed from recorded CUDA graphs compute what the same steps launched kernel
/// by kernel compute: each step's positions and KV slots reach the recorded kernels, also when
/// the batch shrinks and a new batch size is recorded.
#[test]
fn graph_replays_match_eager_steps() {
    let Some((dir, reference)) = reference() else {
        return;
    };
    let prompts: Vec<Vec<u32>> = (0..3).map(|k| reference.prompt[k..].to_vec()).collect();
    let steps = 24;
    let load = |graphs| {
        let gpu = Cuda::new(0).unwrap().with_graphs(graphs);
        Llama::load(&dir.join("model"), gpu).unwrap()
    };
    let (mut eager_model, mut graph_model) = (load(false), load(true));
    let eager = batched_greedy(&mut eager_model, &prompts, steps);
    let replayed = batched_greedy(&mut graph_model, &prompts, steps);
    // Without replays the comparison would hold trivially.
    assert_eq!(eager_model.backend().graph_launches(), 0);
    let launches = graph_model.backend().graph_launches();
    eprintln!("{launches} recorded parts launched");
    assert!(launches > 0, "no step replayed a recorded part");
    for (i, (r, e)) in replayed.iter().zip(&eager).enumerate() {
        let err = rel_err(r, e);
        eprintln!(
            "step {i}: {} rows of logits, graphs against eager relative error {err:.1e}",
            r.len() / reference.steps[0].logits.len()
        );
        assert!(
            err < 1e-5,
            "step {i}: replayed logits differ from eager ones by {err:e}"
        );
    }
}
