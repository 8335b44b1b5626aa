"""What a platform team does first, on a real node: install the operator with helm, apply the
CPU example, send OpenAI requests through the cluster's Service, scale, lose Pods. The tests
run in file order and share one installation (see conftest.py); each leaves the example
cluster Ready for the next.
"""

import os
import re
import signal
import uuid

import pytest

from conftest import (
    ANSI,
    DEMO,
    OPERATOR,
    OPERATOR_NS,
    REPO,
    Load,
    metric,
    openai_client,
    pod_log_follower,
    prompt_of,
    sum_metric,
    wait_until,
    worker_pid,
)

# The example's pool: 64 blocks of 16 tokens per worker.
WORKER_POOL_TOKENS = 64 * 16


def leader_of(kube):
    lease = kube.get("lease", OPERATOR, OPERATOR_NS)
    return lease["spec"].get("holderIdentity")


def gmanager_endpoints(kube):
    slices = kube.get(
        "endpointslices", ns=OPERATOR_NS,
        selector=f"kubernetes.io/service-name={OPERATOR}-gmanager",
    )["items"]
    return sorted(
        ep["targetRef"]["name"]
        for s in slices
        for ep in s.get("endpoints") or []
        if ep.get("conditions", {}).get("ready")
    )


def test_helm_install_runs_two_operator_replicas_and_one_leader(kube, operator):
    deploy = kube.get("deployment", OPERATOR, OPERATOR_NS)
    assert deploy["status"].get("readyReplicas") == 2
    pods = [p["metadata"]["name"] for p in kube.pods(OPERATOR_NS, "app.kubernetes.io/name=infinite-llm-operator")]
    assert len(pods) == 2
    leader = wait_until("a leader", 60, lambda: leader_of(kube))
    assert leader in pods
    # Workers reach the gManager through this Service: it must lead to the leader alone.
    assert wait_until("the gManager Service on the leader only", 60,
                      lambda: gmanager_endpoints(kube) == [leader] and [leader])
    for pod in pods:
        log = kube.kubectl("logs", "-n", OPERATOR_NS, pod)
        assert not ANSI.search(log), f"colour codes in the logs of {pod}"


def test_cpu_example_becomes_ready_and_shows_its_pool(kube, demo):
    status = demo.ilc()["status"]
    assert status["phase"] == "Ready"
    pool = status["pool"]
    assert pool["workers"] == 3
    assert pool["totalBlocks"] == 3 * 64
    table = kube.kubectl("get", "ilc", "-n", demo.ns)
    header, row = table.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "PHASE", "READY", "REPLICAS", "POOL"]
    assert row.split()[:4] == [DEMO, "Ready", "3", "3"]
    assert row.split()[4].isdigit(), row
    for pod in demo.ready_pods():
        assert not ANSI.search(kube.kubectl("logs", "-n", demo.ns, pod))


