"""A step's timeout covers its action's own waits, and an attempt whose outcome is unknown is never
retried in parallel nor called failed (issue 10): a real local HTTP server that answers late, Aurora
on moto's server behind the fault-injecting proxy, and the config check that refuses a step whose
action would wait longer than the step's timeout."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from controller.aws import client_factory
from controller.config import Aws, ConfigError, Playbook, load_config
from controller.stores import SQLiteStore
from playbooks.engine import Engine, make_context
from tests.conftest import World
from tests.fakes.awsproxy import AwsProxy, matcher


class SlowReceiver:
    """A webhook receiver that takes `delay` seconds to answer each POST, and remembers each one."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.posts: list[dict[str, Any]] = []
        self.done = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                receiver.posts.append({"key": self.headers.get("Idempotency-Key"), "body": body})
                time.sleep(receiver.delay)
                receiver.done += 1
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the client gave up: the work above was still done
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/purge"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow() -> Iterator[SlowReceiver]:
    r = SlowReceiver(3.0)
    yield r
    r.close()


def run_engine(tmp: Path, pb: Playbook, aws: Any = None) -> tuple[Any, list[tuple[str, dict[str, Any]]], Any]:
    store = SQLiteStore(tmp)
    engine = Engine(store, backoff=0.01, owner="test-owner")
    timeline: list[tuple[str, dict[str, Any]]] = []
    ctx = make_context(
        aws or (lambda name: None),
        lambda name: True,
        record=lambda kind, msg, data: timeline.append((msg, data)),
        variables={"incident_id": "INC-test", "service": "shop", "severity": "critical"},
    )
    ctx.poll_interval = 0.05
    result = asyncio.run(engine.run("pb", pb, ctx, service="shop"))
    return result, timeline, store


def test_a_webhook_slower_than_its_step_is_posted_once_with_a_key_and_journaled_unknown(
    tmp_path: Path, slow: SlowReceiver
) -> None:
    pb = Playbook.model_validate(
        {
            "steps": [
                {
                    "name": "purge",
                    "action": "http",
                    "with": {"url": slow.url, "json": {"x": 1}},
                    "timeout": "1s",
                    "retries": 2,
                },
                {"name": "after", "action": "wait", "with": {"duration": "10ms"}},
            ]
        }
    )
    result, timeline, store = run_engine(tmp_path, pb)
    time.sleep(3.2)  # let the receiver finish the request it got, and give a retry time to show up
    assert len(slow.posts) == 1, f"the receiver got {len(slow.posts)} POSTs"
    assert slow.posts[0]["key"] == f"{result.run_id}-purge"
    assert not result.ok
    steps = {s.name: s for s in store.steps(result.run_id)}
    assert steps["purge"].state == "unknown", "an attempt whose outcome is unknown is not 'failed'"
    assert steps["purge"].detail and "outcome unknown" in steps["purge"].detail
    assert steps["purge"].attempts == 1
    assert steps["after"].state == "skipped"
    messages = [m for m, _ in timeline]
    assert any("outcome unknown" in m for m in messages), messages
    assert not any("purge failed" in m and "unknown" not in m for m in messages)
    call = next(d for m, d in timeline if m.startswith("http POST"))
    assert call["idempotency_key"] == f"{result.run_id}-purge"
    assert 0 < call["timeout_s"] < 1.0, "the request's own timeout derives from the step's"
    assert store.get_run(result.run_id).owner == "test-owner"
    store.close()


def test_a_webhook_resumed_after_a_crash_is_checked_then_sent_with_the_same_key(tmp_path: Path) -> None:
    """A resumed step that was in flight when its owner died: the journal says outcome unknown,
    then checked, and the re-sent request carries the key the first one had."""
    fast = SlowReceiver(0.0)
    try:
        pb = Playbook.model_validate(
            {"steps": [{"name": "purge", "action": "http", "with": {"url": fast.url}}]}
        )
        store = SQLiteStore(tmp_path)
        dead = Engine(store, owner="dead-owner")
        run = dead.create("pb", pb, service="shop")
        assert store.claim_run(run.id, "dead-owner", None)
        store.update_step(run.id, 0, state="running", started_at=time.time())  # it died here
        engine = Engine(store, backoff=0.01, owner="new-owner")
        assert not store.claim_run(run.id, "new-owner", None), "owned: not claimable as unowned"
        assert store.claim_run(run.id, "new-owner", "dead-owner")
        timeline: list[str] = []
        ctx = make_context(lambda n: None, lambda n: True, record=lambda k, m, d: timeline.append(m))
        result = asyncio.run(engine.execute(run.id, "pb", pb, ctx))
        assert result.ok
        assert [p["key"] for p in fast.posts] == [f"{run.id}-purge"]
        unknown = next(i for i, m in enumerate(timeline) if "outcome unknown" in m)
        checked = next(i for i, m in enumerate(timeline) if "checked after the unknown outcome" in m)
        assert unknown < checked
        store.close()
    finally:
        fast.close()


