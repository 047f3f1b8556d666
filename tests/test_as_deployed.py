"""What `helm install` deploys, run as the pods would run it.

The chart is rendered (helm-python-sdk) with default values and with a production-like values file.
From the rendered objects the tests take the ConfigMap's config.yaml, the Deployment's container
(args, env; the image's ENTRYPOINT is `continuity`, so `python -m controller.cli` stands for it),
the pod template's labels, the Role and its binding, the Services and the CRDs. Each "pod" is a real
`continuity run` subprocess with its own data directory (the emptyDir) and its own bearer token
(the projected ServiceAccount token), against the fake API server, which enforces the rendered Role
(403 otherwise) and validates custom objects against the rendered CRD schemas. The test plays the
kubelet and the ReplicaSet: it creates the Pod objects with the template's labels, fills the env
from the downward API and Secrets, and answers "which pods back the -leader Service" from the
Service's selector, as the endpoints controller would.

Only these differ from a cluster, and why: the listen address (two pods cannot both own
0.0.0.0:8080 on one host), the two volume paths, and credentials found through a kubeconfig
holding the pod's token (the in-cluster loader reads fixed paths under /var/run/secrets and wants
TLS, which the fake does not speak).

Invariants checked in every scenario: at most one replica says it leads at any sampled moment, one
page per incident, each playbook step applied once, and no request of the controller was refused
by the rendered RBAC.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from controller.demo.pagerduty import PagerDutyReceiver
from controller.stores import Run
from controller.stores.kube import KubernetesStore
from tests.conftest import World
from tests.fakes.awsproxy import AwsProxy
from tests.fakes.kubeapi import FakeKubeAPI
from tests.test_cluster import (
    SWITCHED,
    Target,
    free_port,
    http_get,
    simple_changes,
    until,
    weight_changes,
)
from tests.test_deploy_chart import alert_rules, metric_base, render_mod

ROOT = Path(__file__).resolve().parent.parent
RELEASE = "shop"
NS = "continuity-system"
LEASE = f"{RELEASE}-leader"
ROLE_LABEL = "continuity.dev/role"
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 3.0, 2.0, 0.5
PD_KEY = "0123456789abcdef0123456789abcdef"
API_TOKEN = "push-token-for-tests"
SECRETS = {
    ("continuity-secrets", "pagerduty-routing-key"): PD_KEY,
    ("continuity-api", "api-token"): API_TOKEN,
    # With default values the chart requires "<fullname>-api-token" (a pod does not start without
    # it): the operator creates it as the chart's NOTES say.
    (f"{RELEASE}-continuity-api-token", "api-token"): API_TOKEN,
}


# ---------------------------------------------------------------- the world around the pods


class PagerDuty:
    """The local PagerDuty Events API v2 receiver (real wire format) on its own loop and thread."""

    def __init__(self) -> None:
        self.receiver = PagerDutyReceiver()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.port = free_port()

        async def serve() -> None:
            runner = web.AppRunner(self.receiver.app())
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.runner = runner
            started.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        started.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/enqueue"

    def triggers(self) -> list[dict[str, Any]]:
        return [e for e in list(self.receiver.events) if e.get("event_action") == "trigger"]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def production_values(target: Target, world: World, proxy: AwsProxy, pd: PagerDuty, hold: str) -> dict:
    """A values file as an operator would write it: secrets by reference, an API token, short
    leases (the only concession to test time), and a config whose outage runs a 3-step playbook."""
    steps = [
        {
            "name": "switch-dns",
            "action": "aws.route53.switch_record",
            "with": {"zone": world.zone, "record": world.zone, "type": "A", "values": [SWITCHED]},
        },
        {"name": "hold", "action": "wait", "with": {"duration": hold}},
        {
            "name": "weights",
            "action": "aws.route53.set_weights",
            "with": {"zone": world.zone, "record": world.www, "weights": {"primary": 0, "secondary": 100}},
        },
    ]
    return {
        "replicas": 2,
        "leaderElection": {
            "leaseDuration": f"{LEASE_DURATION:g}s",
            "renewDeadline": f"{RENEW_DEADLINE:g}s",
            "retryPeriod": f"{int(RETRY_PERIOD * 1000)}ms",
        },
        "image": {"digest": "sha256:" + "ab" * 32},
        "secretEnv": [
            {"name": "PD_ROUTING_KEY", "secretName": "continuity-secrets", "key": "pagerduty-routing-key"}
        ],
        "apiToken": {"secretName": "continuity-api"},
        "podAntiAffinity": "hard",
        "priorityClassName": "system-cluster-critical",
        "config": {
            "services": {
                "shop": {"tier": "critical", "rto": "5m", "probes": ["primary"], "playbook": "recover"},
                "payments": {"tier": "important", "rto": "15m", "probes": ["payments-alerts"]},
            },
            "probes": {
                "primary": {
                    "kind": "http",
                    "url": f"http://127.0.0.1:{target.port}/primary",
                    "interval": "100ms",
                    "timeout": "1s",
                },
                "payments-alerts": {
                    "kind": "alertmanager",
                    "matchers": {"alertname": "PaymentsErrors"},
                    "interval": "200ms",
                },
            },
            "detection": {
                "failure_threshold": 2,
                "success_threshold": 1,
                "confirm": {"probes": 2, "spacing": "50ms"},
            },
            "playbooks": {"recover": {"cooldown": "0s", "fails_away_from": "eu-west-1", "steps": steps}},
            "notifiers": {"pagerduty": {"routing_key_env": "PD_ROUTING_KEY", "events_url": pd.url}},
            "aws": {"region": "eu-west-1", "endpoint_url": proxy.url, "read_timeout": "10s"},
            "controller": {"tick": "100ms", "outbox_retry": "300ms", "region": "eu-central-1"},
        },
    }


class Pod:
    """One replica: the rendered container run as a process, with its Pod object in the fake."""

    def __init__(self, name: str, release: Deployed) -> None:
        self.name = name
        self.release = release
        self.token = f"token-{name}"
        self.port = free_port()
        root = release.tmp / name
        self.config_dir, self.data_dir = root / "config", root / "data"
        self.config_dir.mkdir(parents=True)
        self.data_dir.mkdir()
        (self.config_dir / "config.yaml").write_text(release.config_text, encoding="utf-8")
        paths = {
            "/etc/continuity/config.yaml": str(self.config_dir / "config.yaml"),
            "/var/lib/continuity": str(self.data_dir),
            "0.0.0.0:8080": f"127.0.0.1:{self.port}",
        }
        args = [paths.get(a, a) for a in release.container["args"]]
        assert args != release.container["args"], "the rendered args moved: update the path mapping"
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": release.kube.url}}],
                    "users": [{"name": "sa", "user": {"token": self.token}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa", "namespace": NS}}],
                    "current-context": "c",
                }
            ),
            encoding="utf-8",
        )
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "AWS_", "CONTINUITY_"))
        }
        env.update(
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            KUBECONFIG=str(kubeconfig),
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
        )
        env.update(release.pod_env(name))
        release.kube.add_token(self.token, f"{NS}/{release.service_account}")
        release.kube.add_pod(NS, name, release.pod_labels)
        self.log = root / "log"
        with open(self.log, "wb") as log:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", *args, "--log-format", "json"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.p.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        assert self.alive(), f"{self.name} exited with {self.p.returncode}:\n{self.output()[-4000:]}"
        return http_get(f"http://127.0.0.1:{self.port}{path}", timeout)

    def ready(self) -> bool:
        try:
            return self.get("/readyz", timeout=1.0)[0] == 200
        except OSError:
            return False

    def leader(self, timeout: float = 1.0) -> bool | None:
        if not self.alive():
            return None
        try:
            status, body = http_get(f"http://127.0.0.1:{self.port}/leader", timeout)
        except OSError:
            return None
        return bool(json.loads(body)["leader"]) if status == 200 else None

    def labels(self) -> dict[str, str]:
        pod = self.release.kube.get_object("", "v1", NS, "pods", self.name) or {}
        return pod.get("metadata", {}).get("labels") or {}

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.p.send_signal(sig)

    def stop(self) -> None:
        if self.alive():
            self.p.kill()
            self.p.wait(timeout=5)


class Deployed:
    """The release: rendered objects loaded into the fake API server, and its pods."""

    def __init__(self, values: dict[str, Any] | None, tmp: Path, kube: FakeKubeAPI) -> None:
        self.tmp, self.kube = tmp, kube
        self.objects = render_mod.render_objects(values, name=RELEASE, namespace=NS)

        def one(kind: str, name: str | None = None) -> dict[str, Any]:
            found = [o for o in self.objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
            assert len(found) == 1, (kind, name, len(found))
            return found[0]

        self.config_text: str = one("ConfigMap")["data"]["config.yaml"]
        self.config = yaml.safe_load(self.config_text)
        self.deployment = one("Deployment")
        template = self.deployment["spec"]["template"]
        (self.container,) = template["spec"]["containers"]
        assert "command" not in self.container, "the image's ENTRYPOINT (continuity) is what runs"
        self.pod_labels: dict[str, str] = template["metadata"]["labels"]
        self.service_account: str = template["spec"]["serviceAccountName"]
        self.push_service = one("Service", f"{RELEASE}-continuity-leader")
        self.rule = next((o for o in self.objects if o["kind"] == "PrometheusRule"), None)
        kube.install_crds([o for o in self.objects if o["kind"] == "CustomResourceDefinition"])
        kube.enforce_rbac(self.objects, {})
        self.pods: list[Pod] = []
        self._seq = 0

    def pod_env(self, pod: str) -> dict[str, str]:
        """The container's env as the kubelet fills it: values, the downward API and Secrets."""
        env: dict[str, str] = {}
        for e in self.container["env"]:
            if "value" in e:
                env[e["name"]] = str(e["value"])
                continue
            source = e["valueFrom"]
            if "fieldRef" in source:
                field = source["fieldRef"]["fieldPath"]
                env[e["name"]] = {"metadata.name": pod, "metadata.namespace": NS}[field]
            else:
                ref = source["secretKeyRef"]
                env[e["name"]] = SECRETS[(ref["name"], ref["key"])]
        return env

    def start(self, n: int = 1) -> list[Pod]:
        made = []
        for _ in range(n):
            self._seq += 1
            made.append(Pod(f"{RELEASE}-continuity-7d9f8-{self._seq:05d}", self))
        self.pods += made
        for p in made:
            until(p.ready, 30, f"{p.name} to be ready")
        return made

    def delete_pod(self, pod: Pod) -> None:
        """The ReplicaSet deleted it: the process is gone and so is the Pod object."""
        pod.stop()
        self.kube.delete_object("", "v1", NS, "pods", pod.name)

    def holder(self) -> str | None:
        lease = self.kube.get_object("coordination.k8s.io", "v1", NS, "leases", LEASE)
        return (lease or {}).get("spec", {}).get("holderIdentity") or None

    def one_leader(self, timeout: float = 15.0) -> Pod:
        def exactly_one() -> Pod | None:
            leading = [p for p in self.pods if p.leader()]
            if len(leading) == 1 and self.holder() == leading[0].name:
                return leading[0]
            return None

        return until(exactly_one, timeout, "exactly one leader, named by the Lease", every=0.1)

    def push_endpoints(self) -> list[str]:
        """Pods the -leader Service sends to (alive ones matching its selector), as Endpoints would."""
        selector = self.push_service["spec"]["selector"]
        return [
            p.name
            for p in self.pods
            if p.alive() and all(p.labels().get(k) == v for k, v in selector.items())
        ]

    def push(self, path: str, body: dict[str, Any]) -> tuple[str, int]:
        """POST through the -leader Service; returns (pod, status)."""
        (name,) = self.push_endpoints()
        pod = next(p for p in self.pods if p.name == name)
        req = urllib.request.Request(
            f"http://127.0.0.1:{pod.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_TOKEN}"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return name, r.status

    def store(self) -> KubernetesStore:
        return KubernetesStore(self.kube.api_client(), NS, request_timeout=2.0, attempts=2, backoff=0.01)

    def close(self) -> None:
        for p in self.pods:
            p.stop()


class LeaderWatch:
    """Samples every pod's /leader in the background; any moment with two leaders is recorded."""

    def __init__(self, release: Deployed) -> None:
        self.release = release
        self.samples = 0
        self.overlaps: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            leading = [p.name for p in list(self.release.pods) if p.leader(timeout=0.5)]
            self.samples += 1
            if len(leading) > 1:
                self.overlaps.append((time.monotonic(), leading))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert self.samples >= 10, self.samples
        assert not self.overlaps, f"two leaders at once: {self.overlaps}"


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


@pytest.fixture
def pd() -> Iterator[PagerDuty]:
    receiver = PagerDuty()
    yield receiver
    receiver.close()


@pytest.fixture
def deploy(tmp_path: Path, kube: FakeKubeAPI) -> Iterator[Callable[[dict[str, Any] | None], Deployed]]:
    made: list[Deployed] = []

    def make(values: dict[str, Any] | None) -> Deployed:
        release = Deployed(values, tmp_path, kube)
        made.append(release)
        return release

    try:
        yield make
    finally:
        for release in made:
            release.close()


def check_invariants(release: Deployed, pd: PagerDuty, world: World, proxy: AwsProxy, runs: int = 1) -> None:
    """One incident, one page for it, the playbook's steps each applied once; no RBAC refusal."""
    store = release.store()
    try:
        incidents = store.list_incidents()
        shop = [i for i in incidents if i.service == "shop"]
        assert len(shop) == 1, incidents
        triggers = [t for t in pd.triggers() if t["dedup_key"] == shop[0].dedup_key]
        assert len(triggers) == 1, f"{len(triggers)} pages for one incident"
        assert len({t["dedup_key"] for t in pd.triggers()}) == len(pd.triggers()), "a second page"
        assert len([r for r in store.runs() if r.service == "shop"]) == runs
    finally:
        store.close()
    assert len(simple_changes(proxy, world)) == 1, "switch-dns applied more (or less) than once"
    assert len(weight_changes(proxy, world)) == 1, "weights applied more (or less) than once"
    assert world.a_record() == [SWITCHED]
    assert world.weights() == {"primary": 0, "secondary": 100}
    assert release.kube.denied == [], f"the rendered Role refused the controller: {release.kube.denied}"


def running_step(release: Deployed, index: int, timeout: float = 30) -> Run:
    store = release.store()
    try:

        def find() -> Run | None:
            for run in store.runs():
                steps = store.steps(run.id)
                if len(steps) == 3 and steps[index].state == "running":
                    return run
            return None

        return until(find, timeout, f"step {index + 1} running in the PlaybookRun journal", every=0.1)
    finally:
        store.close()


def run_finished(release: Deployed, run_id: str, timeout: float = 30) -> Run:
    store = release.store()
    try:

        def done() -> Run | None:
            got = store.get_run(run_id)
            return got if got is not None and got.state != "running" else None

        return until(done, timeout, "the run to finish", every=0.1)
    finally:
        store.close()


# ---------------------------------------------------------------- default values


def test_default_values_run_one_leader_on_a_lease_with_shared_state_and_a_labelled_pod(
    deploy: Callable[[dict[str, Any] | None], Deployed],
):
    """`helm install` with default values: the ConfigMap as rendered, two pods. The only input the
    defaults cannot carry is the PagerDuty routing key the example config names: the operator
    supplies it (secretEnv or existingSecret); here it is in the pods' env."""
    release = deploy(None)
    assert release.config["leader"]["backend"] == "kubernetes"
    assert release.config["store"]["backend"] == "kubernetes"
    release.container["env"].append({"name": "PD_ROUTING_KEY", "value": PD_KEY})
    a, b = release.start(2)
    leader = release.one_leader(timeout=20)
    standby = b if leader is a else a
    until(lambda: release.push_endpoints() == [leader.name], 10, "the -leader Service to select the leader")
    assert ROLE_LABEL not in standby.labels()
    lease = release.kube.get_object("coordination.k8s.io", "v1", NS, "leases", LEASE)
    assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 15
    # Shared state: the store the standby reads is the one the leader writes (continuity.dev objects).
    assert json.loads(standby.get("/leader")[1])["backend"] == "kubernetes"
    assert standby.get("/readyz")[0] == 200
    # Every metric the PrometheusRule uses is exported by the running leader.
    _, body = leader.get("/metrics")
    from prometheus_client.parser import text_string_to_metric_families

    exported = {f.name for f in text_string_to_metric_families(body)}
    assert release.rule is not None
    used = {metric_base(m) for r in alert_rules(release.rule) for m in _metric_names(r["expr"])}
    assert used and used <= exported, used - exported
    assert 'continuity_leader{lock="lease/continuity-system/shop-leader"} 1.0' in body
    assert release.kube.denied == [], release.kube.denied


def _metric_names(expr: str) -> list[str]:
    import re

    return re.findall(r"continuity_[a-z_]+", expr)


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"leader": {"backend": "file"}},
            "leader.backend: expected kubernetes in a Deployment of 2 replicas",
        ),
        (
            {"store": {"backend": "sqlite"}},
            "store.backend: expected kubernetes in a Deployment of 2 replicas",
        ),
    ],
)
def test_per_pod_state_with_two_replicas_is_refused_at_start(
    tmp_path: Path, kube: FakeKubeAPI, section: dict[str, Any], message: str
):
    """A values file that brings back a file lock or SQLite with replicas: 2 gets a pod that exits 2
    with one clear line per problem, never a second leader."""
    base = Deployed(None, tmp_path / "base", kube).config
    values = {"config": {**base, **section}}
    (tmp_path / "bad").mkdir()
    release = Deployed(values, tmp_path / "bad", kube)
    release.container["env"].append({"name": "PD_ROUTING_KEY", "value": PD_KEY})
    pod = Pod("bad-pod", release)
    release.pods.append(pod)
    assert pod.p.wait(timeout=30) == 2
    out = pod.output()
    assert message in out and "Traceback" not in out, out


