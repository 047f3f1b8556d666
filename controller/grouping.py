"""One outage, one incident: services of the same region failing together are grouped.

When a region goes, every service in it fails within seconds. Without grouping each would open
its own incident and page; with `depends_on` one would have to wire every pair by hand. Here a
service carries a `region`, and services of one region whose failures start within
`grouping.window` of each other form one incident led by one of them:

- the leader is the region's failing service with an open incident, else the most important one
  (tier), DOWN before merely suspect, then by name: a deterministic choice, so two services never
  wait for each other;
- the others join the leader's incident (one page, one customer notice naming them all:
  "eu-west-1: Checkout and Catalog down") and still run their own failover playbook under it;
- the leader's incident stays open while a member is still failing.

Pure functions over the decision's Observation; `decide` and the loop call them in a few lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from controller.config import Config, display_name
from controller.detect import ServiceHealth, ServiceState

if TYPE_CHECKING:
    from controller.stores import Store


class _OpenIncident(Protocol):
    @property
    def id(self) -> str: ...


class Observation(Protocol):
    """What grouping reads of `decide.Observation`. A protocol rather than an import: `decide` calls
    grouping, so grouping naming decide's module would be an import cycle."""

    @property
    def health(self) -> Mapping[str, ServiceHealth]: ...
    @property
    def incidents(self) -> Mapping[str, _OpenIncident]: ...


TIER_RANK = {"critical": 0, "important": 1, "supporting": 2}


@dataclass(frozen=True)
class Lead:
    """This service's failure belongs to `leader`'s outage (its incident, once it has one)."""

    leader: str
    incident_id: str | None
    region: str
    reason: str


def _failing(h: ServiceHealth | None) -> bool:
    return h is not None and (h.state is ServiceState.DOWN or bool(h.unsettled))


def _together(a: ServiceHealth | None, b: ServiceHealth | None, window: float) -> bool:
    """Did the two failures start within the window? A start not yet known counts as now."""
    if a is None or b is None:
        return False
    if a.since is None or b.since is None:
        return True
    return abs(a.since - b.since) <= window


def peers(obs: Observation, config: Config, service: str) -> list[str]:
    """Other services of the same region failing in the same window, or recovered but still holding
    the region's incident open (the members' failures keep it open, so it is still this outage)."""
    svc = config.services.get(service)
    region = getattr(svc, "region", None) if svc else None
    if not region or not config.grouping.by_region:
        return []
    mine = obs.health.get(service)
    out = []
    for name, other in config.services.items():
        if name == service or getattr(other, "region", None) != region:
            continue
        h = obs.health.get(name)
        if _failing(h):
            if _together(mine, h, config.grouping.window):
                out.append(name)
        elif name in obs.incidents:  # recovered, its incident held open by the outage's members: same outage
            out.append(name)
    return out


def _rank(obs: Observation, config: Config, name: str) -> tuple[int, int, int, str]:
    h = obs.health.get(name)
    return (
        0 if name in obs.incidents else 1,
        TIER_RANK.get(config.services[name].tier, 3),
        0 if h is not None and h.state is ServiceState.DOWN else 1,
        name,
    )


def lead(obs: Observation, config: Config, service: str) -> Lead | None:
    """None when this service opens (or keeps) its own incident; else whose outage it is part of."""
    if service in obs.incidents:
        return None
    group = peers(obs, config, service)
    if not group:
        return None
    leader = min([service, *group], key=lambda n: _rank(obs, config, n))
    if leader == service:
        return None
    region = str(getattr(config.services[service], "region", ""))
    view = obs.incidents.get(leader)
    return Lead(
        leader,
        view.id if view else None,
        region,
        f"{region}: {service} failing with {leader}: one regional outage, part of {leader}'s incident",
    )


def members_failing(obs: Observation, config: Config, leader: str) -> list[str]:
    """Joined services still failing: the leader's incident stays open for them."""
    return [p for p in peers(obs, config, leader) if p not in obs.incidents]


def names(config: Config, services: list[str]) -> str:
    shown = [display_name(s, config.services.get(s)) for s in services]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def headline(config: Config, region: str, services: list[str], state: str = "down") -> str:
    """'eu-west-1: Checkout and Catalog down': what every audience reads for a regional outage."""
    return f"{region}: {names(config, services)} {state}"


def on_open(
    config: Config, service: str, health: dict[str, ServiceHealth], title: str, data: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """At opening: name the region's other services already DOWN with this one in the title, so the
    first page and the first customer notice already say what the region lost."""
    svc = config.services.get(service)
    region = getattr(svc, "region", None) if svc else None
    if not region or not config.grouping.by_region:
        return title, data
    mine = health.get(service)
    down = [
        n
        for n, other in config.services.items()
        if n != service
        and getattr(other, "region", None) == region
        and (h := health.get(n)) is not None
        and h.state is ServiceState.DOWN
        and _together(mine, h, config.grouping.window)
    ]
    data = {**data, "region": region, "services": down, "base_title": title}
    if not down:
        return title, data
    group = [service, *down]
    data["display"] = f"{region}: {names(config, group)}"
    return f"{headline(config, region, group)}; {title}"[:500], data


def record_join(store: Store, config: Config, incident_id: str, service: str) -> None:
    """A member joined the incident: list it, and name it in what every channel says next."""
    inc = store.get_incident(incident_id)
    if inc is None:
        return
    region = inc.data.get("region")
    members = list(inc.data.get("services") or [])
    if service in members or service == inc.service:
        return
    members.append(service)
    data = {**inc.data, "services": members}
    changes: dict[str, Any] = {"data": data}
    if region:
        group = [inc.service, *members]
        data["display"] = f"{region}: {names(config, group)}"
        base = inc.data.get("base_title") or inc.title
        changes["title"] = f"{headline(config, region, group)}; {base}"[:500]
    store.update_incident(incident_id, **changes)
