//! `make bench-gpu`: the CUDA worker against its peers and the roofline, measured in one run.
//!
//! Reads the peers' figures that tests/gpu/bench_peers.py measured just before on the same GPU
//! (ILM_PEER_FIGURES: copy bandwidth, PyTorch SDPA, transformers) and the Llama-3-8B-shaped
//! model folder (ILM_BENCH_MODEL), then prints:
//! - paged decode MicroAttention bandwidth (KV bytes read per second) at (batch, context) =
//!   (1, 128K), (8, 32K), (64, 4K), (1, 1M), 32 query and 8 KV heads of 128, over SDPA and over
//!   the copy bandwidth;
//! - whole-worker decode tokens/s at batch 1, 8, 32 (prompt 512, 128 new tokens) over
//!   transformers' `generate` and over the roofline (weights plus KV bytes per step at copy speed);
//! - prefill attention over an 8K prompt (causal, one call for all its rows), FLOP/s over
//!   SDPA's on the same shape;
//! - prefill tokens/s of an 8K prompt over transformers.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

mod decode_clock;

use infinite_llm_worker::backend::cuda::{self, Cuda};
use infinite_llm_worker::backend::{AttnSeq, AttnShape, Backend, KvSegment, KvShape};
use infinite_llm_worker::engine::{self, Device, EngineOptions};
use infinite_llm_worker::model::config::ModelConfig;
use infinite_llm_worker::request::{Event, GenerateRequest};
use infinite_llm_worker::scheduler::StepRule;
use serde::Deserialize;

const Q_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BT: usize = 16;
const SHAPES: [(usize, usize); 4] = [(1, 131072), (8, 32768), (64, 4096), (1, 1048576)];
const BATCHES: [usize; 3] = [1, 8, 32];
const PROMPT: usize = 512;
const NEW: usize = 128;
const PREFILL: usize = 8192;

#[derive(Deserialize)]
struct Peers {
    gpu: String,
    copy_bytes_per_s: f64,
    sdpa_bytes_per_s: HashMap<String, f64>,
    sdpa_prefill_flops_per_s: f64,
    /// Absent when only the kernels are benchmarked (`tests/gpu/run.sh bench kernels`).
    transformers: Option<Transformers>,
}

#[derive(Deserialize)]
struct Transformers {
    decode_tokens_per_s: HashMap<String, f64>,
    prefill_tokens_per_s: f64,
}