# ---------------------------------------------------------------- production-like values


def test_leader_killed_mid_step_the_standby_resumes_each_step_once_and_takes_the_label(
    deploy: Callable[[dict[str, Any] | None], Deployed],
    target: Target,
    world: World,
    proxy: AwsProxy,
    pd: PagerDuty,
):
    release = deploy(production_values(target, world, proxy, pd, hold="4s"))
    release.start(2)
    leader = release.one_leader()
    standby = next(p for p in release.pods if p is not leader)
    watch = LeaderWatch(release)
    until(lambda: release.push_endpoints() == [leader.name], 10, "the -leader Service to select the leader")

    target.status["primary"] = 503
    run = running_step(release, 1)
    leader.kill(signal.SIGKILL)  # the container dies; its Pod object (and label) stay, as after a crash
    killed = time.monotonic()
    until(lambda: standby.leader(), LEASE_DURATION + 5, "the standby to take over", every=0.02)
    takeover = time.monotonic() - killed
    print(f"\nas deployed, SIGKILL mid-step -> standby leads after {takeover:.2f}s")
    assert LEASE_DURATION - RENEW_DEADLINE <= takeover < LEASE_DURATION + 1.2 * RETRY_PERIOD + 1.5
    # The new leader overwrote the label: the dead pod no longer receives pushes.
    until(lambda: release.push_endpoints() == [standby.name], 5, "the label to move to the new leader")
    until(lambda: ROLE_LABEL not in leader.labels(), 5, "the new leader to clear the dead leader's label")
    final = run_finished(release, run.id)
    assert final.state == "succeeded", final
    time.sleep(1.0)  # the service is still down: no second run, no second page
    watch.stop()
    check_invariants(release, pd, world, proxy)


