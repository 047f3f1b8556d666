"""ELBv2 (ALB): shift traffic between target groups by the weights of a listener's forward action.

Only the weights change: the listener's other default actions, the forward action's stickiness
config and the weights of target groups not named keep what they had. Target groups are named by
ARN or by name; a name is matched against the `targetgroup/NAME/ID` part of the ARNs already in the
forward action, so no extra lookup is needed and a name can never pick a group the listener does
not forward to.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, model_validator

from playbooks.actions.base import Action, ActionContext, ActionError, PlannedCall, in_action_pool
from probes.base import Strict


class SetListenerWeightsParams(Strict):
    listener_arn: str | None = Field(default=None, description="The listener's ARN.")
    load_balancer: str | None = Field(
        default=None, description="Load balancer name, with `port`, instead of listener_arn."
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="Listener port on load_balancer.")
    weights: dict[str, int] = Field(
        min_length=1, description="Target group name or ARN -> weight (0-999), e.g. {blue: 0, green: 100}."
    )

    @model_validator(mode="after")
    def _one_listener(self) -> SetListenerWeightsParams:
        by_name = self.load_balancer is not None or self.port is not None
        if self.listener_arn and by_name:
            raise ValueError("either listener_arn or load_balancer with port, found both")
        if not self.listener_arn and (self.load_balancer is None or self.port is None):
            raise ValueError("listener_arn, or load_balancer together with port, found neither")
        for tg, w in self.weights.items():
            if not 0 <= w <= 999:
                raise ValueError(f"weights between 0 and 999, found {tg}: {w}")
        return self


def tg_name(arn: str) -> str:
    """arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID -> NAME."""
    parts = arn.split(":")[-1].split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "targetgroup" else arn


def _forward_groups(action: dict[str, Any]) -> list[dict[str, Any]]:
    groups = (action.get("ForwardConfig") or {}).get("TargetGroups")
    if groups:
        return groups
    if action.get("TargetGroupArn"):  # the short form: one group, all traffic
        return [{"TargetGroupArn": action["TargetGroupArn"], "Weight": 1}]
    return []


class SetListenerWeights(Action):
    """Set the weights of a listener's default forward action (e.g. blue 100/green 0 -> 0/100)."""

    name = "aws.elbv2.set_listener_weights"
    Params = SetListenerWeightsParams
    summary = "Shift an ALB listener's traffic between target groups by weight."
    p: SetListenerWeightsParams
    blocking = True

    def plan(self) -> list[PlannedCall]:
        calls: list[PlannedCall] = []
        listener = self.p.listener_arn
        if listener is None:
            calls += [
                PlannedCall(
                    "elbv2",
                    "describe_load_balancers",
                    {"Names": [self.p.load_balancer]},
                    "read: the load balancer's ARN",
                ),
                PlannedCall(
                    "elbv2",
                    "describe_listeners",
                    {"LoadBalancerArn": f"<arn of {self.p.load_balancer}>"},
                    f"read: the listener on port {self.p.port}",
                ),
            ]
            listener = f"<listener of {self.p.load_balancer}:{self.p.port}>"
        else:
            calls.append(
                PlannedCall(
                    "elbv2", "describe_listeners", {"ListenerArns": [listener]}, "read: forward action"
                )
            )
        groups = [{"TargetGroup": tg, "Weight": w} for tg, w in self.p.weights.items()]
        calls.append(
            PlannedCall(
                "elbv2",
                "modify_listener",
                {
                    "ListenerArn": listener,
                    "DefaultActions": [{"Type": "forward", "ForwardConfig": {"TargetGroups": groups}}],
                },
                "other actions, other groups' weights and stickiness unchanged",
            )
        )
        return calls

    # ---- reads -------------------------------------------------------------------------------
    def _listener(self, elb: Any) -> dict[str, Any]:
        if self.p.listener_arn:
            try:
                return elb.describe_listeners(ListenerArns=[self.p.listener_arn])["Listeners"][0]
            except elb.exceptions.ListenerNotFoundException:
                raise ActionError(f"no listener {self.p.listener_arn}", retryable=False) from None
        try:
            lb = elb.describe_load_balancers(Names=[self.p.load_balancer])["LoadBalancers"][0]
        except elb.exceptions.LoadBalancerNotFoundException:
            raise ActionError(f"no load balancer named {self.p.load_balancer}", retryable=False) from None
        listeners = elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
        for listener in listeners:
            if listener.get("Port") == self.p.port:
                return listener
        ports = ", ".join(str(x.get("Port")) for x in listeners) or "none"
        raise ActionError(
            f"load balancer {self.p.load_balancer} has no listener on port {self.p.port} (ports: {ports})",
            retryable=False,
        )

    def _forward(self, listener: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        for i, action in enumerate(listener.get("DefaultActions", [])):
            if action.get("Type") == "forward":
                return i, _forward_groups(action)
        raise ActionError(
            f"listener {listener['ListenerArn']} has no forward default action", retryable=False
        )

    def _resolve(self, groups: list[dict[str, Any]]) -> dict[str, int]:
        """Our weights keyed by the ARNs in the forward action; unknown groups are an error."""
        by_key: dict[str, str] = {}
        for g in groups:
            by_key[g["TargetGroupArn"]] = g["TargetGroupArn"]
            by_key.setdefault(tg_name(g["TargetGroupArn"]), g["TargetGroupArn"])
        missing = [tg for tg in self.p.weights if tg not in by_key]
        if missing:
            known = ", ".join(tg_name(g["TargetGroupArn"]) for g in groups) or "none"
            raise ActionError(
                f"target group(s) {', '.join(missing)} not in the listener's forward action "
                f"(it forwards to: {known})",
                retryable=False,
            )
        return {by_key[tg]: w for tg, w in self.p.weights.items()}

    def _state(self, ctx: ActionContext) -> tuple[dict[str, Any], int, list[dict[str, Any]], dict[str, int]]:
        listener = self._listener(ctx.aws("elbv2"))
        idx, groups = self._forward(listener)
        return listener, idx, groups, self._resolve(groups)

    async def check(self, ctx: ActionContext) -> bool:
        _, _, groups, want = await in_action_pool(self._state, ctx)
        have = {g["TargetGroupArn"]: g.get("Weight", 1) for g in groups}
        return all(have[arn] == w for arn, w in want.items())

    # ---- the change --------------------------------------------------------------------------
    def _apply(self, ctx: ActionContext) -> str:
        elb = ctx.aws("elbv2")
        listener, idx, groups, want = self._state(ctx)
        actions = copy.deepcopy(listener["DefaultActions"])
        forward = actions[idx]
        new_groups = [{**g, "Weight": want.get(g["TargetGroupArn"], g.get("Weight", 1))} for g in groups]
        config = dict(forward.get("ForwardConfig") or {})
        config["TargetGroups"] = new_groups
        forward["ForwardConfig"] = config  # keeps TargetGroupStickinessConfig as it was
        forward.pop("TargetGroupArn", None)  # the short form cannot carry more than one group
        arn = listener["ListenerArn"]
        ctx.record(
            "api_call",
            "elbv2.modify_listener forward weights",
            {"listener": arn, "weights": {tg_name(a): w for a, w in want.items()}},
        )
        elb.modify_listener(ListenerArn=arn, DefaultActions=actions)
        before = ", ".join(f"{tg_name(g['TargetGroupArn'])}={g.get('Weight', 1)}" for g in groups)
        after = ", ".join(f"{tg_name(g['TargetGroupArn'])}={g['Weight']}" for g in new_groups)
        where = f"{self.p.load_balancer}:{self.p.port}" if self.p.load_balancer else arn
        return f"listener {where} weights {before} -> {after}"

    async def apply(self, ctx: ActionContext) -> str:
        return await in_action_pool(self._apply, ctx)
