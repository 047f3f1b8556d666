"""The demo's world: moto (Route 53 + Aurora), two regions, the edge, and a PagerDuty receiver.

Everything listens on loopback only. The same environment serves `continuity demo`, the tests
and (later) drills, so what the demo shows is what the tests check.
"""

from __future__ import annotations

import logging
import os
import string
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import boto3

from controller.config import Config, load_config
from controller.demo.marketplace import Edge, Region, serve, shared_port
from controller.demo.pagerduty import PagerDutyReceiver

PRIMARY_IP, SECONDARY_IP = "127.0.0.2", "127.0.0.3"
ZONE = "shop.example."
CLUSTER = "marketplace-db"
WRITER, STANDBY = "marketplace-db-euw1", "marketplace-db-euc1"
PD_KEY = "demo0routing0key0000000000000000"  # 32 characters, as PagerDuty's integration keys


def create_aurora_cluster(rds: Any, cluster: str, instances: list[str]) -> None:
    """An Aurora cluster whose first instance is the writer (moto: the first one created)."""
    rds.create_db_cluster(
        DBClusterIdentifier=cluster,
        Engine="aurora-postgresql",
        MasterUsername="shop",
        MasterUserPassword="not-a-real-password-1",
    )
    for ident in instances:
        rds.create_db_instance(
            DBInstanceIdentifier=ident,
            DBClusterIdentifier=cluster,
            Engine="aurora-postgresql",
            DBInstanceClass="db.r6g.large",
        )


class DemoEnvironment:
    """Async context manager; after entering, `config_path`, `config` and the parts are ready."""

    def __init__(self, data_dir: str | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="continuity-demo-")
            data_dir = self._tmp.name
        self.workdir = Path(data_dir)
        self.primary = Region("eu-west-1", PRIMARY_IP)
        self.secondary = Region("eu-central-1", SECONDARY_IP)
        self.pagerduty = PagerDutyReceiver()
        self._runners: list[Any] = []
        self.moto: Any = None
        self.edge: Edge | None = None

    # ---------------------------------------------------------------- AWS

    def aws(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.moto_url,
            region_name="eu-west-1",
            aws_access_key_id="demo",
            aws_secret_access_key="demo",
        )

    def _start_moto(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        self.moto_port = self.moto._server.server_port
        self.moto_url = f"http://127.0.0.1:{self.moto_port}"
        # moto keeps its backends per process, not per server: a second demo world in the same process
        # (drill --all, the tests) would find the first one's Aurora cluster. Start from a clean slate.
        import requests

        requests.post(f"{self.moto_url}/moto-api/reset", timeout=10).raise_for_status()
        # The controller's boto3 finds credentials the usual way; these are moto's, not real ones.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")

    def _seed_aws(self) -> None:
        r53 = self.aws("route53")
        zone_id = r53.create_hosted_zone(Name=ZONE, CallerReference="continuity-demo")["HostedZone"]["Id"]
        self.zone_id = zone_id
        r53.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={
                "Changes": [
                    {
                        "Action": "CREATE",
                        "ResourceRecordSet": {
                            "Name": ZONE,
                            "Type": "A",
                            "TTL": 1,
                            "ResourceRecords": [{"Value": PRIMARY_IP}],
                        },
                    }
                ]
            },
        )
        create_aurora_cluster(self.aws("rds"), CLUSTER, [WRITER, STANDBY])

    def record(self) -> tuple[str, int]:
        """What a shopper's resolver gets for the shop's name right now: (address, TTL)."""
        sets = self.aws("route53").list_resource_record_sets(
            HostedZoneId=self.zone_id, StartRecordName=ZONE, StartRecordType="A"
        )["ResourceRecordSets"]
        rr = next(r for r in sets if r["Name"] == ZONE and r["Type"] == "A")
        return rr["ResourceRecords"][0]["Value"], int(rr.get("TTL", 60))

    def writer(self) -> str | None:
        cluster = self.aws("rds").describe_db_clusters(DBClusterIdentifier=CLUSTER)["DBClusters"][0]
        return next(
            (m["DBInstanceIdentifier"] for m in cluster["DBClusterMembers"] if m["IsClusterWriter"]), None
        )

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> DemoEnvironment:
        self._start_moto()
        self._seed_aws()
        self.region_port = shared_port([PRIMARY_IP, SECONDARY_IP])
        for region in (self.primary, self.secondary):
            runner, _ = await serve(region.app(), region.host, self.region_port)
            self._runners.append(runner)
        self.edge = Edge(self.record, self.region_port)
        runner, self.edge_port = await serve(self.edge.app(), "127.0.0.1", 0)
        self._runners.append(runner)
        runner, self.pd_port = await serve(self.pagerduty.app(), "127.0.0.1", 0)
        self._runners.append(runner)
        os.environ["CONTINUITY_DEMO_PD_KEY"] = PD_KEY
        self.config_path = self.workdir / "continuity-demo.yaml"
        template = resources.files("controller.demo").joinpath("config.yaml").read_text(encoding="utf-8")
        text = string.Template(template).safe_substitute(
            edge_port=self.edge_port,
            region_port=self.region_port,
            pd_port=self.pd_port,
            moto_port=self.moto_port,
            data_dir=str(self.workdir / "state"),
        )
        self.config_path.write_text(text, encoding="utf-8")
        self.config: Config = load_config(self.config_path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.edge is not None:
            await self.edge.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self.moto is not None:
            self.moto.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
