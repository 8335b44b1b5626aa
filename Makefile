# Infinite-LLM: build, run locally, test. `make help` lists the targets.

CARGO   ?= cargo
WORKERS ?= 3
PORT    ?= 8000
# Per-worker KV pool cap in rBlocks, and a Hugging Face model folder; both optional.
KV_BLOCKS ?=
MODEL     ?=
# Share of each worker's pool others may borrow, and the gManager's port.
LEND_FRACTION ?= 0.5
GMANAGER_PORT ?= 8001
PYTHON  ?= python3
VENV    := .venv

WORKER_BIN := target/release/infinite-llm-worker

.PHONY: help build build-tests run test test-phases lint lint-docker unit test-python test-node bench bench-pool venv tools node-tools cluster cluster-down crds simulate gpu-bundle test-gpu bench-gpu bench-dist

help:
	@echo "make run        local pool: gManager + WORKERS=$(WORKERS) workers behind http://127.0.0.1:$(PORT) (MODEL=, KV_BLOCKS=, LEND_FRACTION=)"
	@echo "make test       every check: fmt, clippy, Rust tests, the openai client against make run, the node tests"
	@echo "make cluster    a one-node Kubernetes on this machine (root), with the operator and worker images; prints its KUBECONFIG"
	@echo "make cluster-down  stop it and restore the host"
	@echo "make bench      CPU decode tokens/s against candle-transformers"
	@echo "make bench-pool local mode pooled vs static (lend 0) on the demo model: one trace replayed by infinite-llm-loadgen"
	@echo "make gpu-bundle build the GPU tests and benches here, into target/gpu-bundle, for a GPU machine"
	@echo "make test-gpu   on a GPU machine: CUDA kernels against float64, the model against transformers"
	@echo "make bench-gpu  on a GPU machine: attention, decode, prefill against PyTorch, transformers, roofline"
	@echo "make bench-dist on a machine with 2+ GPUs: NCCL DistAttention overhead, capacity, pooled vs static"
	@echo "make simulate   static vs pooled clusters of 4 to 1024 simulated instances, same traces and cost model"
	@echo "make tools      build etcd, kube-apiserver, kube-controller-manager and helm from their Go modules into bin/"
	@echo "make crds       regenerate crds/ and the chart's CRD template from the Rust types"

build:
	$(CARGO) build --release --workspace --bins

# The binaries with the test targets' features (dev-dependencies unify some): after `unit`
# this reuses its build instead of compiling the workspace a second time.
build-tests:
	$(CARGO) build --release --workspace --bins --tests

run: build
	$(WORKER_BIN) local --workers $(WORKERS) --port $(PORT) \
		--lend-fraction $(LEND_FRACTION) --gmanager-port $(GMANAGER_PORT) \
		$(if $(KV_BLOCKS),--kv-blocks $(KV_BLOCKS)) $(if $(MODEL),--model $(MODEL))

# `.ci/run` runs these one by one and times each.
TEST_PHASES := lint lint-docker unit test-python test-node

test: $(TEST_PHASES)

test-phases:
	@echo $(TEST_PHASES)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# hadolint (a PyPI wheel, in the test venv) with no rule ignored.
lint-docker: venv
	$(VENV)/bin/hadolint Dockerfile

# The operator tests run against a real control plane built by `make tools`.
unit: tools
	$(CARGO) test --release --workspace

tools:
	bash tests/tools/build.sh
	bash tests/tools/build_helm.sh

# kubelet, kube-scheduler, kube-proxy, CoreDNS and the Pod sandbox, for the one-node cluster.
node-tools: tools
	bash tests/node/build.sh

cluster: build node-tools
	bash tests/node/cluster.sh up

cluster-down:
	bash tests/node/cluster.sh down

# The operator and workers as Pods on that cluster, started and stopped around the tests.
test-node: build-tests node-tools venv
	PYTHON=$(CURDIR)/$(VENV)/bin/python bash tests/node/run.sh

# The CRD twice from one source: crds/ for kubectl, and the chart's template.
crds:
	$(CARGO) run --release -q -p infinite-llm-operator -- crd > crds/infinitellmclusters.infinitellm.io.yaml
	$(CARGO) run --release -q -p infinite-llm-operator -- crd --chart > charts/infinite-llm/templates/crd.yaml

$(VENV)/.installed: tests/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r tests/python/requirements.txt
	touch $@

venv: $(VENV)/.installed

test-python: build-tests venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tests/python/run_against_local.sh

bench:
	$(CARGO) bench -p infinite-llm-worker --bench decode --bench dist_decode

# Real processes: the same trace against local mode pooled and static (WORKERS=, KV_BLOCKS=).
bench-pool:
	WORKERS=$(WORKERS) KV_BLOCKS=$(or $(KV_BLOCKS),64) bash tests/bench/pool.sh

# Pure logic, no servers: the gManager's placement code over a simulated cluster.
simulate:
	$(CARGO) run --release -q -p infinite-llm-operator -- simulate

# The GPU machine has no Rust toolchain: build the bundle where cargo is, carry target/gpu-bundle
# there with the tree, and run the two targets below there (they call no cargo).
gpu-bundle:
	bash tests/gpu/bundle.sh

test-gpu:
	bash tests/gpu/run.sh test

bench-gpu:
	bash tests/gpu/run.sh bench

bench-dist:
	bash tests/gpu/run.sh dist
