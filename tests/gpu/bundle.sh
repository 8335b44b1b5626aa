#!/usr/bin/env bash
# Builds, here, everything the GPU machine runs (it has no Rust toolchain): the GPU test and
# bench binaries and the worker, stripped, into target/gpu-bundle. Carry that folder there and
# run `make test-gpu` / `make bench-gpu`.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out"

# Reads cargo's JSON messages and copies, stripped, each executable of target kind $1.
collect() {
	python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == [sys.argv[1]]:
        print(m["target"]["name"], m["executable"])
' "$1" | while read -r name exe; do
		strip -o "$out/$name" "$exe"
	done
}

cargo build --release -p infinite-llm-worker -p infinite-llm-operator -p infinite-llm-workload --bins \
	--message-format=json |
	collect bin
cargo test --release -p infinite-llm-worker --no-run --message-format=json \
	--test gpu_kernels --test gpu_parity --test gpu_links --test gpu_pool | collect test
cargo bench -p infinite-llm-worker --no-run --message-format=json --bench gpu_bench |
	collect bench
ls -la "$out"