/// Random K/V (never zeros: they can read faster than data) in every block of one layer.
fn fill_kv(g: &Cuda, kv: &mut <Cuda as Backend>::Kv, tokens: usize) {
    let width = 2 * KV_HEADS * HEAD_DIM;
    let chunk = 32768;
    let src: Vec<f32> = (0..chunk * width)
        .map(|i| ((i as u64).wrapping_mul(2654435761) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut buf = g.alloc(src.len());
    g.upload(&src, &mut buf);
    for start in (0..tokens).step_by(chunk) {
        let slots: Vec<(u32, u32)> = (start..(start + chunk).min(tokens))
            .map(|t| ((t / BT) as u32, (t % BT) as u32))
            .collect();
        g.kv_write(kv, 0, &buf, width, 0, KV_HEADS * HEAD_DIM, &slots);
    }
    g.synchronize();
}

/// Median GPU seconds of one attention call (after a warm-up) over `seqs`, `rows` query rows.
fn attention_secs(g: &Cuda, kv: &<Cuda as Backend>::Kv, rows: usize, seqs: &[AttnSeq]) -> f64 {
    let shape = AttnShape {
        q_heads: Q_HEADS,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
    };
    let q_width = Q_HEADS * HEAD_DIM;
    let q: Vec<f32> = (0..rows * q_width)
        .map(|i| (i % 97) as f32 / 97.0 - 0.5)
        .collect();
    let mut qd = g.alloc(q.len());
    g.upload(&q, &mut qd);
    let mut out = g.alloc(rows * q_width);
    let mut lse = g.alloc(rows * Q_HEADS);
    let mut run = || g.attention(&qd, q_width, 0, kv, 0, shape, seqs, &mut out, &mut lse);
    run();
    let mut times: Vec<f64> = (0..20).map(|_| g.device_seconds(&mut run)).collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The segments of `ctx` tokens in consecutive blocks from `first_block`.
fn segments(first_block: usize, ctx: usize) -> Vec<KvSegment> {
    (0..ctx / BT)
        .map(|i| KvSegment {
            block: (first_block + i) as u32,
            first_pos: (i * BT) as u32,
            tokens: BT as u32,
        })
        .collect()
}

/// KV bytes read per second by one decode token per sequence over `ctx` tokens each.
fn attention_bandwidth(g: &Cuda, kv: &<Cuda as Backend>::Kv, batch: usize, ctx: usize) -> f64 {
    let seqs: Vec<AttnSeq> = (0..batch)
        .map(|b| AttnSeq {
            rows: b..b + 1,
            first_row_pos: (ctx - 1) as u32,
            segments: segments(b * (ctx / BT), ctx),
        })
        .collect();
    let bytes = (batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2) as f64;
    bytes / attention_secs(g, kv, batch, &seqs)
}

/// FLOP/s of causal attention for a whole prompt of `len` tokens in one call, counting the
/// FLOPs of the visible (query, key) pairs as SDPA's figure does.
fn prefill_attention_flops(g: &Cuda, kv: &<Cuda as Backend>::Kv, len: usize) -> f64 {
    let seqs = [AttnSeq {
        rows: 0..len,
        first_row_pos: 0,
        segments: segments(0, len),
    }];
    let pairs = (len * (len + 1) / 2) as f64;
    4.0 * pairs * (Q_HEADS * HEAD_DIM) as f64 / attention_secs(g, kv, len, &seqs)
}

/// The projections at batch 1 (one row): weight bytes read per second by the gate/up GEMM of a
/// Llama-3-8B layer, the largest of a decode step, against the copy bandwidth.
fn gemv_line(g: &Cuda, copy: f64) -> String {
    let (n, k) = (2 * 14336, 4096);
    let w = g.weight(
        n,
        k,
        (0..n * k)
            .map(|i| ((i % 251) as f32 - 125.0) / 1000.0)
            .collect(),
    );
    let mut x = g.alloc(k);
    g.upload(&vec![0.5; k], &mut x);
    let mut out = g.alloc(n);
    let reps = 50;
    g.linear(&x, 1, &w, None, &mut out);
    let secs = g.device_seconds(|| {
        for _ in 0..reps {
            g.linear(&x, 1, &w, None, &mut out);
        }
    });
    let bw = (n * k * 2 * reps) as f64 / secs;
    format!(
        "cuBLAS bf16 GEMM at one row ({n}x{k}): {:.0} GB/s of weights | over copy {:.2}",
        bw / 1e9,
        bw / copy
    )
}

fn prompt(k: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + k * 104_729 + 3) % vocab) as u32)
        .collect()
}

/// Decode tokens/s with `batch` concurrent requests: the clock runs from the moment every
/// request has its first token to the last token, so prefill is left out.
async fn decode_tokens_per_s(e: &engine::EngineHandle, vocab: usize, batch: usize) -> f64 {
    let streams: Vec<_> = (0..batch)
        .map(|k| {
            e.submit(GenerateRequest::greedy(prompt(k, PROMPT, vocab), NEW))
                .unwrap()
        })
        .collect();
    decode_clock::decode_tokens_per_s(streams, batch * (NEW - 1)).await
}

async fn prefill_tokens_per_s(e: &engine::EngineHandle, vocab: usize) -> f64 {
    let start = Instant::now();
    let mut rx = e
        .submit(GenerateRequest::greedy(prompt(99, PREFILL, vocab), 1))
        .unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Token { .. })));
    PREFILL as f64 / start.elapsed().as_secs_f64()
}

/// Bytes a decode step must read: every weight but the embedding table (only gathered), and
/// each sequence's KV at its mean context over the run.
fn step_bytes(c: &ModelConfig, batch: usize) -> f64 {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h;
    let weights = c.num_hidden_layers * per_layer + v * h + h;
    let mean_ctx = PROMPT + NEW / 2;
    let kv_bytes = batch * mean_ctx * c.num_hidden_layers * 2 * kv * 2;
    (2 * weights + kv_bytes) as f64
}

