#!/usr/bin/env bash
# Runs the openai client tests against local mode: starts the pool on a free port in the
# background, waits until it is ready, runs pytest, and always stops the pool. Run it through
# `make test-python`, which builds the release binaries and the venv it needs.
set -euo pipefail
cd "$(dirname "$0")/../.."

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log="$(mktemp -t ilm-local.XXXXXX.log)"
target/release/infinite-llm-worker local --workers "${WORKERS:-2}" --port "$port" >"$log" 2>&1 &
pool=$!

stop_pool() {
	kill -TERM "$pool" 2>/dev/null || true
	wait "$pool" 2>/dev/null || true
}
trap stop_pool EXIT

ready_url="http://127.0.0.1:$port/ready"
python3 - "$ready_url" "$pool" "$log" <<'PY'
import os, sys, time, urllib.request

url, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.time() + 300
while time.time() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"local mode exited before it was ready; its log:\n{open(log).read()}")
    time.sleep(0.5)
sys.exit(f"local mode not ready after 300 s; its log:\n{open(log).read()}")
PY

echo "local mode ready on port $port (log: $log)"
ILM_BASE_URL="http://127.0.0.1:$port/v1" python3 -m pytest -q tests/python