def test_leader_cut_off_from_the_api_server_but_not_from_aws_stops_acting(
    deploy: Callable[[dict[str, Any] | None], Deployed],
    target: Target,
    world: World,
    proxy: AwsProxy,
    pd: PagerDuty,
):
    """Partition: the leader still reaches AWS but not the API server. It must stop before the
    standby takes over and must not apply the remaining step; the standby resumes from the journal."""
    release = deploy(production_values(target, world, proxy, pd, hold="4s"))
    release.start(2)
    leader = release.one_leader()
    standby = next(p for p in release.pods if p is not leader)
    watch = LeaderWatch(release)

    target.status["primary"] = 503
    run = running_step(release, 1)
    release.kube.fail(503, token=leader.token)
    cut = time.monotonic()
    until(lambda: leader.leader() is False, RENEW_DEADLINE + 2, "the cut-off leader to stop leading")
    stopped = time.monotonic() - cut
    until(lambda: standby.leader(), LEASE_DURATION + 5, "the standby to take over", every=0.02)
    takeover = time.monotonic() - cut
    print(
        f"\nas deployed, partitioned leader stops after {stopped:.2f}s, standby leads after {takeover:.2f}s"
    )
    # /leader is answered by the same event loop that the (synchronous) store blocks while it retries
    # the unreachable API, so `stopped` can read late; acting is gated on the monotonic deadline
    # itself (may_act), and the safety that matters is the standby waiting out the lease.
    assert takeover > RENEW_DEADLINE
    until(lambda: release.push_endpoints() == [standby.name], 5, "the new leader to take the label over")
    final = run_finished(release, run.id)
    assert final.state == "succeeded", final
    time.sleep(1.5)  # the old leader's hold step has long ended: it must not have set the weights
    assert leader.alive() and leader.leader() is False
    release.kube.clear_faults()
    time.sleep(2 * RETRY_PERIOD)  # healed: it sees the Lease held and stays a standby
    assert leader.leader() is False and standby.leader() is True
    watch.stop()
    check_invariants(release, pd, world, proxy)