def test_openai_client_through_the_service(demo):
    client = openai_client(demo.base_url)
    assert [m.id for m in client.models.list().data] == [DEMO]
    done = client.completions.create(model=DEMO, prompt="The pool", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length")
    assert 0 < done.usage.completion_tokens <= 8
    chat = client.chat.completions.create(
        model=DEMO, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=DEMO, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0, stream=True,
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content


def test_a_request_larger_than_one_worker_borrows_and_matches_one_big_worker(demo, reference):
    prompt, tokens = prompt_of(WORKER_POOL_TOKENS + 150, reference)
    assert WORKER_POOL_TOKENS < tokens < 2 * WORKER_POOL_TOKENS - 64, tokens
    ips = [demo.pod_ip(p) for p in demo.ready_pods()]
    borrowed = sum_metric(ips, "ilm_kv_borrow_total")
    kwargs = dict(model=DEMO, prompt=prompt, max_tokens=32, temperature=0)
    pooled = openai_client(demo.base_url).completions.create(**kwargs)
    alone = reference.completions.create(**kwargs)
    assert pooled.usage.prompt_tokens == tokens
    assert pooled.choices[0].text == alone.choices[0].text
    assert sum_metric(ips, "ilm_kv_borrow_total") > borrowed, "no worker borrowed a block"


def test_a_creditor_force_deleted_mid_request_changes_no_token(kube, demo, reference):
    pods = demo.ready_pods()
    home, others = pods[0], pods[1:]
    home_ip = demo.pod_ip(home)
    ips = {p: demo.pod_ip(p) for p in others}
    # More than the home's pool, so that part of its prompt must live on the others before
    # its first token; with its output it still fits the pool left after one creditor goes.
    prompt, tokens = prompt_of(WORKER_POOL_TOKENS + 80, reference)
    assert tokens + 150 < WORKER_POOL_TOKENS * 3 // 2, tokens
    # The demo model may end this prompt after three tokens: `min_tokens` keeps the request
    # decoding long after its first token, or it could end (and release its loans) before the
    # home is frozen below.
    kwargs = dict(model=DEMO, prompt=prompt, max_tokens=150, temperature=0,
                  extra_body={"min_tokens": 150})
    expected = reference.completions.create(**kwargs).choices[0].text
    recomputed = metric(home_ip, "ilm_kv_recomputed_blocks_total")
    losses = metric(home_ip, "ilm_peer_losses_total")
    # Looked up before the request: a scan of /proc can take longer than its whole decode.
    home_pid = worker_pid(home)
    pids = {p: worker_pid(p) for p in others}
    # Straight to one worker, so that which Pods are its creditors is known.
    stream = openai_client(f"http://{home_ip}:8000/v1").completions.create(stream=True, **kwargs)
    text = [next(stream).choices[0].text]
    # The demo model decodes 150 tokens faster than the metrics below are read and kubectl
    # deletes a Pod: the home is frozen after its first token, so that the request is surely
    # still running when its creditor goes, and the creditor is frozen so that it answers
    # nothing more before it is gone.
    os.kill(home_pid, signal.SIGSTOP)
    try:
        creditors = [p for p in others if metric(ips[p], "ilm_kv_blocks_lent") > 0]
        assert creditors, "the request borrowed from no other worker"
        os.kill(pids[creditors[0]], signal.SIGSTOP)
    finally:
        os.kill(home_pid, signal.SIGCONT)
    kube.kubectl("delete", "pod", creditors[0], "-n", demo.ns, "--grace-period=0", "--force")
    text += [c.choices[0].text for c in stream]
    assert "".join(text) == expected
    assert (metric(home_ip, "ilm_kv_recomputed_blocks_total") > recomputed
            or metric(home_ip, "ilm_peer_losses_total") > losses), "the creditor was not lost mid-request"
    demo.wait_ready(3)


def test_scale_out_under_load_the_new_worker_joins_and_gets_blocks(kube, demo):
    with Load(demo.base_url) as load:
        load.wait_for_requests(5)
        demo.scale(4)
        demo.wait_ready(4)
        new_ip = demo.pod_ip(f"{DEMO}-3")
        wait_until(
            "the new worker serving requests of the Service", 120,
            lambda: metric(new_ip, "ilm_request_success_total") > 0,
        )
        load.wait_for_requests(5)
    assert not load.failures, load.failures[:5]
    events = " ".join(kube.warnings(demo.ns, DEMO))
    assert "WorkersFailing" not in events


def test_scale_in_under_load_drains_the_leaving_workers_and_fails_no_request(kube, demo):
    leaving = [f"{DEMO}-2", f"{DEMO}-3"]
    followers = [pod_log_follower(kube, demo.ns, p) for p in leaving]
    try:
        with Load(demo.base_url) as load:
            load.wait_for_requests(5)
            demo.scale(2)
            wait_until("the leaving Pods gone", 240,
                       lambda: not set(leaving) & {p["metadata"]["name"] for p in demo.pods()})
            load.wait_for_requests(5)
        demo.wait_ready(2)
    finally:
        for proc, _ in followers:
            proc.terminate()
    assert load.ok > 10
    assert not load.failures, load.failures[:5]
    for pod, (_, lines) in zip(leaving, followers):
        log = "\n".join(lines)
        assert "drain requested" in log and "drained" in log, f"{pod} did not drain:\n{log[-2000:]}"


def test_leader_operator_deleted_the_standby_takes_over_and_serving_never_stops(kube, demo):
    old = leader_of(kube)
    epoch = demo.ilc()["status"]["membershipEpoch"]
    with Load(demo.base_url) as load:
        load.wait_for_requests(5)
        kube.kubectl("delete", "pod", old, "-n", OPERATOR_NS, "--wait=false")
        new = wait_until("a new leader", 120, lambda: (lambda h: h != old and h)(leader_of(kube)))
        wait_until("the gManager Service on the new leader", 60,
                   lambda: gmanager_endpoints(kube) == [new])
        # Status keeps following the cluster under the new leader.
        demo.scale(3)
        status = demo.wait_ready(3)
        load.wait_for_requests(5)
    assert not load.failures, load.failures[:5]
    assert status["membershipEpoch"] >= epoch, "the membership epoch went back"
    # The workers registered with the new leader (it reports their pool).
    assert status["pool"]["workers"] == 3
    kube.kubectl("rollout", "status", f"deployment/{OPERATOR}", "-n", OPERATOR_NS, "--timeout=120s")


# ---- why workers do not come up: status and Events say it -------------------------------


def broken_cluster(kube, ns, name, source, cpu="50m"):
    kube.apply(
        f"""
apiVersion: infinitellm.io/v1alpha1
kind: InfiniteLLMCluster
metadata:
  name: {name}
spec:
  model:
    servedName: {name}
    source: {source}
  workers:
    replicas: 1
    gpusPerWorker: 0
    image: ghcr.io/infinite-llm/worker:0.1.0
    resources: {{requests: {{cpu: "{cpu}", memory: 64Mi}}}}
    terminationGracePeriodSeconds: 30
""",
        ns,
    )


def degraded_message(kube, ns, name):
    ilc = kube.get("ilc", name, ns)
    status = ilc.get("status", {})
    if status.get("phase") != "Degraded":
        return None
    cond = next(c for c in status["conditions"] if c["type"] == "Degraded")
    return cond["status"] == "True" and cond["message"]


@pytest.fixture(scope="module")
def open_ns(kube, operator):
    ns = f"why-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", ns)
    yield ns
    kube.kubectl("delete", "namespace", ns, "--wait=false")


def test_status_says_why_workers_are_not_coming_up(kube, open_ns, workers_ns, demo):
    model_dir = REPO / ".cluster" / "empty-model"
    model_dir.mkdir(exist_ok=True)
    cases = {
        # The scheduler's reason, from the Pod's PodScheduled condition.
        "too-big": ("{demo: {}}", "64", "Insufficient cpu"),
        # The kubelet's FailedMount Event.
        "no-folder": ("{hostPath: {path: /nonexistent/model}}", "50m", "FailedMount"),
        # The worker's own last words: the model does not load.
        "no-model": (f"{{hostPath: {{path: {model_dir}}}}}", "50m", "tokenizer"),
    }
    for name, (source, cpu, _) in cases.items():
        broken_cluster(kube, open_ns, name, source, cpu)
    # Admission refuses the Pod (hostPath is not allowed by `restricted`): the StatefulSet's
    # FailedCreate Event is all there is.
    broken_cluster(kube, workers_ns, "host-path", "{hostPath: {path: /srv}}")
    cases["host-path"] = (None, None, "PodSecurity")
    for name, (_, _, expected) in cases.items():
        ns = workers_ns if name == "host-path" else open_ns
        message = wait_until(f"{name} Degraded", 180, lambda: degraded_message(kube, ns, name), 2)
        assert expected in message, f"{name}: {message}"
        notes = wait_until(f"{name}: a WorkersFailing Event", 60, lambda: [
            e for e in kube.get("events", ns=ns)["items"]
            if e.get("reason") == "WorkersFailing" and e["involvedObject"]["name"] == name
        ])
        assert expected in (notes[-1].get("message") or notes[-1].get("note") or "")
    kube.kubectl("delete", "ilc", "host-path", "-n", workers_ns)


def test_the_restricted_namespace_admits_the_workers_and_refuses_others(kube, workers_ns, demo):
    labels = kube.get("namespace", workers_ns)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # The policy is enforced there: a Pod without the restricted settings is refused...
    refused = kube.run("run", "plain", "-n", workers_ns, "--image=ghcr.io/infinite-llm/worker:0.1.0",
                       "--restart=Never", "--command", "--", "true", check=False)
    assert refused.returncode != 0 and "restricted" in refused.stderr, refused.stderr
    # ...and the example's workers run there, with no service-account token.
    pods = demo.pods()
    assert len(pods) == 3
    for pod in pods:
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert not any(m["mountPath"].startswith("/var/run/secrets/kubernetes.io")
                       for m in pod["spec"]["containers"][0].get("volumeMounts", []))


def test_every_worker_setting_reaches_a_flag_the_worker_reads(kube, demo):
    pod = demo.pods()[0]
    env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    help_text = kube.kubectl("exec", "-n", demo.ns, pod["metadata"]["name"], "--",
                             "infinite-llm-worker", "serve", "--help")
    read = set(re.findall(r"\[env: (ILM_[A-Z_]+)", help_text))
    assert env - read == set(), f"set on the worker and read by nothing: {env - read}"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    worker_grace = next(e["value"] for e in pod["spec"]["containers"][0]["env"]
                        if e["name"] == "ILM_GRACE_PERIOD_SECS")
    assert 0 < int(worker_grace) < grace
