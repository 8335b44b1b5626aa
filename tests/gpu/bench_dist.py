"""make bench-dist: DistAttention over NCCL between the GPUs of this machine, through the worker's
HTTP API in local mode (one worker process per GPU), on a Llama-3-8B-shaped random model.

Usage: python3 bench_dist.py WORKER_BIN MODEL_DIR LOADGEN_BIN WHAT...  (WHAT: overhead, prefill,
capacity, trace). Prints one line per figure; each comparison is measured in the same run.

- overhead (contexts from ILM_BENCH_CONTEXTS, default 16384,65536): time per output token of one request whose KV is split half and half over two GPUs
  (the home holds half its blocks, the other GPU lends the rest, attention over them runs there
  and only queries and partials cross NVLink) against the same request all on one GPU.
- prefill: a 128K-token prompt prefilled for real with half its KV on the other GPU gives one
  GPU's greedy tokens (up to a float tie) and log-probabilities.
- capacity: the longest single request each pool of 1, 2 and 4 GPUs admits (the home reserves
  every block of prompt + max_tokens before it starts, its own, then borrowed), and its decode
  time per token against the roofline of its KV bytes over the GPUs' summed copy bandwidth.
  The prompt is not prefilled (--unfilled-prompts: its blocks hold whatever they held).
- trace: one seeded long-context trace replayed by infinite-llm-loadgen against pooled and
  static (each worker alone) placement on the same GPUs.
"""

import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BIN, MODEL, LOADGEN = sys.argv[1], sys.argv[2], sys.argv[3]
WHAT = sys.argv[4:] or ["overhead", "prefill", "capacity", "trace"]
BLOCK = 16
NEW = 64
LOGS = tempfile.mkdtemp(prefix="ilm-bench-dist-")


def gpus() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pool:
    """Local mode with one worker per device given; stopped on exit from the `with` block."""

    def __init__(self, name, devices, kv_blocks=None, lend=None, transport="nccl", extra=()):
        port = free_port()
        args = [BIN, "local", f"--workers={len(devices)}", f"--devices={','.join(devices)}",
                f"--port={port}", f"--gmanager-port={free_port()}", f"--model={MODEL}",
                f"--transport={transport}", "--ready-timeout-secs=900"]
        if kv_blocks:
            args.append(f"--kv-blocks={kv_blocks}")
        if lend is not None:
            args.append("--lend-fractions=" + ",".join(str(f) for f in lend))
        args.extend(extra)
        self.log = os.path.join(LOGS, f"{name}.log")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True)
        self.base = f"http://127.0.0.1:{port}"
        self.workers = []
        for line in self.proc.stdout:
            m = re.search(r"worker-\d+\s+pid\s+\d+\s+(http://\S+)", line)
            if m:
                self.workers.append(m.group(1))
            if "Ctrl-C stops everything" in line:
                break
        else:
            raise SystemExit(f"local mode {name} did not start; see {self.log}")
        time.sleep(3)  # the first heartbeats tell the gManager who lends

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def prompt(tokens: int, salt: int) -> list:
    return [(i * 7919 + salt * 104729) % 900 + 20 for i in range(tokens)]


