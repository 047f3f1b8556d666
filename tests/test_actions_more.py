"""The ELBv2, Kubernetes and http playbook actions, against moto's server, the fake Kubernetes API
server (with the real kubernetes client) and a local aiohttp receiver. No mocks of our code."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import web
from kubernetes import client
from pydantic import ValidationError

from controller.config import ConfigError, Playbook, load_config
from controller.stores import SQLiteStore
from playbooks.actions import ACTIONS, ActionContext, ActionError
from playbooks.actions.kubernetes import RESTARTED_AT
from playbooks.engine import Engine
from tests.fakes.kubeapi import FakeKubeAPI

NS = "shop"

# ---------------------------------------------------------------- shared pieces


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.events.append((kind, message, data))

    def api_calls(self) -> list[tuple[str, dict[str, Any]]]:
        return [(m, d) for k, m, d in self.events if k == "api_call"]


def make_ctx(
    rec: Recorder,
    aws: Any = None,
    kube: client.ApiClient | None = None,
    variables: dict[str, Any] | None = None,
) -> ActionContext:
    async def notify(summary: str, details: dict[str, Any]) -> None:
        raise AssertionError("these actions never notify")

    def no_aws(service: str) -> Any:
        raise AssertionError(f"unexpected AWS client {service}")

    return ActionContext(
        aws=aws or no_aws,
        probe_healthy=lambda name: None,
        record=rec,
        notify=notify,
        variables=variables or {},
        kube=(lambda: kube) if kube is not None else None,
    )


def action(name: str, params: dict[str, Any]) -> Any:
    return ACTIONS[name](params)


def playbook(name: str, params: dict[str, Any], retries: int = 2) -> Playbook:
    return Playbook.model_validate(
        {"steps": [{"name": "step", "action": name, "with": params, "retries": retries}]}
    )


def run_engine(tmp_path: Path, pb: Playbook, ctx: ActionContext) -> tuple[Any, Any]:
    store = SQLiteStore(tmp_path / "state")
    try:
        result = asyncio.run(Engine(store, backoff=0.01).run("P", pb, ctx))
        return result, store.steps(result.run_id)[0]
    finally:
        store.close()


# ---------------------------------------------------------------- ELBv2 on moto


# The moto server is the session fixture `moto_url` from tests/conftest.py.


class Alb:
    """An ALB with a listener forwarding blue 100 / green 0, sticky for 300 s."""

    def __init__(self, url: str, name: str) -> None:
        self.clients: dict[str, Any] = {}
        self.url = url
        ec2, elb = self.aws("ec2"), self.aws("elbv2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"us-east-1{az}")[
                "Subnet"
            ]["SubnetId"]
            for i, az in ((1, "a"), (2, "b"))
        ]
        self.lb = elb.create_load_balancer(Name=name, Subnets=subnets)["LoadBalancers"][0]["LoadBalancerArn"]
        self.tg = {
            color: elb.create_target_group(Name=f"{name}-{color}", Protocol="HTTP", Port=80, VpcId=vpc)[
                "TargetGroups"
            ][0]["TargetGroupArn"]
            for color in ("blue", "green")
        }
        self.listener = elb.create_listener(
            LoadBalancerArn=self.lb,
            Protocol="HTTP",
            Port=80,
            DefaultActions=[
                {
                    "Type": "forward",
                    "ForwardConfig": {
                        "TargetGroups": [
                            {"TargetGroupArn": self.tg["blue"], "Weight": 100},
                            {"TargetGroupArn": self.tg["green"], "Weight": 0},
                        ],
                        "TargetGroupStickinessConfig": {"Enabled": True, "DurationSeconds": 300},
                    },
                }
            ],
        )["Listeners"][0]["ListenerArn"]

    def aws(self, service: str) -> Any:
        if service not in self.clients:
            self.clients[service] = boto3.client(service, endpoint_url=self.url, region_name="us-east-1")
        return self.clients[service]

    def forward(self) -> dict[str, Any]:
        listener = self.aws("elbv2").describe_listeners(ListenerArns=[self.listener])["Listeners"][0]
        return listener["DefaultActions"][0]["ForwardConfig"]

    def weights(self) -> dict[str, int]:
        names = {arn: color for color, arn in self.tg.items()}
        return {names[g["TargetGroupArn"]]: g["Weight"] for g in self.forward()["TargetGroups"]}


def test_elbv2_shifts_100_0_to_0_100_by_name_and_keeps_stickiness(moto_url: str) -> None:
    alb = Alb(moto_url, "shop")
    rec = Recorder()
    ctx = make_ctx(rec, aws=alb.aws)
    act = action(
        "aws.elbv2.set_listener_weights",
        {"load_balancer": "shop", "port": 80, "weights": {"shop-blue": 0, "shop-green": 100}},
    )
    assert asyncio.run(act.check(ctx)) is False
    said = asyncio.run(act.apply(ctx))

    assert alb.weights() == {"blue": 0, "green": 100}
    assert alb.forward()["TargetGroupStickinessConfig"] == {"Enabled": True, "DurationSeconds": 300}
    assert said == "listener shop:80 weights shop-blue=100, shop-green=0 -> shop-blue=0, shop-green=100"
    assert asyncio.run(act.check(ctx)) is True
    [(msg, data)] = rec.api_calls()
    assert msg.startswith("elbv2.modify_listener") and data["weights"] == {"shop-blue": 0, "shop-green": 100}


def test_elbv2_by_listener_arn_partial_weights_and_permanent_errors(moto_url: str) -> None:
    alb = Alb(moto_url, "web")
    ctx = make_ctx(Recorder(), aws=alb.aws)
    # An ARN as key; the group not named keeps its weight.
    act = action(
        "aws.elbv2.set_listener_weights", {"listener_arn": alb.listener, "weights": {alb.tg["green"]: 50}}
    )
    asyncio.run(act.apply(ctx))
    assert alb.weights() == {"blue": 100, "green": 50}

    unknown_tg = action(
        "aws.elbv2.set_listener_weights", {"listener_arn": alb.listener, "weights": {"red": 100}}
    )
    with pytest.raises(ActionError, match="red not in the listener's forward action") as e1:
        asyncio.run(unknown_tg.apply(ctx))
    unknown_lb = action(
        "aws.elbv2.set_listener_weights", {"load_balancer": "nope", "port": 80, "weights": {"a": 1}}
    )
    with pytest.raises(ActionError, match="no load balancer named nope") as e2:
        asyncio.run(unknown_lb.check(ctx))
    wrong_port = action(
        "aws.elbv2.set_listener_weights", {"load_balancer": "web", "port": 443, "weights": {"a": 1}}
    )
    with pytest.raises(ActionError, match=r"no listener on port 443 \(ports: 80\)") as e3:
        asyncio.run(wrong_port.check(ctx))
    assert not (e1.value.retryable or e2.value.retryable or e3.value.retryable)
    assert alb.weights() == {"blue": 100, "green": 50}


def test_elbv2_params_and_plan() -> None:
    with pytest.raises(ValidationError, match="found neither"):
        action("aws.elbv2.set_listener_weights", {"load_balancer": "shop", "weights": {"a": 1}})
    with pytest.raises(ValidationError, match="found both"):
        action(
            "aws.elbv2.set_listener_weights",
            {"listener_arn": "arn:x", "load_balancer": "shop", "port": 80, "weights": {"a": 1}},
        )
    with pytest.raises(ValidationError, match="between 0 and 999"):
        action("aws.elbv2.set_listener_weights", {"listener_arn": "arn:x", "weights": {"a": 1000}})
    calls = action(
        "aws.elbv2.set_listener_weights", {"load_balancer": "shop", "port": 443, "weights": {"green": 100}}
    ).plan()
    assert [c.operation for c in calls] == [
        "describe_load_balancers",
        "describe_listeners",
        "modify_listener",
    ]
    assert '"Weight": 100' in calls[-1].render() and "shop:443" in calls[-1].render()


# ---------------------------------------------------------------- Kubernetes on the fake API server


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def kapi(kube: FakeKubeAPI) -> Iterator[client.ApiClient]:
    c = kube.api_client()
    yield c
    c.close()


def seed(api: client.ApiClient, replicas: int = 2) -> None:
    labels = {"app": "web"}
    client.AppsV1Api(api).create_namespaced_deployment(
        NS,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "w", "image": "x"}]},
                },
            },
        },
    )
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        NS, {"metadata": {"name": "flags"}, "data": {"checkout_region": "primary", "banner": "on"}}
    )
    core.create_namespaced_service(
        NS,
        {
            "metadata": {"name": "checkout"},
            "spec": {"selector": {"app": "checkout", "region": "primary"}, "ports": [{"port": 80}]},
        },
    )


def test_kubernetes_scale_2_to_5(kapi: client.ApiClient) -> None:
    seed(kapi)
    rec = Recorder()
    ctx = make_ctx(rec, kube=kapi)
    act = action("kubernetes.scale", {"namespace": NS, "deployment": "web", "replicas": 5})
    assert asyncio.run(act.check(ctx)) is False
    assert asyncio.run(act.apply(ctx)) == "deployment shop/web replicas 2 -> 5"
    assert client.AppsV1Api(kapi).read_namespaced_deployment("web", NS).spec.replicas == 5
    assert asyncio.run(act.check(ctx)) is True
    assert [m for m, _ in rec.api_calls()] == ["kubernetes patch_namespaced_deployment_scale"]


def test_kubernetes_patch_configmap_flag_and_service_selector(
    kube: FakeKubeAPI, kapi: client.ApiClient
) -> None:
    seed(kapi)
    ctx = make_ctx(Recorder(), kube=kapi)
    core = client.CoreV1Api(kapi)

    flag = action(
        "kubernetes.patch",
        {
            "api_version": "v1",
            "kind": "ConfigMap",
            "namespace": NS,
            "name": "flags",
            "patch": {"data": {"checkout_region": "secondary", "banner": None}},
        },
    )
    assert asyncio.run(flag.check(ctx)) is False
    said = asyncio.run(flag.apply(ctx))
    assert said == (
        "ConfigMap shop/flags patched: "
        'data.checkout_region "primary" -> "secondary"; data.banner "on" -> null'
    )
    assert core.read_namespaced_config_map("flags", NS).data == {"checkout_region": "secondary"}
    assert asyncio.run(flag.check(ctx)) is True

    selector = action(
        "kubernetes.patch",
        {
            "api_version": "v1",
            "kind": "Service",
            "namespace": NS,
            "name": "checkout",
            "patch": {"spec": {"selector": {"region": "secondary"}}},
        },
    )
    assert asyncio.run(selector.check(ctx)) is False
    asyncio.run(selector.apply(ctx))
    svc = core.read_namespaced_service("checkout", NS)
    assert svc.spec.selector == {"app": "checkout", "region": "secondary"}
    assert svc.spec.type == "ClusterIP"
    assert asyncio.run(selector.check(ctx)) is True
    # Sent as a JSON merge patch, as documented.
    assert ("PATCH", f"/api/v1/namespaces/{NS}/services/checkout") in kube.requests


def test_kubernetes_patch_params_not_found_and_statefulset(kapi: client.ApiClient) -> None:
    with pytest.raises(ValidationError, match="api_version apps/v1 for kind Deployment"):
        action(
            "kubernetes.patch",
            {"api_version": "v1", "kind": "Deployment", "namespace": NS, "name": "x", "patch": {"a": 1}},
        )
    with pytest.raises(ValidationError, match="Deployment"):
        action(
            "kubernetes.patch",
            {"api_version": "v1", "kind": "Secret", "namespace": NS, "name": "x", "patch": {"a": 1}},
        )
    ctx = make_ctx(Recorder(), kube=kapi)
    missing = action(
        "kubernetes.patch",
        {"api_version": "v1", "kind": "ConfigMap", "namespace": NS, "name": "nope", "patch": {"data": {}}},
    )
    with pytest.raises(ActionError, match='404 Not Found: configmaps "nope" not found') as e:
        asyncio.run(missing.check(ctx))
    assert e.value.retryable is False

    client.AppsV1Api(kapi).create_namespaced_stateful_set(
        NS,
        {
            "metadata": {"name": "db"},
            "spec": {
                "replicas": 1,
                "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": []}},
            },
        },
    )
    sts = action(
        "kubernetes.patch",
        {
            "api_version": "apps/v1",
            "kind": "StatefulSet",
            "namespace": NS,
            "name": "db",
            "patch": {"spec": {"replicas": 3}},
        },
    )
    assert asyncio.run(sts.apply(ctx)) == "StatefulSet shop/db patched: spec.replicas 1 -> 3"
    assert client.AppsV1Api(kapi).read_namespaced_stateful_set("db", NS).spec.replicas == 3


def test_kubernetes_rollout_restart_sets_annotation(kapi: client.ApiClient) -> None:
    seed(kapi)
    ctx = make_ctx(Recorder(), kube=kapi)
    act = action("kubernetes.rollout_restart", {"namespace": NS, "deployment": "web"})
    said = asyncio.run(act.apply(ctx))
    dep = client.AppsV1Api(kapi).read_namespaced_deployment("web", NS)
    stamp = dep.spec.template.metadata.annotations[RESTARTED_AT]
    assert said == f"deployment shop/web restarted: {RESTARTED_AT} never restarted -> {stamp}"
    assert stamp.endswith("Z") and len(stamp) == len("2026-01-01T00:00:00Z")
    assert dep.spec.template.metadata.labels == {"app": "web"}  # the rest of the template is kept
    assert dep.metadata.generation == 2  # a template change: the Deployment controller rolls pods
    assert asyncio.run(act.check(ctx)) is False  # never "already done": see RolloutRestart's docstring


def test_kubernetes_409_once_is_retried_by_the_engine(
    tmp_path: Path, kube: FakeKubeAPI, kapi: client.ApiClient
) -> None:
    seed(kapi)
    kube.fail(409, count=1, match=lambda method, path: method == "PATCH")
    rec = Recorder()
    pb = playbook("kubernetes.scale", {"namespace": NS, "deployment": "web", "replicas": 5})
    result, step = run_engine(tmp_path, pb, make_ctx(rec, kube=kapi))
    assert result.ok, result.error
    assert step.state == "done" and step.attempts == 2
    assert step.detail == "deployment shop/web replicas 2 -> 5"
    assert client.AppsV1Api(kapi).read_namespaced_deployment("web", NS).spec.replicas == 5
    assert any("attempt 1 failed: kubernetes scale deployment shop/web: 409" in m for _, m, _ in rec.events)


def test_kubernetes_403_is_not_retried(tmp_path: Path, kube: FakeKubeAPI, kapi: client.ApiClient) -> None:
    seed(kapi)
    kube.fail(403, match=lambda method, path: method == "PATCH")
    pb = playbook("kubernetes.rollout_restart", {"namespace": NS, "deployment": "web"}, retries=3)
    result, step = run_engine(tmp_path, pb, make_ctx(Recorder(), kube=kapi))
    assert not result.ok
    assert step.state == "failed" and step.attempts == 1
    assert "403 Forbidden: injected fault 403" in (step.detail or "")
    assert [r for r in kube.requests if r[0] == "PATCH"] == [
        ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/web")
    ]


def test_kubernetes_without_any_config_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    ctx = make_ctx(Recorder())  # no kube client given
    act = action("kubernetes.scale", {"namespace": NS, "deployment": "web", "replicas": 1})
    with pytest.raises(ActionError, match="kubeconfig configuration could not be loaded") as e:
        asyncio.run(act.check(ctx))
    assert e.value.retryable is False


# ---------------------------------------------------------------- http (webhook)


class Receiver:
    """A local webhook endpoint: records every request; answers with the queued statuses, then 200."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.statuses: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": await request.json() if request.can_read_body else None,
            }
        )
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"ok": status < 400}, status=status)


