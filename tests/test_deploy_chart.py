"""The deploy/ directory: Helm chart, plain manifests, dashboard, alert rules and Dockerfile.

Nothing here touches a network or a cluster. The chart is rendered by helm-python-sdk (Helm's Go
SDK, embedded) and every rendered object is checked against the real Kubernetes OpenAPI schemas by
kubernetes-validate in strict mode, which rejects misspelled or misplaced fields, the mistakes a
template most often makes. Kinds with no bundled schema (ServiceMonitor, PrometheusRule) and the
parts of CRDs that the schema cannot judge (structural schema rules, printer columns) are checked
by hand. Both libraries are test dependencies: if they are missing the import fails and so does
this module. Skipping would let a broken chart pass CI.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "continuity"
KUBE_VERSION = "1.30.0"
RELEASE = "shop"
NAMESPACE = "continuity-system"


HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Kinds kubernetes-validate has no schema for; checked structurally below instead.
UNSCHEMAED_KINDS = {"ServiceMonitor", "PrometheusRule"}

PLAYBOOK_VALUES: dict[str, Any] = {
    "replicas": 3,
    "serviceMonitor": {"enabled": False},
    "secretEnv": [{"name": "PD_ROUTING_KEY", "secretName": "continuity-secrets", "key": "pd"}],
    "apiToken": {"secretName": "continuity-api"},
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    ],
    "networkPolicy": {
        "egress": {"cidrs": [{"cidr": "10.20.0.0/16", "ports": [{"port": 80, "protocol": "TCP"}]}]}
    },
    "rbac": {
        "playbookRules": [
            {
                "apiGroups": ["apps"],
                "resources": ["deployments/scale"],
                "resourceNames": ["web"],
                "verbs": ["get", "patch"],
                "namespaces": ["shop-eu", "shop-us"],
            },
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"], "scope": "cluster"},
        ]
    },
}


@functools.cache
def live_metrics() -> frozenset[str]:
    """The metric families a running controller exposes: `continuity run` started as a process, its
    /metrics read and parsed. The rules and the dashboard are checked against this, so a metric that
    nothing exports (or a renamed one) fails here rather than as a silent alert in production."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.test_cluster import Proc, child_env, until

    tmp = Path(tempfile.mkdtemp(prefix="continuity-metrics-"))
    cfg = tmp / "continuity.yaml"
    cfg.write_text(
        f"""
services:
  shop: {{tier: critical, rto: 5m, probes: [web], playbook: recover}}
probes:
  web: {{kind: http, url: "http://127.0.0.1:9/web", interval: 200ms, timeout: 1s}}
playbooks:
  recover: {{steps: [{{name: hold, action: wait, with: {{duration: 1s}}}}]}}
notifiers:
  pagerduty: {{routing_key_env: PD_ROUTING_KEY}}
controller: {{data_dir: "{tmp / "state"}", tick: 100ms}}
leader: {{backend: file}}
""",
        encoding="utf-8",
    )
    proc = Proc("metrics", cfg, {**child_env(), "PD_ROUTING_KEY": "k"}, tmp)
    try:
        until(proc.ready, 20, "the controller to serve /healthz")
        until(lambda: proc.leader(), 10, "the controller to lead")
        body = proc.get("/metrics")[1]
    finally:
        proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return frozenset(f.name for f in text_string_to_metric_families(body) if f.name.startswith("continuity_"))


