"""Shared fixtures: one moto server for the session, and a freshly seeded AWS world per test."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from controller.demo.environment import create_aurora_cluster
from tests.fakes.awsproxy import AwsProxy

REGION = "eu-west-1"


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"
    finally:
        server.stop()


def aws_client(service: str, endpoint_url: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@dataclass
class World:
    """What one test owns on the shared moto server; every name carries the test's own suffix."""

    moto_url: str
    zone: str
    """Zone name, e.g. shop-1a2b3c4d.example. (unique: zone lookup by name must find this one)."""
    zone_id: str
    www: str
    """The weighted record's name."""
    cluster: str
    writer: str
    standby: str
    source_db: str
    replica_db: str

    def r53(self) -> Any:
        return aws_client("route53", self.moto_url)

    def rds(self) -> Any:
        return aws_client("rds", self.moto_url)

    def a_record(self, name: str | None = None) -> list[str]:
        name = name or self.zone
        sets = self.r53().list_resource_record_sets(
            HostedZoneId=self.zone_id, StartRecordName=name, StartRecordType="A"
        )["ResourceRecordSets"]
        rr = next(r for r in sets if r["Name"] == name and r["Type"] == "A" and "SetIdentifier" not in r)
        return [v["Value"] for v in rr["ResourceRecords"]]

    def weights(self) -> dict[str, int]:
        sets = self.r53().list_resource_record_sets(
            HostedZoneId=self.zone_id, StartRecordName=self.www, StartRecordType="A"
        )["ResourceRecordSets"]
        return {r["SetIdentifier"]: r["Weight"] for r in sets if r["Name"] == self.www and "Weight" in r}

    def cluster_writer(self) -> str | None:
        cluster = self.rds().describe_db_clusters(DBClusterIdentifier=self.cluster)["DBClusters"][0]
        return next(
            (m["DBInstanceIdentifier"] for m in cluster["DBClusterMembers"] if m["IsClusterWriter"]), None
        )


@pytest.fixture
def world(moto_url: str) -> World:
    tag = uuid.uuid4().hex[:8]
    zone = f"shop-{tag}.example."
    r53 = aws_client("route53", moto_url)
    zone_id = r53.create_hosted_zone(Name=zone, CallerReference=f"tests-{tag}")["HostedZone"]["Id"]
    zone_id = zone_id.removeprefix("/hostedzone/")
    www = f"www.{zone}"

    def weighted(sid: str, weight: int, ip: str) -> dict[str, Any]:
        return {
            "Action": "CREATE",
            "ResourceRecordSet": {
                "Name": www,
                "Type": "A",
                "SetIdentifier": sid,
                "Weight": weight,
                "TTL": 30,
                "ResourceRecords": [{"Value": ip}],
            },
        }

    r53.change_resource_record_sets(
        HostedZoneId=zone_id,
        ChangeBatch={
            "Changes": [
                {
                    "Action": "CREATE",
                    "ResourceRecordSet": {
                        "Name": zone,
                        "Type": "A",
                        "TTL": 60,
                        "ResourceRecords": [{"Value": "127.0.0.2"}],
                    },
                },
                weighted("primary", 100, "127.0.0.2"),
                weighted("secondary", 0, "127.0.0.3"),
            ]
        },
    )
    rds = aws_client("rds", moto_url)
    cluster = f"db-{tag}"
    writer, standby = f"{cluster}-a", f"{cluster}-b"
    create_aurora_cluster(rds, cluster, [writer, standby])
    source, replica = f"orders-{tag}", f"orders-{tag}-replica"
    rds.create_db_instance(
        DBInstanceIdentifier=source,
        Engine="postgres",
        DBInstanceClass="db.t3.micro",
        AllocatedStorage=20,
        MasterUsername="shop",
        MasterUserPassword="test-password-1",
    )
    rds.create_db_instance_read_replica(
        DBInstanceIdentifier=replica, SourceDBInstanceIdentifier=source, DBInstanceClass="db.t3.micro"
    )
    w = World(moto_url, zone, zone_id, www, cluster, writer, standby, source, replica)
    assert w.cluster_writer() == writer, "the first instance created should be the writer"
    return w


@pytest.fixture
def proxy(moto_url: str) -> Iterator[AwsProxy]:
    with AwsProxy(moto_url) as p:
        yield p


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sim-seed",
        type=int,
        default=None,
        help="Replay one simulation scenario (tests/test_simulation.py) by its seed.",
    )


@pytest.fixture
def sim_seed(request: pytest.FixtureRequest) -> int | None:
    """--sim-seed N, or CONTINUITY_SIM_SEED=N: run only that seeded scenario."""
    seed = request.config.getoption("--sim-seed")
    if seed is None and os.environ.get("CONTINUITY_SIM_SEED"):
        seed = int(os.environ["CONTINUITY_SIM_SEED"])
    return seed