ALERT = {
    "version": "4",
    "groupKey": '{}:{alertname="PaymentsErrors"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "continuity",
    "groupLabels": {"alertname": "PaymentsErrors"},
    "commonLabels": {"alertname": "PaymentsErrors"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager.example:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "PaymentsErrors"},
            "annotations": {"summary": "payments failing"},
            "startsAt": "2026-11-29T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph",
            "fingerprint": "00aa11bb22cc33dd",
        }
    ],
}


def payments_state(pod: Pod) -> str:
    return str(json.loads(pod.get("/services")[1])["payments"]["state"])


def test_rolling_update_during_an_open_incident_keeps_it_open_pages_once_and_finishes_the_run_once(
    deploy: Callable[[dict[str, Any] | None], Deployed],
    target: Target,
    world: World,
    proxy: AwsProxy,
    pd: PagerDuty,
):
    """maxSurge 0, maxUnavailable 1: one pod replaced at a time (SIGTERM, then a new pod with a new
    name and an empty data dir), both in turn, while the run is in its 4 s step. Before the roll an
    Alertmanager webhook goes through the -leader Service: it lands on the leader only, and the pods
    that lead after the roll (which never received it) still act on it, without reopening or
    re-paging its incident."""
    release = deploy(production_values(target, world, proxy, pd, hold="4s"))
    strategy = release.deployment["spec"]["strategy"]["rollingUpdate"]
    assert (strategy["maxSurge"], strategy["maxUnavailable"]) == (0, 1)
    grace = release.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    release.start(2)
    first = release.one_leader()
    watch = LeaderWatch(release)
    until(lambda: release.push_endpoints() == [first.name], 10, "the -leader Service to select the leader")
    assert release.push("/alertmanager", ALERT) == (first.name, 200)
    store = release.store()
    payments = until(lambda: store.open_incident_for("payments"), 15, "the alert's incident")
    target.status["primary"] = 503
    run = running_step(release, 1)
    try:
        incident = store.open_incident_for("shop")
        assert incident is not None
        for old in list(release.pods):
            old.kill(signal.SIGTERM)
            assert old.p.wait(timeout=grace) == 0, old.output()[-3000:]
            assert ROLE_LABEL not in old.labels(), "a clean shutdown removes its own label"
            release.delete_pod(old)
            release.start(1)
        new_leader = release.one_leader()
        assert new_leader.name not in {p.name for p in release.pods[:2]}
        until(lambda: release.push_endpoints() == [new_leader.name], 5, "the label on the new leader")
        final = run_finished(release, run.id)
        assert final.state == "succeeded", final
        time.sleep(1.0)
        still = store.open_incident_for("shop")
        assert still is not None and still.id == incident.id, "the incident closed or was replaced"
        assert [i.id for i in store.list_incidents() if i.service == "shop"] == [incident.id]
        # The pushed alert outlived both pods that could have received it.
        assert payments_state(new_leader) == "down"
        assert [i.id for i in store.list_incidents() if i.service == "payments"] == [payments.id]
    finally:
        store.close()
    watch.stop()
    check_invariants(release, pd, world, proxy)