def metric_base(name: str) -> str:
    """A series name as written in PromQL, back to its family (histograms and counters)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in live_metrics():
            return name.removesuffix(suffix)
    if name.endswith("_total") and name.removesuffix("_total") in live_metrics():
        return name.removesuffix("_total")  # the parser names a counter family without _total
    return name


def _load_render_module() -> Any:
    """Import deploy/render.py (deploy/ is not a package) so the test renders as the script does."""
    spec = importlib.util.spec_from_file_location("continuity_deploy_render", DEPLOY / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_mod = _load_render_module()


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All objects for ``values``, CRDs included, as the chart renders them."""
    return render_mod.render_objects(values, name=RELEASE, namespace=NAMESPACE)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of ``kind``; fails loudly when there is not exactly one."""
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    """The chart with default values (rendered once; the Go SDK is fast but not free)."""
    return render()


@pytest.fixture(scope="module")
def playbook_objects() -> list[dict[str, Any]]:
    """The chart with 3 replicas, no ServiceMonitor and extra playbook RBAC rules."""
    return render(PLAYBOOK_VALUES)


# ---------------------------------------------------------------- schema validation


def check_structural_schema(schema: dict[str, Any], path: str = "openAPIV3Schema") -> None:
    """Enforce the apiserver's structural-schema rules that a JSON schema cannot express.

    Every node needs a type unless it preserves unknown fields or is int-or-string, and arrays
    need items; otherwise the apiserver rejects the CRD at install time.
    """
    special = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string")
    assert "type" in schema or special, f"{path}: no type"
    if schema.get("type") == "array":
        assert "items" in schema, f"{path}: array without items"
        check_structural_schema(schema["items"], f"{path}.items")
    for name, sub in schema.get("properties", {}).items():
        check_structural_schema(sub, f"{path}.{name}")


def check_crd(crd: dict[str, Any]) -> None:
    """What the CRD schema does not check: names, one storage version, printer columns."""
    spec = crd["spec"]
    assert spec["group"] == "continuity.dev"
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["scope"] == "Namespaced"
    versions = spec["versions"]
    assert [v["name"] for v in versions] == ["v1alpha1"]
    assert sum(v["storage"] for v in versions) == 1
    for version in versions:
        schema = version["schema"]["openAPIV3Schema"]
        check_structural_schema(schema)
        spec_props = schema["properties"]["spec"]["properties"]
        for column in version["additionalPrinterColumns"]:
            match = re.fullmatch(r"\.spec\.(\w+)", column["jsonPath"])
            if match:  # a column on a spec field the schema does not declare is always empty
                assert match.group(1) in spec_props, column


def check_service_monitor(sm: dict[str, Any]) -> None:
    """ServiceMonitor has no bundled schema: check the fields the operator needs."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = sm["spec"]
    assert spec["selector"]["matchLabels"]
    assert spec["namespaceSelector"]["matchNames"] == [sm["metadata"]["namespace"]]
    assert spec["endpoints"] and all(
        e["port"] == "http" and e["path"] == "/metrics" for e in spec["endpoints"]
    )
    allowed = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels"}
    assert set(spec) <= allowed, set(spec) - allowed


def alert_rules(rule: dict[str, Any]) -> list[dict[str, Any]]:
    """Every alerting rule of a PrometheusRule."""
    return [r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r]


def check_prometheus_rule(rule: dict[str, Any]) -> None:
    """PrometheusRule has no bundled schema: check groups, expressions and alert metadata."""
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    for r in alert_rules(rule):
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r["alert"])
        assert isinstance(r["expr"], str) and r["expr"].strip(), r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert r["annotations"]["description"].strip(), r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        used = {metric_base(m) for m in re.findall(r"continuity_[a-z_]+", r["expr"])}
        assert used and used <= live_metrics(), (r["alert"], used - live_metrics())


def validate_all(objects: list[dict[str, Any]]) -> None:
    """Validate every object: kubernetes-validate strict where a schema exists, by hand otherwise."""
    assert objects
    for obj in objects:
        if obj["kind"] in UNSCHEMAED_KINDS:
            {"ServiceMonitor": check_service_monitor, "PrometheusRule": check_prometheus_rule}[obj["kind"]](
                obj
            )
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        if obj["kind"] == "CustomResourceDefinition":
            check_crd(obj)


def test_default_values_render_valid_objects(default_objects: list[dict[str, Any]]) -> None:
    """Defaults render the full set, every object valid for Kubernetes 1.30."""
    kinds = sorted(o["kind"] for o in default_objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            # incidents, playbookruns, outboxmessages, continuitystates, failoverstates
            *["CustomResourceDefinition"] * 5,
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )
    validate_all(default_objects)
    for obj in default_objects:
        if obj["kind"] != "CustomResourceDefinition":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


