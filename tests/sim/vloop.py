"""Virtual time for the simulation: an asyncio loop whose clock jumps, and an executor that runs inline.

Why our own loop rather than `looptime`: the simulation also needs to model *blocking* calls (a
sync store call or a boto3 call made on the loop thread stalls every task for its duration) and
calls that run "in a thread" but take virtual time. Both are a few lines here:

- `VirtualLoop.time()` is virtual. When nothing is ready, the selector returns at once and the
  clock jumps to the next timer, so an hour of controller life runs in well under a second.
- `InlineExecutor` runs what `asyncio.to_thread` / `run_in_executor` submit synchronously, at
  once, in the loop's thread (so no real thread ever races the loop: a run is deterministic), and
  resolves the future only after the virtual latency the simulated edges charged during the call
  (`charge`). A caller that gives up waiting (`asyncio.wait_for`) therefore leaves the "thread's"
  work done, exactly like a real thread that cannot be cancelled.
- An edge called on the loop thread itself, outside the executor, blocks: `charge` then moves the
  clock forward at once, and every timer fires late by that much (the stall monitor sees it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable
from typing import Any

from controller import executors

START = 1_800_000_000.0
"""Virtual epoch at the start of every run (2027-01-15): any fixed value keeps runs identical."""


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is scheduled: the simulated world would wait forever."""


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.loop: VirtualLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready:
            return ready
        if timeout is None:
            raise Deadlock("no callback ready and no timer scheduled")
        if timeout > 0 and self.loop is not None:
            self.loop.advance(timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """A selector loop on a virtual clock (see the module docstring)."""

    def __init__(self, start: float = START) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = start
        # At an epoch of 1.8e9 a float's step is 2.4e-7 s: the default resolution (1e-9) would leave a
        # timer due exactly "now" never ready (now + 1e-9 == now), and the loop would spin.
        self._clock_resolution = 1e-6
        self.executor = InlineExecutor(self)
        self.set_default_executor(self.executor)
        executors.route_all(self, self.executor)  # the named pools too (controller/executors.py)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs submitted work at once, inline; the future resolves after the virtual time it cost."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__(max_workers=1)
        self.loop = loop
        self.depth = 0
        """>0 while a submitted function runs: edges then charge latency to the call, not the loop."""
        self._cost = 0.0

    def charge(self, seconds: float) -> None:
        """Called by a simulated edge: this call took `seconds` of virtual time."""
        if seconds <= 0:
            return
        if self.depth > 0:
            self._cost += seconds
        else:
            self.loop.advance(seconds)  # called on the loop thread: everything waits

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        outer = self._cost
        self._cost = 0.0
        self.depth += 1
        try:
            result = fn(*args, **kwargs)
            exc: BaseException | None = None
        except BaseException as e:
            result, exc = None, e
        finally:
            self.depth -= 1
            cost, self._cost = self._cost, outer
        if self.depth > 0:
            self._cost += cost  # nested submit: the outer call waited for this one

        def settle() -> None:
            if fut.cancelled() or fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        if cost > 0:
            self.loop.call_at(self.loop.time() + cost, settle)
        else:
            settle()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None
