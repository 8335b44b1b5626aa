"""The peers `make bench-gpu` compares the worker with, measured on the same GPU in the same run.

Usage: python3 bench_peers.py MODEL_DIR OUT_JSON
Writes: device-to-device copy bandwidth (bytes read plus written per second); PyTorch
scaled_dot_product_attention bandwidth for one decode token over contiguous KV at each
(batch, context) the worker's kernel is timed at, and its FLOP/s for causal attention over a whole
8K prompt (the FLOPs of the visible query-key pairs); transformers' `generate` decode tokens/s at
batch 1, 8 and 32 (prompt 512, 128 new tokens) and its prefill tokens/s for an 8K prompt, for the
model in MODEL_DIR.
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

ATTN_SHAPES = [(1, 131072), (8, 32768), (64, 4096), (1, 1048576)]
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BATCHES = [1, 8, 32]
PROMPT, NEW = 512, 128
PREFILL = 8192


def timed(fn, reps):
    """Median milliseconds of `fn` over `reps` runs, timed with CUDA events after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth():
    src = torch.randn(1 << 30, device="cuda", dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (ms / 1e3)


def sdpa_bandwidth(batch, ctx):
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 20)
    return 2 * k.numel() * 2 / (ms / 1e3)


def sdpa_prefill_flops(n):
    q = torch.randn(1, Q_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 20)
    pairs = n * (n + 1) / 2
    return 4 * pairs * Q_HEADS * HEAD_DIM / (ms / 1e3)


def hf_figures(model_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    out = {"decode_tokens_per_s": {}}
    with torch.no_grad():
        for batch in BATCHES:
            ids = torch.randint(0, vocab, (batch, PROMPT), device="cuda")
            gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            # Decode rate: the time of NEW tokens minus the time of the prompt plus one token.
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            model.generate(ids, **gen)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            out["decode_tokens_per_s"][str(batch)] = batch * (NEW - 1) / ((t2 - t1) - (t1 - t0))
        ids = torch.randint(0, vocab, (1, PREFILL), device="cuda")
        ms = timed(lambda: model(ids, logits_to_keep=1), 3)
        out["prefill_tokens_per_s"] = PREFILL / (ms / 1e3)
    return out


def main(model_dir, out_path, kernels_only):
    figures = {
        "gpu": torch.cuda.get_device_name(),
        "copy_bytes_per_s": copy_bandwidth(),
        "sdpa_bytes_per_s": {f"{b}x{c}": sdpa_bandwidth(b, c) for b, c in ATTN_SHAPES},
        "sdpa_prefill_flops_per_s": sdpa_prefill_flops(PREFILL),
    }
    torch.cuda.empty_cache()
    if not kernels_only:
        figures["transformers"] = hf_figures(model_dir)
    with open(out_path, "w") as f:
        json.dump(figures, f, indent=1)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--kernels-only" in sys.argv[3:])
