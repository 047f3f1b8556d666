"""RDS and Aurora: move the writer, or promote a read replica.

Aurora's `failover_db_cluster` is the fast path (under a minute); promoting a cross-region
read replica is the slow, one-way path for losing a whole region. Both wait for the new
writer, because the application tier must not be pointed at a database that cannot take writes.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from controller.durations import Duration
from playbooks.actions.base import Action, ActionContext, ActionError, PlannedCall, in_action_pool
from probes.base import Strict


class FailoverClusterParams(Strict):
    cluster: str = Field(description="DBClusterIdentifier.")
    target_instance: str = Field(description="The instance that must become the writer.")
    wait_timeout: Duration | None = Field(
        default=None,
        gt=0,
        description="How long to wait for the new writer; by default what is left of the step's timeout.",
    )


def _cluster(rds: Any, cluster: str) -> dict[str, Any]:
    try:
        clusters = rds.describe_db_clusters(DBClusterIdentifier=cluster)["DBClusters"]
    except rds.exceptions.DBClusterNotFoundFault:
        raise ActionError(f"no DB cluster named {cluster}", retryable=False) from None
    return clusters[0]


def _writer(cluster: dict[str, Any]) -> str | None:
    return next(
        (m["DBInstanceIdentifier"] for m in cluster.get("DBClusterMembers", []) if m["IsClusterWriter"]), None
    )


class FailoverDbCluster(Action):
    """Aurora: make a named instance the cluster's writer."""

    name = "aws.rds.failover_db_cluster"
    Params = FailoverClusterParams
    summary = "Fail an Aurora cluster over to a named instance and wait until it is the writer."
    p: FailoverClusterParams
    blocking = True
    wait_params = ("wait_timeout",)

    def plan(self) -> list[PlannedCall]:
        return [
            PlannedCall(
                "rds", "describe_db_clusters", {"DBClusterIdentifier": self.p.cluster}, "read: current writer"
            ),
            PlannedCall(
                "rds",
                "failover_db_cluster",
                {"DBClusterIdentifier": self.p.cluster, "TargetDBInstanceIdentifier": self.p.target_instance},
            ),
            PlannedCall(
                "rds",
                "describe_db_clusters",
                {"DBClusterIdentifier": self.p.cluster},
                f"poll until {self.p.target_instance} is the writer and the cluster is available",
            ),
        ]

    async def check(self, ctx: ActionContext) -> bool:
        cluster = await in_action_pool(_cluster, ctx.aws("rds"), self.p.cluster)
        return _writer(cluster) == self.p.target_instance and cluster.get("Status") == "available"

    def _apply(self, ctx: ActionContext) -> str:
        rds = ctx.aws("rds")
        cluster = _cluster(rds, self.p.cluster)
        members = [m["DBInstanceIdentifier"] for m in cluster.get("DBClusterMembers", [])]
        if self.p.target_instance not in members:
            raise ActionError(
                f"{self.p.target_instance} is not a member of {self.p.cluster} "
                f"(members: {', '.join(members) or 'none'})",
                retryable=False,
            )
        before = _writer(cluster)
        ctx.record(
            "api_call",
            "rds.failover_db_cluster",
            {"cluster": self.p.cluster, "target": self.p.target_instance, "writer_before": before},
        )
        wait = ctx.budget(self.p.wait_timeout, 300.0)
        rds.failover_db_cluster(
            DBClusterIdentifier=self.p.cluster, TargetDBInstanceIdentifier=self.p.target_instance
        )
        start = time.monotonic()
        while True:
            cluster = _cluster(rds, self.p.cluster)
            if _writer(cluster) == self.p.target_instance and cluster.get("Status") == "available":
                break
            if time.monotonic() - start > wait:
                raise ActionError(
                    f"{self.p.target_instance} not the writer of {self.p.cluster} after "
                    f"{wait:.3g}s (status {cluster.get('Status')})"
                )
            time.sleep(ctx.poll_interval)
        return (
            f"writer of {self.p.cluster} moved {before} -> {self.p.target_instance} "
            f"in {time.monotonic() - start:.1f}s"
        )

    async def apply(self, ctx: ActionContext) -> str:
        return await in_action_pool(self._apply, ctx)


class PromoteReplicaParams(Strict):
    instance: str = Field(description="The read replica's DBInstanceIdentifier.")
    backup_retention_period: int | None = Field(default=None, ge=0, le=35)


class PromoteReadReplica(Action):
    """RDS: promote a (cross-region) read replica to a standalone writer. One-way."""

    name = "aws.rds.promote_read_replica"
    Params = PromoteReplicaParams
    summary = "Promote an RDS read replica to a standalone primary (one-way; it reboots)."
    p: PromoteReplicaParams
    blocking = True

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"DBInstanceIdentifier": self.p.instance}
        if self.p.backup_retention_period is not None:
            kwargs["BackupRetentionPeriod"] = self.p.backup_retention_period
        return kwargs

    def plan(self) -> list[PlannedCall]:
        return [
            PlannedCall(
                "rds",
                "describe_db_instances",
                {"DBInstanceIdentifier": self.p.instance},
                "read: is it still a replica?",
            ),
            PlannedCall("rds", "promote_read_replica", self._kwargs()),
        ]

    def _instance(self, ctx: ActionContext) -> dict[str, Any]:
        rds = ctx.aws("rds")
        try:
            return rds.describe_db_instances(DBInstanceIdentifier=self.p.instance)["DBInstances"][0]
        except rds.exceptions.DBInstanceNotFoundFault:
            raise ActionError(f"no DB instance named {self.p.instance}", retryable=False) from None

    async def check(self, ctx: ActionContext) -> bool:
        inst = await in_action_pool(self._instance, ctx)
        return not inst.get("ReadReplicaSourceDBInstanceIdentifier")

    def _apply(self, ctx: ActionContext) -> str:
        inst = self._instance(ctx)
        source = inst.get("ReadReplicaSourceDBInstanceIdentifier") or "none"
        ctx.record("api_call", "rds.promote_read_replica", self._kwargs())
        resp = ctx.aws("rds").promote_read_replica(**self._kwargs())["DBInstance"]
        return (
            f"promotion of {self.p.instance} (replica of {source}) accepted; "
            f"status {resp.get('DBInstanceStatus', 'unknown')}"
        )

    async def apply(self, ctx: ActionContext) -> str:
        return await in_action_pool(self._apply, ctx)