async def _serve(receiver: Receiver) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


HOOK = {
    "method": "POST",
    "headers": {"Authorization": {"env": "HOOK_TOKEN", "prefix": "Bearer "}, "X-Source": "continuity"},
    "json": {"text": "failover for {{ service }} ({{ incident_id }})", "severity": "{{ severity }}", "n": 3},
}
VARS = {"service": "checkout", "incident_id": "inc-1", "severity": "critical"}


def test_http_sends_secret_header_and_rendered_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "s3cret-token")
    receiver = Receiver()
    rec = Recorder()

    async def scenario() -> str:
        runner, port = await _serve(receiver)
        try:
            act = action("http", {**HOOK, "url": f"http://127.0.0.1:{port}/hooks/failover"})
            assert "s3cret" not in json.dumps([c.render() for c in act.plan()])
            assert "Bearer <$HOOK_TOKEN>" in act.plan()[0].render()
            return await act.apply(make_ctx(rec, variables=VARS))
        finally:
            await runner.cleanup()

    said = asyncio.run(scenario())
    [req] = receiver.seen
    assert req["method"] == "POST" and req["path"] == "/hooks/failover"
    assert req["headers"]["Authorization"] == "Bearer s3cret-token"
    assert req["headers"]["X-Source"] == "continuity"
    assert req["body"] == {"text": "failover for checkout (inc-1)", "severity": "critical", "n": 3}
    assert said.startswith("POST http://127.0.0.1:") and " answered 200 OK in " in said
    assert "s3cret" not in json.dumps(rec.events)  # never in the timeline


