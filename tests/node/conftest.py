"""Harness of the node tests: the operator and its workers as Pods on a real one-node
Kubernetes, driven with kubectl, helm and the official `openai` client as a user would.

The cluster is started by `tests/node/cluster.sh up` (`make cluster`; `make test-node` starts
it, runs these tests and stops it even when they fail). Its kubeconfig is at a stable path,
`<repo>/.cluster/kubeconfig` (ILM_CLUSTER_DIR moves it). Fixtures, all session-scoped so
that other test modules in this folder reuse one installation:

- `kube`: kubectl (and helm) against that cluster, with JSON and wait helpers.
- `operator`: the chart installed with helm into `infinite-llm-system` (two replicas).
- `workers_ns`: a namespace that enforces the `restricted` Pod Security Standard.
- `demo`: `examples/cpu-small.yaml` applied as written in `workers_ns`, Ready; gives its
  Service's OpenAI base URL and helpers for its worker Pods.
- `reference`: one big worker on this machine serving the same demo model, whose greedy
  answers the pool must reproduce.
- `Load`: a background stream of short requests that records every failure.

The host reaches ClusterIPs and Pod IPs directly (kube-proxy's rules and the CNI bridge are
on this machine), so no port-forward is involved.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("ILM_CLUSTER_DIR", REPO / ".cluster"))
KUBECONFIG = STATE / "kubeconfig"
BIN = REPO / "bin"
WORKER_BIN = REPO / "target" / "release" / "infinite-llm-worker"
OPERATOR_NS = "infinite-llm-system"
RELEASE = "infinite-llm"
OPERATOR = f"{RELEASE}-operator"
WORKERS_NS = "llm"
DEMO = "tiny-llama"


def tool_path(name):
    """bin/<name> as `make tools` builds it, else the machine's own (it skips kubectl when the
    machine has one)."""
    built = BIN / name
    return str(built) if built.exists() else (shutil.which(name) or str(built))


class Kube:
    """kubectl and helm bound to the test cluster."""

    def __init__(self, kubeconfig: Path):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def run(self, *args, check=True, input=None, timeout=300, tool="kubectl"):
        out = subprocess.run(
            [tool_path(tool), *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
        return out

    def kubectl(self, *args, **kw) -> str:
        return self.run(*args, **kw).stdout

    def helm(self, *args, **kw) -> str:
        return self.run(*args, tool="helm", **kw).stdout

    def get(self, kind, name=None, ns=None, selector=None):
        args = ["get", kind] + ([name] if name else []) + ["-o", "json"]
        if ns:
            args += ["-n", ns]
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args))

    def get_opt(self, kind, name, ns=None):
        out = self.run("get", kind, name, "-n", ns or "default", "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def apply(self, manifest: str, ns=None):
        args = ["apply", "-f", "-"] + (["-n", ns] if ns else [])
        return self.kubectl(*args, input=manifest)

    def pods(self, ns, selector):
        return self.get("pods", ns=ns, selector=selector)["items"]

    def warnings(self, ns, name):
        """Notes of the Warning Events about one object."""
        events = self.get("events", ns=ns)["items"]
        return [
            e.get("message") or e.get("note") or ""
            for e in events
            if e.get("type") == "Warning" and e["involvedObject"]["name"] == name
        ]


def wait_until(what, timeout, check, interval=1.0):
    """Polls `check` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (AssertionError, KeyError, IndexError, TypeError, OSError) as err:
            last = err
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout}s (last: {last!r})")


def metric(ip, name, port=8000):
    """A worker's metric, summed over its label sets (0 when absent)."""
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            if series.partition("{")[0] == name:
                total += float(value)
    return total


def openai_client(base_url, retries=0):
    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=retries, timeout=600)


@pytest.fixture(scope="session")
def kube():
    if not KUBECONFIG.exists():
        pytest.fail(f"no cluster at {STATE}: run `make cluster` (or `make test-node`) first")
    k = Kube(KUBECONFIG)
    k.kubectl("get", "--raw", "/readyz")
    return k


@pytest.fixture(scope="session")
def operator(kube):
    """The chart, installed as its README says, with its defaults (two replicas)."""
    kube.helm(
        "upgrade", "--install", RELEASE, str(REPO / "charts" / "infinite-llm"),
        "-n", OPERATOR_NS, "--create-namespace", "--wait", "--timeout", "5m",
        timeout=400,
    )
    return OPERATOR


@pytest.fixture(scope="session")
def workers_ns(kube):
    kube.apply(
        f"""
apiVersion: v1
kind: Namespace
metadata:
  name: {WORKERS_NS}
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
"""
    )
    return WORKERS_NS


