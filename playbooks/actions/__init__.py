"""The registry of playbook actions, by the name used in playbook YAML."""

from __future__ import annotations

from playbooks.actions.aws_elbv2 import SetListenerWeights
from playbooks.actions.aws_rds import FailoverDbCluster, PromoteReadReplica
from playbooks.actions.aws_route53 import SetWeights, SwitchRecord
from playbooks.actions.base import Action, ActionContext, ActionError, PlannedCall
from playbooks.actions.flow import Notify, Wait, WaitHealthy
from playbooks.actions.kubernetes import Patch, RolloutRestart, Scale
from playbooks.actions.webhook import Http

ACTIONS: dict[str, type[Action]] = {
    a.name: a
    for a in (
        SwitchRecord,
        SetWeights,
        SetListenerWeights,
        FailoverDbCluster,
        PromoteReadReplica,
        Scale,
        Patch,
        RolloutRestart,
        Http,
        WaitHealthy,
        Wait,
        Notify,
    )
}

__all__ = ["ACTIONS", "Action", "ActionContext", "ActionError", "PlannedCall"]