def test_http_missing_env_var_is_permanent_and_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOOK_TOKEN", raising=False)
    receiver = Receiver()

    async def scenario() -> None:
        runner, port = await _serve(receiver)
        try:
            act = action("http", {**HOOK, "url": f"http://127.0.0.1:{port}/h"})
            await act.apply(make_ctx(Recorder(), variables=VARS))
        finally:
            await runner.cleanup()

    with pytest.raises(ActionError, match="environment variable HOOK_TOKEN is not set") as e:
        asyncio.run(scenario())
    assert e.value.retryable is False and receiver.seen == []


def test_http_503_retried_by_the_engine_but_400_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "t")
    receiver = Receiver()

    async def scenario() -> tuple[Any, Any]:
        runner, port = await _serve(receiver)
        store = SQLiteStore(tmp_path / "state")
        try:
            engine = Engine(store, backoff=0.01)
            ctx = make_ctx(Recorder(), variables=VARS)
            receiver.statuses = [503, 429]
            ok = await engine.run("P", playbook("http", {**HOOK, "url": f"http://127.0.0.1:{port}/a"}), ctx)
            receiver.statuses = [400]
            bad = await engine.run("P", playbook("http", {**HOOK, "url": f"http://127.0.0.1:{port}/b"}), ctx)
            return (ok, store.steps(ok.run_id)[0]), (bad, store.steps(bad.run_id)[0])
        finally:
            store.close()
            await runner.cleanup()

    (ok, ok_step), (bad, bad_step) = asyncio.run(scenario())
    assert ok.ok and ok_step.attempts == 3
    assert not bad.ok and bad_step.attempts == 1
    assert "expected status [200, 201, 202, 204], found 400" in (bad_step.detail or "")
    assert [r["path"] for r in receiver.seen] == ["/a", "/a", "/a", "/b"]


