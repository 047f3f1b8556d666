"""Two `continuity run` processes against one (fake) Kubernetes API: leadership on a Lease, state as
continuity.dev objects, a leader killed mid-failover, a clean handover, an API outage, and config
reloads. The controllers are real subprocesses (`python -m controller.cli run`) using the real
kubernetes client through a kubeconfig; the fake API server, the HTTP target, moto and the
recording AWS proxy run in the test process. Every wait is bounded; every process is killed in a
`finally`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from controller.stores import Run
from controller.stores.kube import KubernetesStore
from tests.conftest import World
from tests.fakes.awsproxy import AwsProxy, Recorded
from tests.fakes.kubeapi import FakeKubeAPI

ROOT = Path(__file__).resolve().parent.parent
NS = "continuity"
LEASE = "continuity-leader"
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 3.0, 2.0, 0.5
SWITCHED = "127.0.0.3"


# ---------------------------------------------------------------- the world around the processes


class Target:
    """A threaded HTTP target: GET /<name> answers the status the test sets (200 by default)."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code = target.status.get(self.path.strip("/"), 200)
                body = json.dumps({"ok": code == 200}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # probes that hang up early are not the test's business

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(every)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: "{server}", insecure-skip-tls-verify: true}}
users:
- name: tester
  user: {{token: dummy-token}}
contexts:
- name: fake
  context: {{cluster: fake, user: tester, namespace: {NS}}}
current-context: fake
""",
        encoding="utf-8",
    )
    return path


class Proc:
    """One `continuity run` subprocess, its port and its log."""

    def __init__(self, name: str, cfg: Path, env: dict[str, str], tmp: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "controller.cli", "run", "-c", str(cfg)]
        cmd += ["--listen", f"127.0.0.1:{self.port}", "--log-format", "json"]
        with open(self.log, "wb") as log:
            self.p = subprocess.Popen(
                cmd, env={**env, "POD_NAME": name}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self) -> bool:
        return self.p.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        assert self.alive(), f"{self.name} exited with {self.p.returncode}:\n{self.output()[-4000:]}"
        return http_get(self.url(path), timeout)

    def ready(self) -> bool:
        try:
            return self.get("/healthz", timeout=1.0)[0] == 200
        except OSError:
            return False

    def leader(self, timeout: float = 1.0) -> bool | None:
        """What /leader says now; None when it does not answer in time."""
        try:
            status, body = self.get("/leader", timeout=timeout)
        except OSError:
            return None
        return bool(json.loads(body)["leader"]) if status == 200 else None

    def metric(self, name: str, labels: str) -> float | None:
        _, body = self.get("/metrics")
        m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", body, re.M)
        return float(m.group(1)) if m else None

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=5)


def child_env(kubeconfig: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(
        PYTHONPATH=str(ROOT),
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        PYTHONUNBUFFERED="1",
    )
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def cluster_config(tmp: Path, target: Target, steps: str, endpoint: str = "http://127.0.0.1:9") -> str:
    probes = "".join(
        f"""
  {name}:
    kind: http
    url: "http://127.0.0.1:{target.port}/{name}"
    interval: 100ms
    timeout: 1s"""
        for name in ("primary", "secondary")
    )
    return f"""
services:
  shop:
    tier: critical
    rto: 5m
    rpo: 0s
    probes: [primary]
    playbook: recover
probes:{probes}
detection:
  {{failure_threshold: 2, success_threshold: 1, confirm: {{probes: 2, spacing: 50ms}}}}
playbooks:
  recover:
    cooldown: 0s
    steps:{steps}
aws:
  region: eu-west-1
  endpoint_url: "{endpoint}"
  read_timeout: 10s
controller:
  data_dir: "{tmp / "state"}"
  listen: "127.0.0.1:0"
  tick: 100ms
  outbox_retry: 300ms
leader:
  backend: kubernetes
  namespace: {NS}
  lease_name: {LEASE}
  lease_duration: {LEASE_DURATION:g}s
  renew_deadline: {RENEW_DEADLINE:g}s
  retry_period: {int(RETRY_PERIOD * 1000)}ms
store:
  backend: kubernetes
  namespace: {NS}