class Demo:
    """The CPU example's cluster: its Service and worker Pods."""

    def __init__(self, kube, ns):
        self.kube, self.ns, self.name = kube, ns, DEMO

    @property
    def base_url(self):
        svc = self.kube.get("service", self.name, self.ns)
        return f"http://{svc['spec']['clusterIP']}:8000/v1"

    def ilc(self):
        return self.kube.get("ilc", self.name, self.ns)

    def pods(self):
        return self.kube.pods(self.ns, f"infinitellm.io/cluster={self.name}")

    def pod_ip(self, name):
        return self.kube.get("pod", name, self.ns)["status"]["podIP"]

    def ready_pods(self):
        return sorted(
            p["metadata"]["name"]
            for p in self.pods()
            if p.get("metadata", {}).get("deletionTimestamp") is None
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", [])
            )
        )

    def wait_ready(self, replicas, timeout=300):
        """Phase Ready with `replicas` workers, all of them in the pool status."""

        def ready():
            status = self.ilc().get("status", {})
            return (
                status.get("phase") == "Ready"
                and status.get("readyReplicas") == replicas
                and status.get("replicas") == replicas
                and status.get("pool", {}).get("workers") == replicas
                and len(self.ready_pods()) == replicas
                and status
            )

        return wait_until(f"{self.name} Ready with {replicas} workers in its pool", timeout, ready, 2)

    def scale(self, replicas):
        self.kube.kubectl("scale", "ilc", self.name, "-n", self.ns, f"--replicas={replicas}")


@pytest.fixture(scope="session")
def demo(kube, operator, workers_ns):
    kube.kubectl("apply", "-n", workers_ns, "-f", str(REPO / "examples" / "cpu-small.yaml"))
    d = Demo(kube, workers_ns)
    d.wait_ready(3)
    return d


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One worker whose own pool holds any request of these tests: the answer to match."""
    port = free_port()
    model = tmp_path_factory.mktemp("reference") / "demo"
    proc = subprocess.Popen(
        [str(WORKER_BIN), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--model", str(model), "--write-demo-model", "--served-model-name", DEMO,
         "--kv-blocks", "1024", "--peer-port", str(free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready():
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
            return r.status == 200

    try:
        wait_until("the reference worker ready", 120, ready)
        yield openai_client(f"{url}/v1")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


PROMPT_SENTENCE = (
    "The pooled cache lets each worker lend idle blocks to a busy neighbour, "
    "so that one long conversation never waits for a bigger machine. "
)


def prompt_of(tokens_wanted, reference):
    """A prompt of at least `tokens_wanted` tokens of the demo tokenizer (counted by the
    reference worker), so that the request's size relative to a worker's pool is known.
    Returns it and its exact token count."""
    def count(text):
        return reference.completions.create(model=DEMO, prompt=text, max_tokens=1).usage.prompt_tokens

    # What one more sentence adds, apart from what every prompt carries (BOS).
    one = count(PROMPT_SENTENCE)
    per = count(PROMPT_SENTENCE * 2) - one
    text = PROMPT_SENTENCE * (1 + max(0, -(-(tokens_wanted - one) // per)))
    tokens = count(text)
    assert tokens >= tokens_wanted, (tokens, tokens_wanted)
    return text, tokens


class Load:
    """Short greedy completions from `threads` threads until stopped, each on a new
    connection (as many separate clients would), so that a Pod that leaves the Service
    stops getting new ones. Every failure is kept."""

    def __init__(self, base_url, threads=3, max_tokens=12):
        self.base_url, self.threads, self.max_tokens = base_url, threads, max_tokens
        self.ok = 0
        self.failures = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.workers = []

    def _run(self, n):
        while not self.stop.is_set():
            client = openai_client(self.base_url)
            try:
                out = client.completions.create(
                    model=DEMO, prompt=f"Request {n}: the pool", max_tokens=self.max_tokens,
                    temperature=0,
                )
                assert out.choices[0].finish_reason in ("stop", "length")
                with self.lock:
                    self.ok += 1
            except Exception as err:  # every kind of failure counts
                with self.lock:
                    self.failures.append(f"{type(err).__name__}: {err}")
            finally:
                client.close()

    def __enter__(self):
        self.workers = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(self.threads)]
        for w in self.workers:
            w.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for w in self.workers:
            w.join(timeout=600)

    def wait_for_requests(self, count, timeout=120):
        start = self.ok
        wait_until(f"{count} more requests answered", timeout,
                   lambda: self.ok - start >= count, 0.2)


def sum_metric(ips, name):
    return sum(metric(ip, name) for ip in ips)


def pod_log_follower(kube, ns, pod):
    """`kubectl logs -f` of a Pod into a list, for a Pod that is about to go away."""
    lines = []
    proc = subprocess.Popen(
        [tool_path("kubectl"), "logs", "-f", "-n", ns, pod],
        env=kube.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def worker_pid(pod):
    """The host PID of a worker Pod's process: this machine is the node."""
    wanted = f"ILM_WORKER_ID={pod}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "exe").endswith("/infinite-llm-worker") and \
                    wanted in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no worker process of {pod} on this node")