/// What `tests/gpu/run.sh profile` runs under Nsight Compute: one batch-1 request decoded
/// eagerly (every kernel launched on its own, so each is timed). Its wall time under the
/// profiler means nothing, so none is printed.
fn profile_target(model: &Path) {
    let vocab = ModelConfig::from_model_dir(model).unwrap().vocab_size;
    let e = engine::start(
        model,
        EngineOptions {
            device: Device::Cuda(0),
            enforce_eager: true,
            gpu_memory_fraction: 0.3,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(decode_tokens_per_s(&e, vocab, 1));
}

fn main() {
    if !cuda::available() {
        println!("SKIPPED: no CUDA GPU on this machine (make bench-gpu runs on the GPU machine)");
        return;
    }
    let (Some(peers), Some(model)) = (
        std::env::var_os("ILM_PEER_FIGURES"),
        std::env::var_os("ILM_BENCH_MODEL"),
    ) else {
        println!("SKIPPED: ILM_PEER_FIGURES and ILM_BENCH_MODEL are set by make bench-gpu");
        return;
    };
    if std::env::var_os("ILM_BENCH_PROFILE").is_some() {
        profile_target(Path::new(&model));
        return;
    }
    let peers: Peers = serde_json::from_slice(&std::fs::read(peers).unwrap()).unwrap();
    let copy = peers.copy_bytes_per_s;
    println!(
        "{} | copy bandwidth (read + write) {:.0} GB/s",
        peers.gpu,
        copy / 1e9
    );

    let mut attn = Vec::new();
    {
        let g = Cuda::new(0).unwrap();
        let most = SHAPES.iter().map(|(b, c)| b * c).max().unwrap();
        let mut kv = g.alloc_kv(KvShape {
            layers: 1,
            blocks: most / BT,
            block_tokens: BT,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
        });
        attn.push(gemv_line(&g, copy));
        fill_kv(&g, &mut kv, most);
        for (batch, ctx) in SHAPES {
            let ours = attention_bandwidth(&g, &kv, batch, ctx);
            let sdpa = peers.sdpa_bytes_per_s[&format!("{batch}x{ctx}")];
            attn.push(format!(
                "attention batch {batch:>2} ctx {:>5}K: {:7.0} GB/s | SDPA {:7.0} GB/s | ours/SDPA {:.2}x | ours/copy {:.2}",
                ctx / 1024,
                ours / 1e9,
                sdpa / 1e9,
                ours / sdpa,
                ours / copy
            ));
        }
        let ours = prefill_attention_flops(&g, &kv, PREFILL);
        let sdpa = peers.sdpa_prefill_flops_per_s;
        attn.push(format!(
            "prefill attention {}K causal: {:6.1} TFLOP/s | SDPA {:6.1} TFLOP/s | ours/SDPA {:.2}x",
            PREFILL / 1024,
            ours / 1e12,
            sdpa / 1e12,
            ours / sdpa
        ));
    }
    for line in &attn {
        println!("{line}");
    }
    let Some(transformers) = peers.transformers else {
        return;
    };

    let model = Path::new(&model);
    let config = ModelConfig::from_model_dir(model).unwrap();
    let vocab = config.vocab_size;
    // Two workers share the GPU: the second launches every kernel on its own (no CUDA graphs).
    let start = |enforce_eager| {
        engine::start(
            model,
            EngineOptions {
                device: Device::Cuda(0),
                max_num_seqs: 64,
                step_rule: StepRule {
                    max_batched_tokens: PREFILL,
                    ..StepRule::default()
                },
                gpu_memory_fraction: 0.3,
                enforce_eager,
                ..EngineOptions::default()
            },
        )
        .unwrap()
    };
    let t = Instant::now();
    let e = start(false);
    println!(
        "worker loaded the model in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Warm-up: kernels, cuBLAS heuristics and scratch reach their steady state.
        decode_tokens_per_s(&e, vocab, 2).await;
        let mut decode = Vec::new();
        for batch in BATCHES {
            let ours = decode_tokens_per_s(&e, vocab, batch).await;
            decode.push(ours);
            let hf = transformers.decode_tokens_per_s[&batch.to_string()];
            let roofline = batch as f64 * copy / step_bytes(&config, batch);
            println!(
                "decode batch {batch:>2}: {ours:8.1} tok/s | transformers {hf:8.1} | ours/transformers {:.2}x | ours/roofline {:.2} (roofline {roofline:.0} tok/s)",
                ours / hf,
                ours / roofline
            );
        }
        let eager = start(true);
        decode_tokens_per_s(&eager, vocab, 2).await;
        for (batch, ours) in BATCHES.into_iter().zip(decode) {
            let without = decode_tokens_per_s(&eager, vocab, batch).await;
            println!(
                "decode batch {batch:>2}: CUDA graphs {ours:8.1} tok/s | eager {without:8.1} tok/s | graphs/eager {:.2}x",
                ours / without
            );
        }
        drop(eager);
        prefill_tokens_per_s(&e, vocab).await;
        let ours = prefill_tokens_per_s(&e, vocab).await;
        let hf = transformers.prefill_tokens_per_s;
        println!(
            "prefill {}K prompt: {ours:8.0} tok/s | transformers {hf:8.0} | ours/transformers {:.2}x",
            PREFILL / 1024,
            ours / hf
        );
    });
}