def test_playbook_values_render_valid_objects(playbook_objects: list[dict[str, Any]]) -> None:
    """Non-default values: 3 replicas, ServiceMonitor off, playbook RBAC in other namespaces."""
    validate_all(playbook_objects)
    assert one(playbook_objects, "Deployment")["spec"]["replicas"] == 3
    assert not by_kind(playbook_objects, "ServiceMonitor")
    assert by_kind(playbook_objects, "PrometheusRule")


def test_strict_validation_catches_a_misspelled_field() -> None:
    """Guard the guard: strict mode really rejects an unknown field, so passing means something."""
    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


# ---------------------------------------------------------------- the Deployment


def test_pod_security(default_objects: list[dict[str, Any]]) -> None:
    """Non-root uid 10001, read-only root, no escalation, no capabilities, RuntimeDefault seccomp."""
    pod = one(default_objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc or sc["privileged"] is False
    # Writable paths are emptyDirs, since the root filesystem is read-only.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/lib/continuity", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]], path
    assert volumes[mounts["/etc/continuity"]]["configMap"]["name"] == f"{RELEASE}-continuity-config"
    assert not any("subPath" in m for m in container["volumeMounts"]), "subPath blocks config reloads"


def test_deployment_runtime_contract(default_objects: list[dict[str, Any]]) -> None:
    """Args, port, probes, Lease env, rollout strategy and the config checksum."""
    deployment = one(default_objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    pod = spec["template"]["spec"]
    assert 20 <= pod["terminationGracePeriodSeconds"] <= 60
    assert pod["serviceAccountName"] == f"{RELEASE}-continuity"
    (container,) = pod["containers"]
    assert container["args"][:3] == ["run", "-c", "/etc/continuity/config.yaml"]
    assert "--listen" in container["args"] and "0.0.0.0:8080" in container["args"]
    assert "--data-dir" in container["args"] and "/var/lib/continuity" in container["args"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert env["CONTINUITY_LEASE_NAME"]["value"] == f"{RELEASE}-leader"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    token = env["CONTINUITY_API_TOKEN"]["valueFrom"]["secretKeyRef"]  # required: pushes need it
    assert token == {"name": f"{RELEASE}-continuity-api-token", "key": "api-token", "optional": False}
    assert "limits" in container["resources"] and "requests" in container["resources"]
    assert re.fullmatch(r"[0-9a-f]{64}", spec["template"]["metadata"]["annotations"]["checksum/config"])


def test_secrets_only_by_reference(playbook_objects: list[dict[str, Any]]) -> None:
    """Secret env vars come from secretKeyRef; the ConfigMap names variables, never values."""
    container = one(playbook_objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["PD_ROUTING_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "continuity-secrets", "key": "pd"}
    assert env["CONTINUITY_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "continuity-api"
    assert not by_kind(playbook_objects, "Secret")
    config = yaml.safe_load(one(playbook_objects, "ConfigMap")["data"]["config.yaml"])
    assert config["notifiers"]["pagerduty"] == {"routing_key_env": "PD_ROUTING_KEY"}


def test_config_change_rolls_the_pods() -> None:
    """A different config gives a different checksum (and so a rollout); opting out removes it."""

    def checksum(values: dict[str, Any]) -> str | None:
        pod_meta = one(render(values), "Deployment")["spec"]["template"]["metadata"]
        return pod_meta.get("annotations", {}).get("checksum/config")

    base = checksum({})
    changed = checksum({"config": {"detection": {"failure_threshold": 5}}})
    assert base and changed and base != changed
    assert checksum({"rollOnConfigChange": False}) is None


def test_anti_affinity_and_spread(
    default_objects: list[dict[str, Any]], playbook_objects: list[dict[str, Any]]
) -> None:
    """Replicas prefer different zones by default; spread constraints get the selector filled in."""
    pod = one(default_objects, "Deployment")["spec"]["template"]["spec"]
    preferred = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    zone_terms = [
        t for t in preferred if t["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"
    ]
    assert zone_terms and zone_terms[0]["weight"] == 100
    selector = one(default_objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert zone_terms[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAntiAffinity"]
    assert "topologySpreadConstraints" not in pod

    (tsc,) = one(playbook_objects, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert tsc["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE

    hard = one(render({"podAntiAffinity": "hard"}), "Deployment")["spec"]["template"]["spec"]["affinity"]
    (term,) = hard["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "topology.kubernetes.io/zone"


def test_pod_disruption_budget(default_objects: list[dict[str, Any]]) -> None:
    """minAvailable 1 with a standby; no PDB for a single replica (it would block node drains)."""
    pdb = one(default_objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == one(default_objects, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert not by_kind(render({"replicas": 1}), "PodDisruptionBudget")


def test_service(default_objects: list[dict[str, Any]]) -> None:
    """Two Services, one port each, 8080, named http: every replica (metrics, health, reads) and the
    leader only (pushes), which selects the label the leader puts on its own pod."""
    services = {s["metadata"]["name"]: s for s in by_kind(default_objects, "Service")}
    assert set(services) == {f"{RELEASE}-continuity", f"{RELEASE}-continuity-leader"}
    selector = one(default_objects, "Deployment")["spec"]["selector"]["matchLabels"]
    for service in services.values():
        assert service["spec"]["ports"] == [
            {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
        ]
    assert services[f"{RELEASE}-continuity"]["spec"]["selector"] == selector
    push = services[f"{RELEASE}-continuity-leader"]
    assert push["spec"]["selector"] == {**selector, "continuity.dev/role": "leader"}
    assert push["metadata"]["labels"]["continuity.dev/service"] == "push"


def test_defaults_are_highly_available(default_objects: list[dict[str, Any]]) -> None:
    """Default values: a Lease (named by the release, with leaderElection's timings) and the
    Kubernetes store in the ConfigMap, and the env the controller needs to refuse per-pod state and
    to label its pod."""
    config = yaml.safe_load(one(default_objects, "ConfigMap")["data"]["config.yaml"])
    assert config["leader"] == {
        "backend": "kubernetes",
        "lease_name": f"{RELEASE}-leader",
        "lease_duration": "15s",
        "renew_deadline": "10s",
        "retry_period": "2s",
    }
    assert config["store"] == {"backend": "kubernetes"}
    container = one(default_objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CONTINUITY_REPLICAS"] == "2"
    assert (
        env["CONTINUITY_POD_SELECTOR"]
        == f"app.kubernetes.io/name=continuity,app.kubernetes.io/instance={RELEASE}"
    )
    # A config with its own sections keeps them (and the controller then judges them at start).
    own = render(
        {
            "config": {
                **yaml.safe_load(one(default_objects, "ConfigMap")["data"]["config.yaml"]),
                "leader": {"backend": "file"},
                "store": {"backend": "sqlite"},
            }
        }
    )
    mine = yaml.safe_load(one(own, "ConfigMap")["data"]["config.yaml"])
    # Helm deep-merges a values file's maps into the defaults: the example must not leak into yours.
    yours = {"services": {"search": {"tier": "important", "rto": "15m", "probes": ["search-api"]}}}
    rendered = yaml.safe_load(one(render({"config": yours}), "ConfigMap")["data"]["config.yaml"])
    assert set(rendered) == {"services", "leader", "store"} and set(rendered["services"]) == {"search"}
    assert mine["leader"] == {"backend": "file"} and mine["store"] == {"backend": "sqlite"}


# ---------------------------------------------------------------- RBAC


def all_rules(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(role, rule) for every rule of every Role and ClusterRole."""
    return [(r, rule) for r in objects if r["kind"] in {"Role", "ClusterRole"} for rule in r["rules"]]


@pytest.mark.parametrize("values", [{}, PLAYBOOK_VALUES], ids=["default", "playbooks"])
def test_rbac_has_no_wildcards(values: dict[str, Any]) -> None:
    """No "*" anywhere in verbs, resources, apiGroups or resourceNames."""
    for role, rule in all_rules(render(values)):
        for field in ("verbs", "resources", "apiGroups", "resourceNames"):
            assert not any("*" in v for v in rule.get(field, [])), (role["metadata"]["name"], rule)


def test_default_rbac_is_the_controller_minimum(default_objects: list[dict[str, Any]]) -> None:
    """Leases (namespaced, by name where possible), continuity.dev objects, its own ConfigMap."""
    assert not by_kind(default_objects, "ClusterRole")
    assert not by_kind(default_objects, "ClusterRoleBinding")
    role = one(default_objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    rules = role["rules"]
    lease_rules = [r for r in rules if r["resources"] == ["leases"]]
    assert all(r["apiGroups"] == ["coordination.k8s.io"] for r in lease_rules)
    assert sorted(v for r in lease_rules for v in r["verbs"]) == ["create", "get", "patch", "update"]
    for r in lease_rules:
        if r["verbs"] != ["create"]:  # create cannot be restricted by name in Kubernetes RBAC
            assert r["resourceNames"] == [f"{RELEASE}-leader"]
    (state,) = [r for r in rules if r["apiGroups"] == ["continuity.dev"]]
    assert sorted(state["resources"]) == [
        "continuitystates",
        "failoverstates",
        "incidents",
        "outboxmessages",
        "playbookruns",
    ]
    assert sorted(state["verbs"]) == sorted(["get", "list", "watch", "create", "update", "patch", "delete"])
    (cm,) = [r for r in rules if r["resources"] == ["configmaps"]]
    assert sorted(cm["verbs"]) == ["get", "watch"]
    assert cm["resourceNames"] == [f"{RELEASE}-continuity-config"]
    # The leader labels its own pod; RBAC cannot name it, so: pods of this namespace, no create,
    # delete, exec or other subresource.
    (pods,) = [r for r in rules if "pods" in r["resources"]]
    assert pods == {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]}
    assert len(rules) == 5, "the default Role grants something beyond the controller's needs"
    binding = one(default_objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": one(default_objects, "ServiceAccount")["metadata"]["name"],
            "namespace": NAMESPACE,
        }
    ]


def test_playbook_rules_land_where_asked(playbook_objects: list[dict[str, Any]]) -> None:
    """Namespaced rules go to Roles in the named namespaces; only scope: cluster makes a ClusterRole."""
    roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(playbook_objects, "Role")
    }
    for ns in ("shop-eu", "shop-us"):
        (rule,) = roles[(ns, f"{RELEASE}-continuity-playbooks")]["rules"]
        assert rule == {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": ["web"],
            "verbs": ["get", "patch"],
        }
    own = roles[(NAMESPACE, f"{RELEASE}-continuity")]["rules"]
    assert {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]} in own
    # The Lease stays namespaced whatever the playbooks ask for.
    for role, rule in all_rules(playbook_objects):
        if "leases" in rule["resources"]:
            assert role["kind"] == "Role" and role["metadata"]["namespace"] == NAMESPACE
    (cluster_role,) = by_kind(playbook_objects, "ClusterRole")
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}]
    (crb,) = by_kind(playbook_objects, "ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cluster_role["metadata"]["name"]
    bindings = {
        (b["metadata"]["namespace"], b["roleRef"]["name"]) for b in by_kind(playbook_objects, "RoleBinding")
    }
    assert ("shop-eu", f"{RELEASE}-continuity-playbooks") in bindings
    assert ("shop-us", f"{RELEASE}-continuity-playbooks") in bindings


@pytest.mark.parametrize(
    "rule",
    [
        {"apiGroups": ["apps"], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["*"]},
        {"apiGroups": ["*"], "resources": ["deployments"], "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"], "typo": True},
    ],
    ids=["resources", "verbs", "apiGroups", "unknown-key"],
)
def test_wildcard_or_unknown_playbook_rules_are_refused(rule: dict[str, Any]) -> None:
    """values.schema.json (and a template guard behind it) refuses wildcard and malformed rules."""
    with pytest.raises(helm_python.HelmError):
        render({"rbac": {"playbookRules": [rule]}})


def test_values_schema_rejects_typos() -> None:
    """A misspelled top-level value fails the install instead of being silently ignored."""
    with pytest.raises(helm_python.HelmValuesError):
        render({"replica": 3})


# ---------------------------------------------------------------- network, monitoring, CRDs


def test_network_policy(
    default_objects: list[dict[str, Any]], playbook_objects: list[dict[str, Any]]
) -> None:
    """Ingress only on 8080 from the listed peers; egress DNS, API server, HTTPS, listed CIDRs."""
    policy = one(default_objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
        assert rule["from"], "an ingress rule without peers would allow every source"
    egress_ports = {(p["port"], p["protocol"]) for r in policy["egress"] for p in r["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= egress_ports
    extra = one(playbook_objects, "NetworkPolicy")["spec"]["egress"]
    assert {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "ports": [{"port": 80, "protocol": "TCP"}],
    } in extra


def test_service_monitor_matches_the_service(default_objects: list[dict[str, Any]]) -> None:
    """The ServiceMonitor selects the Service's labels and scrapes the named port."""
    sm = one(default_objects, "ServiceMonitor")
    selector = sm["spec"]["selector"]

    def selected(service: dict[str, Any]) -> bool:
        labels = service["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in selector["matchLabels"].items()):
            return False
        return all(
            e["operator"] == "DoesNotExist" and e["key"] not in labels for e in selector["matchExpressions"]
        )

    picked = [s["metadata"]["name"] for s in by_kind(default_objects, "Service") if selected(s)]
    assert picked == [f"{RELEASE}-continuity"], "every pod scraped once, through the all-replicas Service"


def test_alert_rules_cover_the_controller(default_objects: list[dict[str, Any]]) -> None:
    """No leader, stalled loop, outbox backlog, isolation and config reload failures are alerted on."""
    rule = one(default_objects, "PrometheusRule")
    alerts = {r["alert"]: r for r in alert_rules(rule)}
    assert {
        "ContinuityNoLeader",
        "ContinuityLoopStalled",
        "ContinuityOutboxBacklog",
        "ContinuityOutboxGrowing",
        "ContinuityIsolated",
        "ContinuityConfigReloadFailing",
    } <= set(alerts)
    no_leader = alerts["ContinuityNoLeader"]
    assert "max(continuity_leader" in no_leader["expr"] and "absent(continuity_leader" in no_leader["expr"]
    assert no_leader["for"] == "1m"
    assert "continuity_loop_last_tick_timestamp_seconds" in alerts["ContinuityLoopStalled"]["expr"]
    assert "> 60" in alerts["ContinuityLoopStalled"]["expr"]
    assert "> 300" in alerts["ContinuityOutboxBacklog"]["expr"]
    assert "continuity_isolated" in alerts["ContinuityIsolated"]["expr"]
    assert "continuity_prober_errors_total" in alerts["ContinuityProberErrors"]["expr"]
    assert "continuity_task_restarts_total" in alerts["ContinuityTaskRestarting"]["expr"]
    # Every expression is scoped to this release, so two releases never mask each other.
    for r in alerts.values():
        assert f'namespace="{NAMESPACE}"' in r["expr"], r["alert"]


def test_alert_rules_pass_promtool(default_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    """Prometheus's own checker parses every expression and template (.ci/run installs promtool)."""
    assert shutil.which("promtool"), "promtool is missing: apt-get install prometheus (.ci/run does)"
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(one(default_objects, "PrometheusRule")["spec"]))
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_crds_print_the_useful_columns(default_objects: list[dict[str, Any]]) -> None:
    """`kubectl get incidents` shows service, severity, status, opened and age; `inc` works."""
    crds = {c["spec"]["names"]["kind"]: c for c in by_kind(default_objects, "CustomResourceDefinition")}
    incident = crds["Incident"]["spec"]
    assert incident["names"]["plural"] == "incidents" and incident["names"]["shortNames"] == ["inc"]
    columns = [
        c["name"] for c in incident["versions"][0]["additionalPrinterColumns"] if not c.get("priority")
    ]
    assert columns == ["Service", "Severity", "Status", "Opened", "Age"]
    timeline = incident["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "timeline"
    ]
    assert timeline["items"]["x-kubernetes-preserve-unknown-fields"] is True
    run = crds["PlaybookRun"]["spec"]
    assert run["names"]["plural"] == "playbookruns"
    run_columns = {c["jsonPath"] for c in run["versions"][0]["additionalPrinterColumns"]}
    assert {".spec.playbook", ".spec.incident", ".spec.state", ".spec.startedAt", ".spec.step"} <= run_columns


def test_notes_render() -> None:
    """NOTES.txt renders and lists the playbook permissions a reviewer should see."""
    with helm_python.Chart.load(CHART) as chart:
        notes = chart.render(PLAYBOOK_VALUES, name=RELEASE, namespace=NAMESPACE)[
            "continuity/templates/NOTES.txt"
        ]
    assert f"{RELEASE}-leader" in notes
    assert "deployments/scale" in notes and "shop-eu" in notes and "cluster-wide" in notes


def test_helm_lint_is_clean() -> None:
    """helm lint --strict, against Kubernetes 1.30, finds no warnings or errors."""
    report = helm_python.lint(str(CHART), strict=True, kube_version=f"v{KUBE_VERSION}", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report.get("errors"), report


# ---------------------------------------------------------------- plain manifests


def test_plain_manifests_match_a_fresh_render() -> None:
    """deploy/manifests/continuity.yaml is exactly what deploy/render.py produces now (no drift)."""
    committed = (DEPLOY / "manifests" / "continuity.yaml").read_text(encoding="utf-8")
    assert committed == render_mod.render_manifest_text(), "stale: run python deploy/render.py"


def test_plain_manifests_are_valid() -> None:
    """The committed plain file parses and validates like the chart's output."""
    text = (DEPLOY / "manifests" / "continuity.yaml").read_text(encoding="utf-8")
    objects = [d for d in yaml.safe_load_all(text) if d]
    validate_all(objects)
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "CustomResourceDefinition"} == {
        render_mod.NAMESPACE
    }


# ---------------------------------------------------------------- Grafana dashboard


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_queries_use_known_metrics() -> None:
    """Every query targets a continuity_ metric of the controller's contract, via ${datasource}."""
    dashboard = json.loads((DEPLOY / "grafana" / "continuity-dashboard.json").read_text(encoding="utf-8"))
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    seen: set[str] = set()
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"continuity_[a-z_]+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            for name in names:
                base = metric_base(name)
                assert base in live_metrics(), (panel["title"], name, "not exported by a running controller")
                seen.add(base)
    core = {
        metric_base(m)
        for m in (
            "continuity_leader",
            "continuity_loop_last_tick_timestamp_seconds",
            "continuity_probe_success",
            "continuity_service_state",
            "continuity_outbox_depth",
            "continuity_config_reload_failures_total",
        )
    }
    assert core <= seen, f"metrics without a panel: {core - seen}"
    quantiles = [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    assert any(
        "histogram_quantile(0.5," in q and "continuity_probe_duration_seconds_bucket" in q for q in quantiles
    )
    assert any("histogram_quantile(0.99," in q for q in quantiles)


# ------------------------------------------- Dockerfile (static here; tests/test_image.py builds and runs it)


def test_dockerfile_static() -> None:
    """Slim multi-stage build, non-root numeric USER, the contract's ENTRYPOINT/CMD, no .pyc writes."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    instructions = [
        line.strip()
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [i for i in instructions if i.upper().startswith("FROM ")]
    assert len(froms) >= 2, "expected a multi-stage build"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in instructions
    assert all("${PYTHON_IMAGE}" in f or "python:3.11-slim" in f for f in froms)
    users = [i.split(None, 1)[1] for i in instructions if i.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] == "10001", "the final stage must run as uid 10001"
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert "--uid 10001" in final_stage
    assert re.search(r"PYTHONDONTWRITEBYTECODE=1", final_stage)
    assert 'ENTRYPOINT ["continuity"]' in instructions
    assert 'CMD ["run", "-c", "/etc/continuity/config.yaml"]' in instructions
    assert "EXPOSE 8080" in instructions
    assert not any(i.upper().startswith("HEALTHCHECK") for i in instructions)


def test_the_api_token_is_required_or_created() -> None:
    """Every pushed input needs the token (issue 13): the pod always reads it from a Secret, which the
    operator creates (the default, deterministic render) or the chart creates with a random value."""
    default = render()
    assert not by_kind(default, "Secret")
    created = render({"apiToken": {"create": True}})
    (secret,) = by_kind(created, "Secret")
    name = secret["metadata"]["name"]
    assert name == f"{RELEASE}-continuity-api-token"
    token = base64.b64decode(secret["data"]["api-token"]).decode()
    assert len(token) == 48 and token.isalnum()
    container = one(created, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["CONTINUITY_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == name