def test_a_run_owned_by_another_process_applies_no_step(tmp_path: Path) -> None:
    fast = SlowReceiver(0.0)
    try:
        pb = Playbook.model_validate(
            {"steps": [{"name": "purge", "action": "http", "with": {"url": fast.url}}]}
        )
        store = SQLiteStore(tmp_path)
        run = Engine(store, owner="a").create("pb", pb, service="shop")
        assert store.claim_run(run.id, "a", None)
        ctx = make_context(lambda n: None, lambda n: True)
        result = asyncio.run(Engine(store, owner="b").execute(run.id, "pb", pb, ctx))
        assert result.state == "handed_over" and "owned by a" in result.error
        assert fast.posts == []
        assert store.steps(run.id)[0].state == "pending"
        store.close()
    finally:
        fast.close()


@pytest.fixture
def proxy(world: World) -> Iterator[AwsProxy]:
    with AwsProxy(world.moto_url) as p:
        yield p


def test_an_aurora_failover_answering_late_is_waited_for_not_repeated(
    tmp_path: Path, world: World, proxy: AwsProxy
) -> None:
    """FailoverDBCluster held 1.5 s by the proxy, step timeout 1 s: outcome unknown at 1 s, the
    engine waits for the thread instead of retrying, the call lands once, the step is done."""
    proxy.delay(matcher(action="FailoverDBCluster"), 1.5, times=1)
    aws = client_factory(Aws(region="eu-west-1", endpoint_url=proxy.url, read_timeout="10s"))
    aws("rds").describe_db_clusters(DBClusterIdentifier=world.cluster)  # a cold client can take > 1 s
    pb = Playbook.model_validate(
        {
            "steps": [
                {
                    "name": "move-writer",
                    "action": "aws.rds.failover_db_cluster",
                    "with": {"cluster": world.cluster, "target_instance": world.standby},
                    "timeout": "1s",
                    "retries": 2,
                }
            ]
        }
    )
    result, timeline, store = run_engine(tmp_path, pb, aws)
    assert result.ok, result.error
    assert len(proxy.calls("FailoverDBCluster")) == 1
    assert world.cluster_writer() == world.standby
    messages = [m for m, _ in timeline]
    assert any("no answer within 1.0s: outcome unknown" in m for m in messages), messages
    assert any("finished late" in m for m in messages), messages
    [step] = store.steps(result.run_id)
    assert (step.state, step.attempts) == ("done", 1)
    store.close()


@pytest.mark.parametrize(
    ("step", "field", "found"),
    [
        (
            "{name: db, action: aws.rds.failover_db_cluster, with: {cluster: c, target_instance: i, "
            "wait_timeout: 5m}}",
            "steps[0].with.wait_timeout",
            "found 5m00s",
        ),
        (
            '{name: hook, action: http, timeout: 5s, with: {url: "http://127.0.0.1:9/x", timeout: 10s}}',
            "steps[0].with.timeout",
            "found 10.0s",
        ),
        (
            "{name: dns, action: aws.route53.switch_record, timeout: 30s, with: {zone: z., record: r., "
            "values: [1.2.3.4], insync_timeout: 2m}}",
            "steps[0].with.insync_timeout",
            "found 2m00s",
        ),
    ],
)
def test_a_step_whose_action_can_outlive_its_timeout_is_refused_at_load(
    tmp_path: Path, step: str, field: str, found: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"""
services: {{shop: {{tier: critical, rto: 5m, probes: [web], playbook: pb}}}}
probes: {{web: {{kind: http, url: "http://127.0.0.1:9/"}}}}
playbooks:
  pb:
    steps:
      - {step}
""",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    [problem] = [p for p in err.value.problems if field in p]
    assert str(path) in problem and found in problem and "step's timeout" in problem


def test_unset_action_waits_derive_from_the_step_timeout(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        """
services: {shop: {tier: critical, rto: 5m, probes: [web], playbook: pb}}
probes: {web: {kind: http, url: "http://127.0.0.1:9/"}}
playbooks:
  pb:
    steps:
      - {name: db, action: aws.rds.failover_db_cluster, timeout: 30s, with: {cluster: c, target_instance: i}}
""",
        encoding="utf-8",
    )
    cfg = load_config(path)
    ctx = make_context(lambda n: None, lambda n: True)
    assert ctx.budget(None, 300.0) == 300.0, "outside the engine: the action's default"
    ctx.deadline = time.monotonic() + 30
    assert 25 < ctx.budget(None, 300.0) < 30
    assert ctx.budget(12.0, 300.0) == 12.0
    assert cfg.playbooks["pb"].steps[0].timeout == 30
