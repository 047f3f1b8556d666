"""boto3 clients built from the config's aws section.

botocore's own retries are off (one attempt): the playbook engine retries with tenacity, so that
every attempt is visible in the incident timeline and retries do not multiply across layers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from controller.config import Aws


def client_factory(cfg: Aws) -> Callable[[str], Any]:
    clients: dict[str, Any] = {}
    lock = threading.Lock()
    boto_cfg = BotoConfig(
        region_name=cfg.region,
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        # total_max_attempts counts the first request; botocore's max_attempts counts retries only.
        retries={"total_max_attempts": 1, "mode": "standard"},
    )

    def get(service: str) -> Any:
        with lock:
            if service not in clients:
                session = boto3.session.Session()
                clients[service] = session.client(service, endpoint_url=cfg.endpoint_url, config=boto_cfg)
            return clients[service]

    return get