def test_api_server_answering_500_for_30s_never_makes_two_leaders_and_the_outage_is_handled_once(
    deploy: Callable[[dict[str, Any] | None], Deployed],
    target: Target,
    world: World,
    proxy: AwsProxy,
    pd: PagerDuty,
):
    release = deploy(production_values(target, world, proxy, pd, hold="500ms"))
    release.start(2)
    release.one_leader()
    watch = LeaderWatch(release)
    release.kube.fail(500, seconds=30)
    start = time.monotonic()
    time.sleep(RENEW_DEADLINE + 0.5)
    target.status["primary"] = 503  # the outage begins while nobody can write state
    late: list[list[str]] = []
    while time.monotonic() < start + 29:
        late.append([p.name for p in release.pods if p.leader(timeout=0.5)])
        time.sleep(0.2)
    assert late and not any(late), "someone led without a Lease renewal"
    assert pd.triggers() == [] and not simple_changes(proxy, world), "acted without leadership"
    release.one_leader(timeout=LEASE_DURATION + 10)
    store = release.store()
    try:
        inc = until(lambda: store.open_incident_for("shop"), 15, "the incident, once the API is back")
        runs = until(lambda: [r for r in store.runs() if r.service == "shop"], 15, "the run")
        run_finished(release, runs[0].id)
        until(lambda: [t for t in pd.triggers() if t["dedup_key"] == inc.dedup_key], 20, "the page")
        time.sleep(1.0)
    finally:
        store.close()
    watch.stop()
    check_invariants(release, pd, world, proxy)
    assert all(p.alive() for p in release.pods)