"""


WAIT_ONLY = """
      - {name: hold, action: wait, with: {duration: 1s}}"""


class Cluster:
    """Two controllers sharing the fake API server."""

    def __init__(self, tmp: Path, kube: FakeKubeAPI, config: str) -> None:
        self.tmp = tmp
        self.kube = kube
        self.cfg = tmp / "continuity.yaml"
        self.cfg.write_text(config, encoding="utf-8")
        self.env = child_env(write_kubeconfig(tmp / "kubeconfig", kube.url))
        self.procs: list[Proc] = []

    def start(self, *names: str) -> list[Proc]:
        started = [Proc(n, self.cfg, self.env, self.tmp) for n in names]
        self.procs += started
        for p in started:
            until(p.ready, 20, f"{p.name} to serve /healthz")
        return started

    def holder(self) -> str | None:
        lease = self.kube.get_object("coordination.k8s.io", "v1", NS, "leases", LEASE)
        return (lease or {}).get("spec", {}).get("holderIdentity") or None

    def leaders(self, procs: list[Proc] | None = None) -> list[str]:
        return [p.name for p in (procs or self.procs) if p.alive() and p.leader()]

    def one_leader(self, timeout: float = 10.0) -> Proc:
        def exactly_one() -> Proc | None:
            names = self.leaders()
            if len(names) == 1 and self.holder() == names[0]:
                return next(p for p in self.procs if p.name == names[0])
            return None

        return until(exactly_one, timeout, "exactly one leader, named by the Lease", every=0.1)

    def store(self) -> KubernetesStore:
        return KubernetesStore(self.kube.api_client(), NS, request_timeout=2.0, attempts=2, backoff=0.01)

    def close(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture
def cluster_factory(tmp_path: Path, kube: FakeKubeAPI) -> Iterator[Callable[[str], Cluster]]:
    made: list[Cluster] = []

    def make(config: str) -> Cluster:
        c = Cluster(tmp_path, kube, config)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


# ---------------------------------------------------------------- 1. one leader


def test_two_processes_elect_exactly_one_leader_named_by_the_lease(
    tmp_path: Path, target: Target, cluster_factory: Callable[[str], Cluster]
):
    c = cluster_factory(cluster_config(tmp_path, target, WAIT_ONLY))
    a, b = c.start("ctl-a", "ctl-b")
    leader = c.one_leader()
    other = b if leader is a else a
    for _ in range(10):  # and it stays that way for a few retry periods
        assert leader.leader() is True and other.leader() is False
        assert c.holder() == leader.name
        time.sleep(0.1)
    _, body = other.get("/leader")
    assert json.loads(body) == {"leader": False, "identity": other.name, "backend": "kubernetes"}


# ---------------------------------------------------------------- 2. SIGKILL mid-failover


def simple_changes(proxy: AwsProxy, world: World) -> list[Recorded]:
    return [
        r
        for r in proxy.calls()
        if r.method == "POST"
        and "/rrset" in r.path
        and f"<Name>{world.zone}</Name>".encode() in r.body
        and b"<SetIdentifier>" not in r.body
    ]


def weight_changes(proxy: AwsProxy, world: World) -> list[Recorded]:
    return [
        r
        for r in proxy.calls()
        if r.method == "POST" and "/rrset" in r.path and f"<Name>{world.www}</Name>".encode() in r.body
    ]


def test_sigkill_of_the_leader_mid_failover_the_standby_resumes_without_repeating_steps(
    tmp_path: Path, target: Target, world: World, proxy: AwsProxy, cluster_factory: Callable[[str], Cluster]
):
    steps = f"""
      - name: switch-dns
        action: aws.route53.switch_record
        with: {{zone: "{world.zone}", record: "{world.zone}", type: A, values: ["{SWITCHED}"]}}
      - {{name: hold, action: wait, with: {{duration: 4s}}}}
      - name: weights
        action: aws.route53.set_weights
        with: {{zone: "{world.zone}", record: "{world.www}", weights: {{primary: 0, secondary: 100}}}}"""
    c = cluster_factory(cluster_config(tmp_path, target, steps, endpoint=proxy.url))
    a, b = c.start("ctl-a", "ctl-b")
    leader = c.one_leader()
    standby = b if leader is a else a
    store = c.store()
    try:
        target.status["primary"] = 503

        def hold_running() -> Run | None:
            assert leader.alive(), leader.output()[-4000:]
            for run in store.runs():
                steps = store.steps(run.id)
                if len(steps) == 3 and steps[1].state == "running":
                    return run
            return None

        run = until(hold_running, 20, "step 2 (hold) running in the PlaybookRun journal")
        os.kill(leader.p.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert leader.p.wait(timeout=5) == -signal.SIGKILL
        assert [s.state for s in store.steps(run.id)] == ["done", "running", "pending"]
        assert len(simple_changes(proxy, world)) == 1
        assert world.a_record() == [SWITCHED]

        until(lambda: standby.leader(), LEASE_DURATION + 5, "the standby to take over", every=0.02)
        takeover = time.monotonic() - killed
        print(f"\nSIGKILL takeover: {takeover:.2f}s")
        # No earlier than lease_duration - renew_deadline after the leader's last renewal (safety);
        # no later than lease_duration after it plus one jittered retry period and some slack.
        assert LEASE_DURATION - RENEW_DEADLINE <= takeover < LEASE_DURATION + 1.2 * RETRY_PERIOD + 1.0
        assert c.holder() == standby.name

        def finished() -> bool:
            assert standby.alive(), standby.output()[-4000:]
            got = store.get_run(run.id)
            return got is not None and got.state != "running"

        until(finished, 20, "the resumed run to finish", every=0.1)
        final = store.get_run(run.id)
        assert final is not None and final.state == "succeeded", final
        assert [s.state for s in store.steps(run.id)] == ["done", "done", "done"]
        assert len(simple_changes(proxy, world)) == 1, "step 1 was applied again"
        assert len(weight_changes(proxy, world)) == 1, "step 3 ran more (or less) than once"
        assert world.weights() == {"primary": 0, "secondary": 100}
        assert world.a_record() == [SWITCHED]
        time.sleep(1.0)  # the new leader still sees the service down: it must not start another run
        assert [r.id for r in store.runs()] == [run.id]
        assert run.incident_id is not None
        incidents = store.list_incidents()
        assert [i.id for i in incidents] == [run.incident_id]
        timeline = [e.message for e in store.timeline(run.incident_id)]
        assert any(m.startswith(f"resuming run {run.id}") for m in timeline), timeline
        assert any("step switch-dns already done in an earlier attempt" in m for m in timeline), timeline
    finally:
        store.close()


def test_only_the_leader_writes_probe_verdicts_into_the_incident(
    tmp_path: Path, target: Target, cluster_factory: Callable[[str], Cluster]
):
    """Both replicas probe, but the timeline is the leader's: a standby that appended its own
    verdicts would double every entry (and block its event loop on the API while it is sick)."""
    c = cluster_factory(cluster_config(tmp_path, target, WAIT_ONLY))
    c.start("ctl-a", "ctl-b")
    c.one_leader()
    store = c.store()
    try:
        target.status["primary"] = 503
        inc = until(lambda: store.open_incident_for("shop"), 10, "an incident", every=0.1)
        time.sleep(0.5)
        target.status["primary"] = 200
        until(lambda: store.open_incident_for("shop") is None, 10, "the incident to resolve", every=0.1)
        time.sleep(1.0)  # both replicas have long seen the probe come back
        verdicts = [e.message for e in store.timeline(inc.id) if e.kind == "probe"]
        ups = [m for m in verdicts if m.startswith("probe primary is UP")]
        assert len(ups) == 1, verdicts
    finally:
        store.close()


# ---------------------------------------------------------------- 3. SIGTERM hands over at once


def test_sigterm_releases_the_lease_and_the_standby_leads_within_a_lease_duration(
    tmp_path: Path, target: Target, cluster_factory: Callable[[str], Cluster]
):
    c = cluster_factory(cluster_config(tmp_path, target, WAIT_ONLY))
    a, b = c.start("ctl-a", "ctl-b")
    leader = c.one_leader()
    standby = b if leader is a else a
    time.sleep(2 * RETRY_PERIOD)  # the standby has seen a few renewals: its expiry clock is fresh

    leader.p.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    until(lambda: standby.leader(), LEASE_DURATION + 2, "the standby to take over", every=0.02)
    handover = time.monotonic() - sent
    print(f"\nSIGTERM handover: {handover:.2f}s")
    assert leader.p.wait(timeout=10) == 0, leader.output()[-4000:]
    assert handover < LEASE_DURATION, f"handover took {handover:.2f}s: the lease was not released"
    assert c.holder() == standby.name
    assert '"leader.released"' in leader.output()


# ---------------------------------------------------------------- 4. API 500s: no failover


def test_api_500s_for_three_lease_durations_cause_no_failover_and_never_two_leaders(
    tmp_path: Path, target: Target, cluster_factory: Callable[[str], Cluster]
):
    c = cluster_factory(cluster_config(tmp_path, target, WAIT_ONLY))
    a, b = c.start("ctl-a", "ctl-b")
    c.one_leader()
    outage = 3 * LEASE_DURATION
    c.kube.fail(500, seconds=outage)
    start = time.monotonic()
    samples: list[tuple[float, bool | None, bool | None]] = []
    while time.monotonic() < start + outage:
        sample = (a.leader(timeout=0.5), b.leader(timeout=0.5))
        assert sample != (True, True), f"two leaders during the outage after {len(samples)} samples"
        samples.append((time.monotonic() - start, *sample))
        time.sleep(0.1)
    assert len(samples) >= 20, samples
    # With every API call failing, nobody can renew: past the renew deadline, nobody leads.
    late = [s for s in samples if RENEW_DEADLINE + 0.5 < s[0] < outage - 0.5]
    assert late and not [s for s in late if True in s[1:]], samples

    c.one_leader(timeout=LEASE_DURATION + 5)
    for _ in range(10):
        assert len(c.leaders()) == 1
        time.sleep(0.1)
    store = c.store()
    try:
        assert store.runs() == []
        assert store.list_incidents() == []
    finally:
        store.close()
    assert a.alive() and b.alive()


# ---------------------------------------------------------------- 5. config reloads


def local_config(tmp: Path, target: Target, *, poll: str, services: str = "") -> str:
    return f"""
