"""The outbox dispatcher outlives a sick store: a StoreError while reading due messages (the API
server answering 500) is logged and retried next period, never the end of delivery. Found by the
as-deployed suite: after 30 s of API 500s the leader opened the incident and queued the page, and
nothing ever sent it, because the dispatcher task had died on the first failed read."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.notify.outbox import Channel, Dispatcher
from controller.stores import OutboxMessage, SQLiteStore, StoreError


class SickStore(SQLiteStore):
    """A real SQLite store whose first reads of the outbox fail as the Kubernetes store's do."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def due(self, now: float) -> list[OutboxMessage]:
        if self.failures:
            self.failures -= 1
            raise StoreError("kubernetes store: HTTP 500 InternalError")
        return super().due(now)


def test_the_dispatcher_keeps_running_after_the_store_fails(tmp_path: Path) -> None:
    store = SickStore(tmp_path, failures=3)
    sent: list[str] = []
    channel = Channel("test", send=lambda payload, key: sent.append(key))

    async def scenario() -> None:
        dispatcher = Dispatcher(store, {"test": channel}, clock=lambda: 1_000.0)
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop, period=0.02))
        store.enqueue("test", "inc-1/test/trigger", {"kind": "x"}, None, 1_000.0)
        for _ in range(200):
            if sent:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(scenario())
    store.close()
    assert store.failures == 0
    assert sent == ["inc-1/test/trigger"]