def test_http_connection_refused_is_retryable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    act = action("http", {"url": f"http://127.0.0.1:{port}/", "timeout": "2s"})
    with pytest.raises(ActionError, match="ConnectionError") as e:
        asyncio.run(act.apply(make_ctx(Recorder())))
    assert e.value.retryable is True


# ---------------------------------------------------------------- config validation


CONFIG = """
services:
  checkout: {tier: critical, rto: 5m, probes: [api], playbook: P}
probes:
  api: {kind: http, url: "http://127.0.0.1:1/"}
playbooks:
  P:
    steps:
      - {name: scale, action: kubernetes.scale, with: {namespace: shop, deployment: web}}
      - name: shift
        action: aws.elbv2.set_listener_weights
        with: {load_balancer: shop, weights: {blue: 0, green: 100}}
      - name: hook
        action: http
        with: {url: "https://hooks.example/x", json: {a: 1}, headers: {A: {env: X}}}
      - name: flag
        action: kubernetes.patch
        with: {api_version: v1, kind: Secret, namespace: shop, name: x, patch: {data: {}}}
"""


def test_config_validation_names_each_bad_step_param(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    problems = e.value.problems
    assert (
        f"{path}: playbooks.P.steps[0].with.replicas: "
        "expected a value (this field is required), found nothing" in problems
    )
    assert any(
        p.startswith(f"{path}: playbooks.P.steps[1].with: expected listener_arn, or load_balancer")
        for p in problems
    )
    assert any(p.startswith(f"{path}: playbooks.P.steps[3].with.kind: expected one of") for p in problems)
    assert not any("steps[2]" in p for p in problems)  # the http step is valid (json alias, env header)
    assert len(problems) == 3


def test_dry_run_of_every_new_action_calls_nothing(tmp_path: Path, kube: FakeKubeAPI) -> None:
    pb = Playbook.model_validate(
        {
            "steps": [
                {"name": "lb", "action": "aws.elbv2.set_listener_weights",
                 "with": {"listener_arn": "arn:l", "weights": {"green": 100}}},
                {"name": "scale", "action": "kubernetes.scale",
                 "with": {"namespace": NS, "deployment": "web", "replicas": 5}},
                {"name": "flag", "action": "kubernetes.patch",
                 "with": {"api_version": "v1", "kind": "ConfigMap", "namespace": NS, "name": "flags",
                          "patch": {"data": {"region": "secondary"}}}},
                {"name": "restart", "action": "kubernetes.rollout_restart",
                 "with": {"namespace": NS, "deployment": "web"}},
                {"name": "hook", "action": "http", "with": {**HOOK, "url": "http://127.0.0.1:1/h"}},
            ]
        }
    )  # fmt: skip
    store, api = SQLiteStore(tmp_path / "state"), kube.api_client()
    try:
        result = asyncio.run(Engine(store).run("P", pb, make_ctx(Recorder(), kube=api), dry_run=True))
        details = [s.detail or "" for s in store.steps(result.run_id)]
    finally:
        store.close()
        api.close()
    assert result.ok and kube.requests == []
    assert "modify_listener" in details[0] and "patch_namespaced_deployment_scale" in details[1]
    assert '"region": "secondary"' in details[2] and RESTARTED_AT in details[3]
    assert "Bearer <$HOOK_TOKEN>" in details[4] and "{{ service }}" in details[4]