services:
  shop: {{tier: critical, rto: 5m, probes: [web]}}{services}
probes:
  web: {{kind: http, url: "http://127.0.0.1:{target.port}/web", interval: 200ms, timeout: 1s}}
  search-api: {{kind: http, url: "http://127.0.0.1:{target.port}/search", interval: 200ms, timeout: 1s}}
controller:
  data_dir: "{tmp / "state"}"
  tick: 100ms
  config_poll: {poll}
leader:
  backend: none
"""


INVALID = """
services:
  shop: {tier: critical, rto: 5m, probes: [web]}
probes:
  web: {kind: http, url: "http://127.0.0.1:9/web", interval: banana}
"""


def test_an_invalid_reloaded_config_is_rejected_and_the_old_one_keeps_running(tmp_path: Path, target: Target):
    cfg = tmp_path / "continuity.yaml"
    # A long poll first, so the rejection and the first reload come from SIGHUP alone.
    cfg.write_text(local_config(tmp_path, target, poll="1h"), encoding="utf-8")
    proc = Proc("solo", cfg, child_env(), tmp_path)
    try:
        until(proc.ready, 20, "the controller to serve /healthz")

        def reloads(outcome: str) -> float:
            return proc.metric("continuity_config_reloads_total", f'outcome="{outcome}"') or 0.0

        def services() -> dict[str, Any]:
            return json.loads(proc.get("/services")[1])

        assert set(services()) == {"shop"}

        # SIGHUP with an invalid file: refused, logged, the old config keeps running.
        cfg.write_text(INVALID, encoding="utf-8")
        proc.p.send_signal(signal.SIGHUP)
        until(lambda: reloads("rejected") == 1, 5, "a rejected reload")
        assert proc.get("/healthz")[0] == 200
        assert set(services()) == {"shop"}
        assert reloads("applied") == 0
        problems = [
            json.loads(line)
            for line in proc.output().splitlines()
            if "config reload rejected" in line and line.startswith("{")
        ]
        assert problems, proc.output()[-4000:]
        assert any("probes.web.interval" in p["problem"] for p in problems), problems

        # SIGHUP with a valid, changed file (a new service, and a fast poll from now on).
        svc = "\n  search: {tier: important, rto: 15m, probes: [search-api]}"
        cfg.write_text(local_config(tmp_path, target, poll="500ms", services=svc), encoding="utf-8")
        proc.p.send_signal(signal.SIGHUP)
        until(lambda: reloads("applied") == 1, 5, "an applied reload")
        assert set(services()) == {"shop", "search"}
        assert reloads("rejected") == 1

        # The file-change path, no signal: a valid change is applied, an invalid one refused.
        svc2 = svc + "\n  basket: {tier: supporting, rto: 1h, probes: [web]}"
        cfg.write_text(local_config(tmp_path, target, poll="500ms", services=svc2), encoding="utf-8")
        until(lambda: reloads("applied") == 2, 5, "a reload on file change")
        assert set(services()) == {"shop", "search", "basket"}
        cfg.write_text(INVALID, encoding="utf-8")
        until(lambda: reloads("rejected") == 2, 5, "a rejection on file change")
        time.sleep(1.2)  # an unchanged (still invalid) file is not re-read and re-rejected every poll
        assert reloads("rejected") == 2
        assert proc.get("/healthz")[0] == 200
        assert set(services()) == {"shop", "search", "basket"}
    finally:
        proc.stop()