def stream(base: str, ids: list, max_tokens: int, first_only=False, timeout=900):
    """Times of the streamed chunks with text (seconds after sending)."""
    body = json.dumps({"model": os.path.basename(MODEL.rstrip("/")), "prompt": ids,
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    sent = time.perf_counter()
    times = []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if any(c.get("text") for c in chunk.get("choices", [])):
                times.append(time.perf_counter() - sent)
                if first_only:
                    break
    return times


def per_token(times: list) -> float:
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def until(cond, what: str, within=60.0):
    deadline = time.time() + within
    while not cond():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def overhead():
    contexts = os.environ.get("ILM_BENCH_CONTEXTS", "16384,65536")
    for context in map(int, contexts.split(",")):
        need = math.ceil((context + NEW) / BLOCK)
        ids = prompt(context, 1)
        with Pool(f"local-{context}", ["cuda:0"], kv_blocks=need + 64) as p:
            stream(p.workers[0], prompt(512, 9), 8)
            local = per_token(stream(p.workers[0], ids, NEW))
        half = math.ceil(need / 2)
        with Pool(f"split-{context}", ["cuda:0", "cuda:1"], kv_blocks=half, lend=[0, 1.0]) as p:
            home = p.workers[0]
            # A first request that borrows opens the connection; the link comes up beside it.
            stream(home, prompt(half * BLOCK, 8), 8)
            until(lambda: metric(home, "ilm_peer_direct_links") >= 1, "the NCCL link")
            split = per_token(stream(home, ids, NEW))
            borrowed = metric(home, "ilm_kv_borrow_total")
        print(f"decode time per token at {context} tokens: all on one GPU {local * 1e3:.2f} ms, "
              f"half on each of two GPUs over NCCL {split * 1e3:.2f} ms, "
              f"overhead {100 * (split / local - 1):+.1f}% (target < 15%; {borrowed:.0f} blocks "
              f"borrowed in all)", flush=True)


def completion(base: str, ids: list, max_tokens: int) -> list:
    """Greedy tokens of a request, each with its top-2 log-probabilities (best first)."""
    body = json.dumps({"model": os.path.basename(MODEL.rstrip("/")), "prompt": ids,
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "logprobs": 2}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1200) as resp:
        lp = json.loads(resp.read())["choices"][0]["logprobs"]
    return [(t, sorted(top.values(), reverse=True))
            for t, top in zip(lp["tokens"], lp["top_logprobs"])]


def prefill():
    """A 128K-token prompt prefilled for real with half its KV on the other GPU: its greedy
    tokens and log-probabilities against one GPU's."""
    context, new = 131072 - 64, 16
    need = math.ceil((context + new) / BLOCK)
    ids = prompt(context, 5)
    chunks = ["--max-batched-tokens=8192"]
    with Pool("prefill-one", ["cuda:0"], kv_blocks=need + 64, extra=chunks) as p:
        started = time.perf_counter()
        one = completion(p.workers[0], ids, new)
        one_s = time.perf_counter() - started
    half = math.ceil(need / 2)
    with Pool("prefill-split", ["cuda:0", "cuda:1"], kv_blocks=half, lend=[0, 1.0],
              extra=chunks) as p:
        home = p.workers[0]
        stream(home, prompt(half * BLOCK, 8), 8)
        until(lambda: metric(home, "ilm_peer_direct_links") >= 1, "the NCCL link")
        started = time.perf_counter()
        two = completion(home, ids, new)
        two_s = time.perf_counter() - started
    same = next((i for i, (a, b) in enumerate(zip(one, two)) if a[0] != b[0]), len(one))
    margin = one[same][1][0] - one[same][1][1] if same < len(one) else float("nan")
    diff = max((abs(x - y) for a, b in zip(one[:same], two[:same]) for x, y in zip(a[1], b[1])),
               default=0.0)
    print(f"prefill of {context} tokens then {new} greedy: one GPU {one_s:.1f} s, half the KV on "
          f"the other GPU {two_s:.1f} s; {same} of {new} tokens equal"
          + (f" (then a token where one GPU's top-2 margin is {margin:.4f})" if same < new else "")
          + f"; largest difference of the top-2 log-probabilities before that {diff:.4f}",
          flush=True)


def copy_bandwidth() -> float:
    """Bytes per second a device-to-device copy moves on GPU 0 (read plus write), measured as
    `make bench-gpu` measures it; the memory is handed back, since the pools size themselves
    from what is free."""
    import torch
    from bench_peers import copy_bandwidth as measure
    bandwidth = measure()
    torch.cuda.empty_cache()
    return bandwidth


def capacity():
    """The longest request each pool admits, and decode at that context. The pools run with
    --unfilled-prompts: the prompt's blocks are reserved and taken as written (whatever they
    hold) but for its last token, since prefilling a million tokens takes longer than a visit."""
    bandwidth = copy_bandwidth()
    # K and V of 32 layers, 8 KV heads of 128, bf16.
    kv_bytes_per_token = 32 * 8 * 128 * 2 * 2
    new = 32
    one = None
    for n in (1, 2, 4):
        if n > gpus():
            print(f"capacity on {n} GPUs: skipped, this machine has {gpus()}")
            continue
        lend = [0.0] + [1.0] * (n - 1)
        with Pool(f"capacity-{n}", [f"cuda:{i}" for i in range(n)], lend=lend,
                  extra=["--unfilled-prompts"]) as p:
            blocks = [metric(w, "ilm_kv_blocks_total") for w in p.workers]
            if one is None:
                one = int(blocks[0]) * BLOCK
            # One block short of the whole pool on one GPU; 0.9 of N pools on N.
            want = one - BLOCK if n == 1 else math.floor(0.9 * n * one)
            started = time.perf_counter()
            try:
                times = stream(p.workers[0], prompt(want - new, 2), new, timeout=600)
            except urllib.error.HTTPError as e:
                print(f"capacity on {n} GPU(s): {want} tokens refused: {e.read().decode()[:300]}")
                times = []
            took = time.perf_counter() - started
            borrowed = metric(p.workers[0], "ilm_kv_borrow_total") * BLOCK
        line = (f"capacity on {n} GPU(s): pools {[int(b) for b in blocks]} blocks of {BLOCK}; "
                f"one request of {want} tokens ({want / one:.2f} x one GPU's {one}) ")
        if len(times) < 2:
            print(line + "NOT admitted", flush=True)
            continue
        step = per_token(times)
        roofline = want * kv_bytes_per_token / (n * bandwidth)
        print(line + f"admitted ({borrowed:.0f} tokens borrowed), first token after "
              f"{times[0]:.1f} s; decode at that context {step * 1e3:.1f} ms a token, roofline "
              f"(its KV bytes over {n} x {bandwidth / 1e12:.2f} TB/s copy bandwidth) "
              f"{roofline * 1e3:.1f} ms: {roofline / step:.2f} of it", flush=True)


def trace():
    n = min(gpus(), 4)
    devices = [f"cuda:{i}" for i in range(n)]
    pool_tokens = 2048 * BLOCK
    # As make bench-pool does: the long trace scaled so that its Pareto tail (60K x scale) starts
    # beyond one worker's pool, capped within what a pooled home can hold (its pool plus half
    # of each other's).
    scale = 1.1 * pool_tokens / 60000
    longest = int(0.95 * pool_tokens * (1 + 0.5 * (n - 1)))
    args = ["--model", os.path.basename(MODEL.rstrip("/")), "--trace", "long", "--rate", "0.5",
            "--duration", "60", "--scale-tokens", f"{scale:.3f}", "--max-prompt-tokens",
            str(longest), "--max-output-tokens", "64", "--timeout-secs", "300", "--seed", "1",
            "--json"]
    result = {}
    for name, lend in (("pooled", [0.5] * n), ("static", [0.0] * n)):
        with Pool(f"trace-{name}", devices, kv_blocks=2048, lend=lend) as p:
            out = subprocess.run([LOADGEN, "--url", p.base, *args], capture_output=True,
                                 text=True, check=True).stdout
            result[name] = json.loads(out)
        r = result[name]
        print(f"trace on {n} GPUs, {name}: {r['ok']}/{r['requests']} ok "
              f"(failures {r['failures']}), {r['output_tokens_per_s']:.1f} output tokens/s, "
              f"{(r['prompt_tokens'] + r['output_tokens']) / r['wall_s']:.0f} prompt+output "
              f"tokens/s, TTFT {r['ttft_ms']}, ITL {r['itl_ms']}", flush=True)
    pooled, static = (result[k] for k in ("pooled", "static"))
    total = [(r["prompt_tokens"] + r["output_tokens"]) / r["wall_s"] for r in (pooled, static)]
    if static["output_tokens_per_s"] > 0 and total[1] > 0:
        print(f"trace on {n} GPUs: pooled/static output tokens/s "
              f"{pooled['output_tokens_per_s'] / static['output_tokens_per_s']:.2f}x, "
              f"prompt+output tokens/s {total[0] / total[1]:.2f}x (target 1.35x; args "
              f"{' '.join(args[2:-1])})")


for what in WHAT:
    {"overhead": overhead, "prefill": prefill, "capacity": capacity, "trace": trace}[what]()
print(f"logs: {LOGS}")
