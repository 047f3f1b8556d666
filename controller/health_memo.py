"""Every service's health, recomputed only for what changed since the last tick.

`detect.service_health` over every service on every tick was most of a reconcile at 2,000 probes
(its intermittent-failure rate scans each probe's runs of the last ten minutes, twice). Almost
nothing it reads changes from one tick to the next: a healthy probe's new pass replaces its
`ProbeState` but not its verdict. So the tracker keeps, per probe, the `detect.ProbeView` it last
computed and the state it was computed from, and per service, the verdict:

- a probe's view is recomputed when its state is another object (ProbeState is frozen: every
  result, burst, reload or discount replaces it), or when time alone could change it (its latest
  result goes stale, a run leaves the intermittent window: `ProbeView.until`, kept in a heap of
  deadlines). Unknown is not up: a probe that stops reporting turns UNKNOWN on
  time, with no new state;
- a recomputed view equal to the one before is not a change;
- a service's verdict is summarised again only when one of its probes' views, or its set of
  flapping probes, changed.

What comes out equals `service_health` computed afresh (tests/test_health_memo.py compares the two
over random results, vantage points and time), so detection stays the pure function it was; this is
only its memo. A reconcile at 2,000 probes went from recomputing 2,000 views (~60 runs each) to a
scan of 2,000 identities plus the ~200 probes that reported since the last tick.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence

from controller.detect import Health, ProbeState, ProbeView, Rules, ServiceHealth, probe_view, summarize

_NEVER = ProbeState()
"""The state of a probe never observed (one object, so that it is never a change)."""
_DEFAULT = Rules()
_MARGIN = 1e-3
"""A view is recomputed from this long before the moment time alone could change it: recomputing
early is always right (it is the plain computation), late never is (float rounding of a deadline)."""


class HealthMemo:
    """The memo of one tracker. Its inputs other than the states (the services' probes, impact,
    rules, freshness) are the tracker's per-config mappings, replaced by a reload and never changed
    in place: another object starts the memo afresh."""

    def __init__(self) -> None:
        self._inputs: tuple[object, ...] = ()
        self._seen: dict[str, ProbeState] = {}
        """probe -> the state its view (and up-since) was last computed from."""
        self._views: dict[str, ProbeView] = {}
        """probe -> its view (the object kept while recomputed views are equal to it)."""
        self._expiry: list[tuple[float, int, str]] = []
        """(when time alone may change the view, its generation, probe): a heap; outdated entries
        (an older generation) are skipped."""
        self._generation: dict[str, int] = {}
        self._services_of: dict[str, list[str]] = {}
        self._flapping: frozenset[str] = frozenset()
        self._health: dict[str, ServiceHealth] = {}
        self._up: dict[str, float] = {}
        """UP probes -> `changed_at` (0.0 when unknown; `up_since` uses `now` for it)."""
        self._now = float("-inf")
        self._all_dirty = True
        self.views_computed = 0
        """Probe views computed (the rest were reused): for tests and benchmarks."""
        self.services_computed = 0

    def health(
        self,
        services: Mapping[str, Sequence[str]],
        states: Mapping[str, ProbeState],
        impact: Mapping[str, str],
        flapping_probes: Iterable[str],
        *,
        now: float,
        freshness: Mapping[str, float],
        rules: Mapping[str, Rules],
    ) -> dict[str, ServiceHealth]:
        """`{name: service_health(name, probes, states, impact, flapping_probes, now=now, freshness=
        freshness, rules=rules)}` for every service, from the memo where nothing changed."""
        inputs = (services, impact, freshness, rules)
        held = self._inputs
        # Another config (a reload), or the clock stepped back (runs outside the window may be inside
        # again): start afresh.
        if len(held) != 4 or any(a is not b for a, b in zip(inputs, held, strict=True)) or now < self._now:
            self._reset(services, inputs)
        self._now = now
        seen = self._seen
        # Probes whose state is another object since the last call (every result replaces it) ...
        changed = [p for p, old in seen.items() if states.get(p, _NEVER) is not old]
        changed += states.keys() - seen.keys()  # new names (reference targets: only their up-since)
        # ... and those whose view time alone may have changed (stale, runs left the window).
        expiry = self._expiry
        while expiry and expiry[0][0] <= now + _MARGIN:
            _, generation, p = heapq.heappop(expiry)
            if self._generation.get(p) == generation:
                changed.append(p)
        dirty: set[str] = set(services) if self._all_dirty else set()
        self._all_dirty = False
        for p in changed:
            if self._recompute(p, states.get(p, _NEVER), impact, freshness, rules, now):
                dirty.update(self._services_of.get(p, ()))
        flapping = frozenset(flapping_probes)
        if flapping != self._flapping:
            for p in flapping ^ self._flapping:
                dirty.update(self._services_of.get(p, ()))
            self._flapping = flapping
        for name in dirty:
            row = [self._views[p] for p in services[name]]
            self._health[name] = summarize(name, row, flapping)
            self.services_computed += 1
        return dict(self._health)

    def up_since(self, now: float) -> dict[str, float]:
        """When each UP probe came up (its `changed_at`, else `now`), as of the last `health` call."""
        return {p: at or now for p, at in self._up.items()}

    def _reset(self, services: Mapping[str, Sequence[str]], inputs: tuple[object, ...]) -> None:
        self._inputs = inputs
        self._services_of = {}
        for name, probes in services.items():
            for p in dict.fromkeys(probes):
                self._services_of.setdefault(p, []).append(name)
        # A marker no state is: every probe of a service counts as changed on the next call.
        self._seen = {p: _RESET for p in self._services_of}
        self._views = {}
        self._expiry = []
        self._generation = {}
        self._flapping = frozenset()
        self._health = {}
        self._up = {}
        self._all_dirty = True

    def _recompute(
        self,
        p: str,
        st: ProbeState,
        impact: Mapping[str, str],
        freshness: Mapping[str, float],
        rules: Mapping[str, Rules],
        now: float,
    ) -> bool:
        """Recompute one probe's view (and whether it is UP); True when its view changed."""
        self._seen[p] = st
        if st.status is Health.UP:
            self._up[p] = st.changed_at or 0.0
        else:
            self._up.pop(p, None)
        if p not in self._services_of:
            return False  # in no service (a reference target): only its up-since is kept
        view = probe_view(
            p, st, impact.get(p, "down") == "down", rules.get(p, _DEFAULT), freshness.get(p), now
        )
        self.views_computed += 1
        generation = self._generation[p] = self._generation.get(p, 0) + 1
        if view.until is not None:
            heapq.heappush(self._expiry, (view.until, generation, p))
        held = self._views.get(p)
        if held is not None and held[:-1] == view[:-1]:  # equal but for `until`: the same verdict
            return False
        self._views[p] = view
        return True


_RESET = ProbeState(changes=(float("nan"),))
"""Stands for "not computed yet" in the memo's seen states: no tracker state is this object."""
