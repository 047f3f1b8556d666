"""Route 53: point a record at the secondary region (simple or failover records), or shift weights.

Changes are UPSERTs that keep the record's routing fields (SetIdentifier, Failover, Weight,
HealthCheckId, TTL) so that switching a region never silently turns a failover record into a
simple one. Each change is waited on until Route 53 reports it INSYNC.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from controller.durations import Duration
from playbooks.actions.base import Action, ActionContext, ActionError, PlannedCall, in_action_pool
from probes.base import Strict


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


class _RecordRef(Strict):
    zone: str = Field(description="Hosted zone name (shop.example.) or id (Z123...).")
    record: str = Field(description="Record name, e.g. shop.example.")
    type: str = "A"
    insync_timeout: Duration | None = Field(
        default=None,
        gt=0,
        description="How long to wait for INSYNC; by default what is left of the step's timeout.",
    )


class _Route53(Action):
    p: Any
    blocking = True
    wait_params = ("insync_timeout",)

    def _zone_lookup_call(self) -> list[PlannedCall]:
        if self._zone_is_id():
            return []
        return [
            PlannedCall(
                "route53",
                "list_hosted_zones_by_name",
                {"DNSName": _fqdn(self.p.zone)},
                "read: find the zone id",
            )
        ]

    def _zone_is_id(self) -> bool:
        return not self.p.zone.endswith(".") and "." not in self.p.zone

    def zone_id(self, r53: Any) -> str:
        if self._zone_is_id():
            return self.p.zone.removeprefix("/hostedzone/")
        want = _fqdn(self.p.zone)
        zones = r53.list_hosted_zones_by_name(DNSName=want)["HostedZones"]
        for zone in zones:
            if zone["Name"] == want:
                return zone["Id"].removeprefix("/hostedzone/")
        raise ActionError(f"no hosted zone named {want}", retryable=False)

    def records(self, r53: Any, zone_id: str) -> list[dict[str, Any]]:
        name = _fqdn(self.p.record)
        resp = r53.list_resource_record_sets(
            HostedZoneId=zone_id, StartRecordName=name, StartRecordType=self.p.type
        )
        return [r for r in resp["ResourceRecordSets"] if r["Name"] == name and r["Type"] == self.p.type]

    def wait_insync(self, r53: Any, change_id: str, wait: float) -> float:
        start = time.monotonic()
        while True:
            status = r53.get_change(Id=change_id)["ChangeInfo"]["Status"]
            if status == "INSYNC":
                return time.monotonic() - start
            if time.monotonic() - start > wait:
                raise ActionError(f"change {change_id} still {status} after {wait:.3g}s")
            time.sleep(min(1.0, max(0.05, wait / 10)))


class SwitchRecordParams(_RecordRef):
    set_identifier: str | None = Field(default=None, description="For failover/weighted record sets.")
    values: list[str] = Field(min_length=1, description="The new targets, e.g. the secondary's address.")
    ttl: int | None = Field(default=None, ge=0, description="New TTL; by default the record keeps its own.")


class SwitchRecord(_Route53):
    """UPSERT a record (simple or failover) so it points at new values."""

    name = "aws.route53.switch_record"
    Params = SwitchRecordParams
    summary = "Point a Route 53 record at new values (e.g. the secondary region)."
    p: SwitchRecordParams

    def _select(self, records: list[dict[str, Any]]) -> dict[str, Any] | None:
        for r in records:
            if r.get("SetIdentifier") == self.p.set_identifier:
                return r
        return None

    def _new(self, current: dict[str, Any] | None) -> dict[str, Any]:
        rrset: dict[str, Any] = dict(current or {})
        rrset.pop("AliasTarget", None)  # the record now names explicit values
        rrset.update(
            Name=_fqdn(self.p.record), Type=self.p.type, ResourceRecords=[{"Value": v} for v in self.p.values]
        )
        rrset["TTL"] = self.p.ttl if self.p.ttl is not None else rrset.get("TTL", 60)
        if self.p.set_identifier:
            rrset["SetIdentifier"] = self.p.set_identifier
        return rrset

    def plan(self) -> list[PlannedCall]:
        zone = self.p.zone if self._zone_is_id() else f"<id of {_fqdn(self.p.zone)}>"
        return [
            *self._zone_lookup_call(),
            PlannedCall(
                "route53",
                "list_resource_record_sets",
                {
                    "HostedZoneId": zone,
                    "StartRecordName": _fqdn(self.p.record),
                    "StartRecordType": self.p.type,
                },
                "read: keep the record's routing fields",
            ),
            PlannedCall(
                "route53",
                "change_resource_record_sets",
                {
                    "HostedZoneId": zone,
                    "ChangeBatch": {"Changes": [{"Action": "UPSERT", "ResourceRecordSet": self._new(None)}]},
                },
            ),
            PlannedCall("route53", "get_change", {"Id": "<change id>"}, "poll until INSYNC"),
        ]

    def _current_values(self, ctx: ActionContext) -> tuple[str, dict[str, Any] | None]:
        r53 = ctx.aws("route53")
        zone_id = self.zone_id(r53)
        return zone_id, self._select(self.records(r53, zone_id))

    async def check(self, ctx: ActionContext) -> bool:
        _, cur = await in_action_pool(self._current_values, ctx)
        have = sorted(r["Value"] for r in (cur or {}).get("ResourceRecords", []))
        return have == sorted(self.p.values)

    def _apply(self, ctx: ActionContext) -> str:
        r53 = ctx.aws("route53")
        zone_id, cur = self._current_values(ctx)
        if cur is None and self.p.set_identifier:
            raise ActionError(
                f"record {_fqdn(self.p.record)} {self.p.type} with set identifier "
                f"{self.p.set_identifier!r} not found in zone {zone_id}",
                retryable=False,
            )
        was = ", ".join(r["Value"] for r in (cur or {}).get("ResourceRecords", [])) or "absent"
        rrset = self._new(cur)
        ctx.record(
            "api_call", "route53.change_resource_record_sets UPSERT", {"zone": zone_id, "rrset": rrset}
        )
        change = r53.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={
                "Comment": f"continuity {ctx.variables.get('incident_id', 'manual')}",
                "Changes": [{"Action": "UPSERT", "ResourceRecordSet": rrset}],
            },
        )["ChangeInfo"]
        took = self.wait_insync(r53, change["Id"], ctx.budget(self.p.insync_timeout, 120.0))
        return (
            f"{_fqdn(self.p.record)} {self.p.type} now {', '.join(self.p.values)} (was {was}); "
            f"change {change['Id']} INSYNC after {took:.1f}s"
        )

    async def apply(self, ctx: ActionContext) -> str:
        return await in_action_pool(self._apply, ctx)


class SetWeightsParams(_RecordRef):
    weights: dict[str, int] = Field(min_length=1, description="Set identifier -> weight (0-255).")


class SetWeights(_Route53):
    """Shift traffic between weighted record sets in one atomic change batch."""

    name = "aws.route53.set_weights"
    Params = SetWeightsParams
    summary = "Set the weights of weighted Route 53 record sets (e.g. 100/0 -> 0/100)."
    p: SetWeightsParams

    def plan(self) -> list[PlannedCall]:
        zone = self.p.zone if self._zone_is_id() else f"<id of {_fqdn(self.p.zone)}>"
        changes = [
            {
                "Action": "UPSERT",
                "ResourceRecordSet": {
                    "Name": _fqdn(self.p.record),
                    "Type": self.p.type,
                    "SetIdentifier": sid,
                    "Weight": w,
                    "ResourceRecords": "<unchanged>",
                },
            }
            for sid, w in self.p.weights.items()
        ]
        return [
            *self._zone_lookup_call(),
            PlannedCall(
                "route53",
                "list_resource_record_sets",
                {"HostedZoneId": zone, "StartRecordName": _fqdn(self.p.record)},
                "read",
            ),
            PlannedCall(
                "route53",
                "change_resource_record_sets",
                {"HostedZoneId": zone, "ChangeBatch": {"Changes": changes}},
            ),
            PlannedCall("route53", "get_change", {"Id": "<change id>"}, "poll until INSYNC"),
        ]

    def _weights(self, ctx: ActionContext) -> tuple[str, dict[str, dict[str, Any]]]:
        r53 = ctx.aws("route53")
        zone_id = self.zone_id(r53)
        return zone_id, {r["SetIdentifier"]: r for r in self.records(r53, zone_id) if "SetIdentifier" in r}

    async def check(self, ctx: ActionContext) -> bool:
        _, sets = await in_action_pool(self._weights, ctx)
        return all(sid in sets and sets[sid].get("Weight") == w for sid, w in self.p.weights.items())

    def _apply(self, ctx: ActionContext) -> str:
        r53 = ctx.aws("route53")
        zone_id, sets = self._weights(ctx)
        missing = [sid for sid in self.p.weights if sid not in sets]
        if missing:
            raise ActionError(f"weighted record sets not found: {', '.join(missing)}", retryable=False)
        changes = []
        for sid, weight in self.p.weights.items():
            rrset = dict(sets[sid])
            rrset["Weight"] = weight
            changes.append({"Action": "UPSERT", "ResourceRecordSet": rrset})
        ctx.record(
            "api_call",
            "route53.change_resource_record_sets UPSERT weights",
            {"zone": zone_id, "weights": self.p.weights},
        )
        change = r53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": changes})
        took = self.wait_insync(r53, change["ChangeInfo"]["Id"], ctx.budget(self.p.insync_timeout, 120.0))
        before = ", ".join(f"{sid}={sets[sid].get('Weight')}" for sid in self.p.weights)
        after = ", ".join(f"{sid}={w}" for sid, w in self.p.weights.items())
        return f"{_fqdn(self.p.record)} weights now {after} (was {before}); INSYNC after {took:.1f}s"

    async def apply(self, ctx: ActionContext) -> str:
        return await in_action_pool(self._apply, ctx)
