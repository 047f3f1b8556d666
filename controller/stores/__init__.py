"""State stores: the model and protocol (`model`), the SQLite backend (`sqlite`) and the Kubernetes
backend (`kube`). `open_store` picks one from the config; the backends never import each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.stores.model import (
    FAILOVER_STATES,
    Event,
    FailoverRecord,
    Incident,
    OutboxMessage,
    Run,
    StepRecord,
    Store,
    StoreError,
    new_id,
    new_incident,
)
from controller.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from controller.config import Config

__all__ = [
    "FAILOVER_STATES",
    "Event",
    "FailoverRecord",
    "Incident",
    "OutboxMessage",
    "Run",
    "SQLiteStore",
    "StepRecord",
    "Store",
    "StoreError",
    "new_id",
    "new_incident",
    "open_store",
]


def open_store(cfg: Config, data_dir_override: str | None = None, *, cache: bool = False) -> Store:
    """The store the config asks for: SQLite in the data directory (``data_dir_override`` wins over
    ``controller.data_dir``), or Kubernetes objects in ``store.namespace`` with the in-cluster
    service account when running in a pod (KUBERNETES_SERVICE_HOST set), else the kubeconfig.
    ``cache``: the Kubernetes store keeps a resynced read cache (the long-running controller, whose
    every tick reads; a one-shot CLI command reads once and wants no background thread)."""
    if cfg.store.backend == "sqlite":
        return SQLiteStore(data_dir_override or cfg.controller.data_dir)

    import os

    from kubernetes import client, config

    from controller.stores.kube import KubernetesStore

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api = client.ApiClient(configuration)
        else:
            api = config.new_client_from_config()
    except (config.ConfigException, OSError) as exc:
        raise StoreError(f"kubernetes store: no usable cluster credentials: {exc}") from None
    # The chart sets POD_NAMESPACE (downward API): the Lease and the objects share the pod's namespace.
    namespace = cfg.store.namespace or os.environ.get("POD_NAMESPACE") or cfg.store.resolved_namespace()
    return KubernetesStore(api, namespace, cache=cache)
