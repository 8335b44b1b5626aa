#!/usr/bin/env bash
# Runs on the GPU machine, from the bundle tests/gpu/bundle.sh built (no Rust toolchain there).
#   tests/gpu/run.sh test    kernel tests against float64, whole-model logits against transformers
#   tests/gpu/run.sh bench   attention, decode and prefill against PyTorch/transformers and the roofline
#                            (bench kernels: only the attention kernels against PyTorch)
#   tests/gpu/run.sh profile Nsight Compute's time of each kernel of a batch-1 decode step
#   tests/gpu/run.sh pool    only the multi-GPU tests: block moves over NCCL, then one request over
#                            two (or four) GPUs and a kill
#   tests/gpu/run.sh dist    DistAttention over NCCL between this machine's GPUs (two or more):
#                            split-KV decode overhead, single-request capacity, pooled vs static
# Work files go to ${ILM_GPU_WORK:-/tmp/ilm-gpu}.
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=target/gpu-bundle
work="${ILM_GPU_WORK:-/tmp/ilm-gpu}"
mkdir -p "$work"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# cudarc opens libnccl.so; NCCL ships as libnccl.so.2 (the system's, or PyTorch's wheel).
nccl_dir="$work/nccl-lib"
if [[ ! -e "$nccl_dir/libnccl.so" ]]; then
	mkdir -p "$nccl_dir"
	nccl=$(ldconfig -p | awk '/libnccl\.so\.2 /{print $NF; exit}')
	[[ -n "$nccl" ]] || nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
	[[ -n "$nccl" ]] && ln -sf "$nccl" "$nccl_dir/libnccl.so"
fi
export LD_LIBRARY_PATH="$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ILM_WORKER_BIN="$PWD/$bundle/infinite-llm-worker"
if [[ ! -x "$bundle/gpu_kernels" ]]; then
	echo "no GPU bundle in $bundle: run tests/gpu/bundle.sh (make gpu-bundle) on a machine with cargo first" >&2
	exit 2
fi
case "${1:-test}" in
test)
	"$bundle/gpu_kernels" --nocapture --test-threads=1
	[[ -f "$work/parity/reference.json" ]] || python3 tests/gpu/hf_reference.py "$work/parity"
	ILM_HF_REFERENCE="$work/parity" "$bundle/gpu_parity" --nocapture
	"$bundle/gpu_links" --nocapture
	"$bundle/gpu_pool" --nocapture
	;;
pool)
	"$bundle/gpu_links" --nocapture
	"$bundle/gpu_pool" --nocapture
	;;
bench)
	[[ "${2:-}" == kernels || -f "$work/llama8b/config.json" ]] || python3 tests/gpu/llama8b_random.py "$work/llama8b"
	python3 tests/gpu/bench_peers.py "$work/llama8b" "$work/peers.json" ${2:+--$2-only} >"$work/peers.log"
	ILM_PEER_FIGURES="$work/peers.json" ILM_BENCH_MODEL="$work/llama8b" "$bundle/gpu_bench"
	;;
profile)
	[[ -f "$work/llama8b/config.json" ]] || python3 tests/gpu/llama8b_random.py "$work/llama8b"
	# The prompt's step and the first decode steps are left out; of the next 2,000 kernels (a
	# batch-1 step of the 8B model launches about 550), the whole steps are counted.
	ILM_BENCH_PROFILE=1 ILM_PEER_FIGURES=- ILM_BENCH_MODEL="$work/llama8b" \
		ncu --clock-control none --launch-skip 6000 --launch-count 2000 \
		--metrics gpu__time_duration.sum --csv --log-file "$work/ncu.csv" "$bundle/gpu_bench"
	python3 tests/gpu/kernel_times.py "$work/ncu.csv"
	;;
dist)
	[[ -f "$work/demo/config.json" ]] || "$bundle/infinite-llm-worker" demo-model --out "$work/demo"
	[[ -f "$work/llama8b-served/config.json" ]] ||
		python3 tests/gpu/llama8b_random.py "$work/llama8b-served" "$work/demo"
	python3 tests/gpu/bench_dist.py "$bundle/infinite-llm-worker" "$work/llama8b-served" \
		"$bundle/infinite-llm-loadgen" "${@:2}"
	;;
*)
	echo "usage: $0 test|pool|bench|profile|dist" >&2
	exit 2
	;;
esac
