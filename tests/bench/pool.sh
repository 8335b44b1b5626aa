#!/usr/bin/env bash
# make bench-pool: the same trace, replayed by infinite-llm-loadgen, against local mode twice on
# the demo model: pooled (the default lend fraction, 0.5) and static (--lend-fractions 0,...,0:
# each worker alone, like independent vLLM instances). Prints both reports and the ratio
# pooled/static of throughput. The long trace's lengths are scaled to the small pools, so that
# the longest prompts fit only in the pooled cluster, as in the paper.
set -euo pipefail
cd "$(dirname "$0")/../.."

workers="${WORKERS:-3}"
kv_blocks="${KV_BLOCKS:-64}"
# Scaled by 0.03, the long trace's Pareto tail starts at 1800 tokens: beyond one worker's 64
# blocks of 16 tokens, within what a pooled worker may borrow (its own 1024 plus half of each
# other pool).
read -r -a loadgen_args <<<"${LOADGEN_ARGS:---trace long --rate 1.5 --duration 60 --scale-tokens 0.03 --max-prompt-tokens 1900 --seed 1}"

cargo build --release --workspace --bins
# Requests of at most one worker's tokens: the ones static serves too, whose TTFT is compared.
fit_tokens=$((kv_blocks * 16))

free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

out="$(mktemp -d -t ilm-bench-pool.XXXXXX)"
pool=""
stop_pool() {
	if [[ -n "$pool" ]]; then
		kill -TERM "$pool" 2>/dev/null || true
		wait "$pool" 2>/dev/null || true
		pool=""
	fi
}
trap stop_pool EXIT

# run NAME [local-mode flags...]: starts the pool, waits for its banner, replays, stops it.
run() {
	local name="$1"
	shift
	local port log
	port="$(free_port)"
	log="$out/$name.log"
	: >"$log"
	target/release/infinite-llm-worker local --workers "$workers" --kv-blocks "$kv_blocks" \
		--port "$port" --gmanager-port "$(free_port)" "$@" >"$log" 2>&1 &
	pool=$!
	for _ in $(seq 600); do
		grep -q "Ctrl-C stops everything" "$log" && break
		kill -0 "$pool" 2>/dev/null || {
			cat "$log"
			echo "local mode ($name) exited before it was ready" >&2
			exit 1
		}
		sleep 0.5
	done
	# The workers' first heartbeats tell the gManager who can lend.
	sleep 3
	echo "== $name: $workers workers of $kv_blocks blocks; loadgen ${loadgen_args[*]}"
	target/release/infinite-llm-loadgen --url "http://127.0.0.1:$port" "${loadgen_args[@]}" \
		--fit-tokens "$fit_tokens" --json >"$out/$name.json" 2>"$out/$name.loadgen.log"
	stop_pool
}

run pooled
static_fractions="$(printf '0,%.0s' $(seq "$workers"))"
run static --lend-fractions "${static_fractions%,}"

python3 - "$out/pooled.json" "$out/static.json" <<'PY'
import json, sys

runs = {name: json.load(open(path)) for name, path in zip(["pooled", "static"], sys.argv[1:])}

def all_tokens_per_s(r):
    """Prompt and output tokens of the successful requests, as `make simulate` counts them."""
    return (r["prompt_tokens"] + r["output_tokens"]) / r["wall_s"]

def ms(v):
    return "-" if v is None else f"{v:.0f}"

print(f"{'':8} {'ok':>5} {'failed':>7} {'429':>5} {'503':>5} {'other':>6} {'req/s':>7} "
      f"{'out tok/s':>10} {'all tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'fit p99':>8} "
      f"{'ITL p50':>8} {'ITL p99':>8}")
for name, r in runs.items():
    other = r["failed"] - r["rejected_429"] - r["unavailable_503"]
    print(f"{name:8} {r['ok']:>5} {r['failed']:>7} {r['rejected_429']:>5} {r['unavailable_503']:>5} "
          f"{other:>6} {r['requests_per_s']:>7.2f} {r['output_tokens_per_s']:>10.1f} "
          f"{all_tokens_per_s(r):>10.1f} {ms(r['ttft_ms']['p50']):>9} {ms(r['ttft_ms']['p99']):>9} "
          f"{ms(r['fitting_ttft_ms']['p99']):>8} "
          f"{ms(r['itl_ms']['p50']):>8} {ms(r['itl_ms']['p99']):>8}")
    if r["failures"]:
        print(f"{'':8} failures by status: {r['failures']}")

def ratio(f):
    return f(runs["pooled"]) / max(f(runs["static"]), 1e-9)

print(f"pooled/static: prompt+output tokens/s {ratio(all_tokens_per_s):.2f}, "
      f"output tokens/s {ratio(lambda r: r['output_tokens_per_s']):.2f}, "
      f"requests/s {ratio(lambda r: r['requests_per_s']):.2f}; TTFT p99 of the requests both "
      f"serve (fit p99: prompt+max_tokens within one worker) {ratio(lambda r: r['fitting_ttft_ms']['p99'] or 0):.2f}")
PY
echo "reports and logs: $out"
