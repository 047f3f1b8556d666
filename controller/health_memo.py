"""Every service's health, recomputed only for what changed since the last tick.

`detect.service_health` over every service on every tick was most of a reconcile at 2,000 probes
(its intermittent-failure rate scans each probe's runs of the last ten minutes, twice). Almost
nothing it reads changes from one tick to the next: a healthy probe's new pass replaces its
`ProbeState` but not its verdict. So the tracker keeps, per probe, the `detect.ProbeView` it last
computed and the state it was computed from, and per service, the verdict and the views it was
summarised from:

- a probe's view is recomputed when its state is another object (ProbeState is frozen: every
  result, burst, reload or discount replaces it), its rules, freshness or impact changed, or time
  alone could change it (`ProbeView.holds`: the latest result goes stale, a run leaves the
  intermittent window). Unknown is not up: a probe that stops reporting turns stale on time;
- a recomputed view equal to the one before is not a change (the old object is kept);
- a service's verdict is summarised again only when one of its views, or its flapping probes,
  changed.

What comes out equals `service_health` computed afresh (tests/test_health_memo.py compares the two
over random results and time), so detection stays the pure function it was; this is only its memo.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.detect import ProbeState, ProbeView, Rules, ServiceHealth, probe_view, summarize

_NEVER = ProbeState()
"""The state of a probe never observed (one object, so that it is never a change)."""
_DEFAULT = Rules()


class HealthMemo:
    def __init__(self) -> None:
        self._views: dict[str, tuple[ProbeState, Rules, float | None, bool, ProbeView, ProbeView]] = {}
        """probe -> (state, rules, freshness, hard, the view as computed (its validity), the view kept)."""
        self._services: dict[str, tuple[tuple[ProbeView, ...], tuple[str, ...], ServiceHealth]] = {}
        self.views_computed = 0
        """Probe views computed (the rest were reused): for tests and benchmarks."""
        self.services_computed = 0

    def health(
        self,
        services: Mapping[str, Iterable[str]],
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
        flapping = set(flapping_probes)
        views: dict[str, ProbeView] = {}
        out: dict[str, ServiceHealth] = {}
        for name, probes in services.items():
            row: list[ProbeView] = []
            for p in probes:
                view = views.get(p)
                if view is None:
                    view = views[p] = self._view(
                        p,
                        states.get(p, _NEVER),
                        impact.get(p, "down") == "down",
                        rules.get(p, _DEFAULT),
                        freshness.get(p),
                        now,
                    )
                row.append(view)
            key = tuple(row)
            flaps = tuple(v.probe for v in row if v.probe in flapping)
            held = self._services.get(name)
            if held is not None and held[0] == key and held[1] == flaps:
                out[name] = held[2]
                continue
            health = summarize(name, row, flaps)
            self.services_computed += 1
            self._services[name] = (key, flaps, health)
            out[name] = health
        if len(self._services) > len(services):  # services removed by a reload
            for gone in [n for n in self._services if n not in services]:
                del self._services[gone]
        return out

    def _view(
        self, p: str, st: ProbeState, hard: bool, r: Rules, limit: float | None, now: float
    ) -> ProbeView:
        held = self._views.get(p)
        if (
            held is not None
            and held[0] is st
            and (held[1] is r or held[1] == r)
            and held[2] == limit
            and held[3] == hard
            and held[4].holds(now)
        ):
            return held[5]
        fresh = probe_view(p, st, hard, r, limit, now)
        self.views_computed += 1
        kept = held[5] if held is not None and held[5] == fresh else fresh
        self._views[p] = (st, r, limit, hard, fresh, kept)
        return kept
