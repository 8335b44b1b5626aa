"""Autoscaling on the real node: the CPU autoscaling example under load that holds its pool
above the target grows from one worker (the HPA the operator owns reads the pool's use from
the operator's external metrics API), the new worker joins the pool and takes blocks, and when
the load stops the cluster shrinks back to one, the leaving worker draining; no request fails.

Runs before test_node.py (file order) and deletes its cluster at the end, so that the CPU
example of the other tests has the node's CPUs to itself.
"""

import json
import threading
import time
import urllib.parse

from conftest import REPO, metric, openai_client, wait_until

NAME = "tiny-llama-autoscaling"
SERVED = "tiny-llama"
# The example's pool: 64 blocks of 16 tokens per worker.
WORKER_POOL_TOKENS = 64 * 16


def raw_metric(kube, ns, metric_name):
    selector = urllib.parse.quote(f"infinitellm.io/cluster={NAME}", safe="")
    path = f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric_name}?labelSelector={selector}"
    items = json.loads(kube.kubectl("get", "--raw", path))["items"]
    assert len(items) == 1, items
    value = items[0]["value"]
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


class LongLoad:
    """Long greedy completions from `threads` threads until stopped, each request holding a
    good share of one worker's pool while it decodes; every failure is kept."""

    def __init__(self, base_url, threads, prompt_words, max_tokens):
        self.base_url, self.threads = base_url, threads
        self.prompt = " ".join(f"pool{n % 50}" for n in range(prompt_words))
        self.max_tokens = max_tokens
        self.ok, self.failures = 0, []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.workers = []

    def _run(self, n):
        while not self.stop.is_set():
            client = openai_client(self.base_url)
            try:
                out = client.completions.create(
                    model=SERVED, prompt=f"{n} {self.prompt}", max_tokens=self.max_tokens,
                    temperature=0, extra_body={"ignore_eos": True},
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


def ready_workers(kube, ns):
    pods = kube.pods(ns, f"infinitellm.io/cluster={NAME}")
    return sorted(
        p["metadata"]["name"]
        for p in pods
        if p["metadata"].get("deletionTimestamp") is None
        and any(c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", []))
    )


def test_load_scales_the_cluster_up_and_back_down(kube, operator, workers_ns):
    ns = workers_ns
    kube.kubectl("apply", "-n", ns, "-f", str(REPO / "examples" / "cpu-autoscaling.yaml"))
    # The example waits a minute before a scale-in; the test need not.
    kube.kubectl("patch", "ilc", NAME, "-n", ns, "--type=merge", "-p",
                 json.dumps({"spec": {"autoscaling": {"scaleDownStabilizationSeconds": 15}}}))
    try:
        wait_until("the APIService is Available", 120, lambda: any(
            c["type"] == "Available" and c["status"] == "True"
            for c in kube.get("apiservice", "v1beta1.external.metrics.k8s.io")["status"].get("conditions", [])))
        wait_until("one worker Ready in the pool", 300, lambda: (
            ready_workers(kube, ns) == [f"{NAME}-0"]
            and kube.get("ilc", NAME, ns).get("status", {}).get("pool", {}).get("workers") == 1))
        hpa = wait_until("the operator's HPA", 60, lambda: kube.get_opt("hpa", NAME, ns))
        assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 3
        idle = wait_until("the pool use is served", 60,
                          lambda: [raw_metric(kube, ns, "ilm_pool_used_percent")])[0]
        assert idle < 60, f"the idle pool is {idle}% used"

        svc = kube.get("service", NAME, ns)
        base_url = f"http://{svc['spec']['clusterIP']}:8000/v1"
        # Four requests of a few hundred prompt and 200 generated tokens at once: well over
        # the 60% target of one worker's 1,024 tokens, and room for all of them on three.
        with LongLoad(base_url, threads=4, prompt_words=150, max_tokens=200) as load:
            started = time.monotonic()
            wait_until("the load shows in the served figure", 120,
                       lambda: raw_metric(kube, ns, "ilm_pool_used_percent") > 60, 1)
            wait_until("the HPA scales the cluster up", 180, lambda: (
                kube.get("ilc", NAME, ns)["spec"]["workers"]["replicas"] > 1))
            columns = kube.kubectl("get", "ilc", NAME, "-n", ns).splitlines()
            assert int(columns[1].split()[3]) > 1, columns
            wait_until("a second worker Ready in the pool", 300, lambda: (
                len(ready_workers(kube, ns)) >= 2
                and kube.get("ilc", NAME, ns)["status"]["pool"]["workers"] >= 2))
            up = time.monotonic() - started
            new_ip = kube.get("pod", f"{NAME}-1", ns)["status"]["podIP"]
            wait_until("the new worker holds blocks (its own requests or lent)", 180, lambda: (
                metric(new_ip, "ilm_request_success_total") > 0
                or metric(new_ip, "ilm_kv_blocks_lent") > 0))
            events = kube.get("events", ns=ns)["items"]
            assert any(e.get("reason") == "Autoscaled" for e in events), "no Autoscaled event"
        stopped = time.monotonic()
        assert load.ok > 0
        wait_until("the cluster returns to one worker", 600, lambda: (
            kube.get("ilc", NAME, ns)["spec"]["workers"]["replicas"] == 1
            and ready_workers(kube, ns) == [f"{NAME}-0"]
            and kube.get_opt("pod", f"{NAME}-1", ns) is None), 2)
        down = time.monotonic() - stopped
        assert not load.failures, load.failures[:5]
        conditions = {c["type"]: c for c in kube.get("ilc", NAME, ns)["status"]["conditions"]}
        assert conditions["AutoscalerScalingActive"]["status"] == "True", conditions
        print(f"autoscale: load to a second Ready worker {up:.0f} s; "
              f"load stopped to back at one worker {down:.0f} s; {load.ok} requests, 0 failed")
    finally:
        kube.kubectl("delete", "ilc", NAME, "-n", ns, "--wait=false", check=False)
        wait_until("the example's workers gone", 300,
                   lambda: not kube.pods(ns, f"infinitellm.io/cluster={NAME}"), 2)
