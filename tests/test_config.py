"""Config loading and validation: every bad config gives one exact, fixable sentence."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from controller.config import Config, ConfigError, json_schema, load_config
from controller.durations import parse_duration

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "controller" / "demo" / "config.yaml"

BASE = """\
services:
  shop:
    tier: critical
    rto: 5m
    probes: [home]
    playbook: fo
probes:
  home:
    kind: http
    url: http://127.0.0.1:1/
    timeout: 1s
playbooks:
  fo:
    steps:
      - name: dns
        action: aws.route53.switch_record
        with: {zone: shop.example., record: shop.example., values: [127.0.0.3]}
"""


def problems_for(tmp_path: Path, text: str, name: str = "c.yaml") -> tuple[Path, list[str]]:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, info.value.problems


def test_base_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    cfg = load_config(path)
    assert cfg.services["shop"].rto == 300.0
    assert cfg.probes["home"].timeout == 1.0
    assert cfg.playbooks["fo"].steps[0].params["values"] == ["127.0.0.3"]


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    import yaml

    path, problems = problems_for(tmp_path, "services:\n  shop: [a, b\n")
    # The loader parses with libyaml (C) when PyYAML has it, which words the problem its own way.
    found = (
        "did not find expected ',' or ']'"
        if yaml.__with_libyaml__
        else "expected ',' or ']', but got '<stream end>'"
    )
    assert problems == [f"{path}: line 3, column 1: expected valid YAML, found {found}"]


def test_unknown_probe_kind(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("kind: http", "kind: gopher"))
    assert problems == [
        f"{path}: probes.home.kind: expected one of 'http', 'transaction', 'tcp', 'dns', 'tls', "
        f"'prometheus', 'heartbeat', 'alertmanager', found 'gopher'"
    ]


def test_negative_threshold(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE + "detection:\n  failure_threshold: -1\n")
    assert problems == [f"{path}: detection.failure_threshold: expected a number >= 1, found -1"]


def test_service_names_missing_playbook(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("playbook: fo", "playbook: nope"))
    assert problems == [
        f"{path}: services.shop.playbook: expected a playbook defined under playbooks (known: fo), "
        "found 'nope'"
    ]


def test_service_names_missing_probe(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("probes: [home]", "probes: [home, nope]"))
    assert problems == [
        f"{path}: services.shop.probes[1]: expected a probe defined under probes (known: home), found 'nope'"
    ]


def test_typo_key_gets_did_you_mean(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("rto: 5m", "rto: 5m\n    ownrs: [x]"))
    assert problems == [
        f"{path}: services.shop.ownrs: expected a known key (did you mean 'owners'?), "
        "found unknown key 'ownrs'"
    ]


def test_typo_in_probe_key_gets_did_you_mean(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("timeout: 1s", "timeout: 1s\n    intervall: 5s"))
    assert problems == [
        f"{path}: probes.home.intervall: expected a known key (did you mean 'interval'?), "
        "found unknown key 'intervall'"
    ]


def test_typo_in_nested_expectation_gets_did_you_mean(tmp_path: Path) -> None:
    text = BASE.replace("timeout: 1s", "timeout: 1s\n    expect: {latency_ms: {lt: 5}, body_contain: x}")
    path, problems = problems_for(tmp_path, text)
    assert problems == [
        f"{path}: probes.home.expect.body_contain: expected a known key (did you mean 'body_contains'?), "
        "found unknown key 'body_contain'"
    ]


def test_bare_number_duration(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("timeout: 1s", "timeout: 3"))
    assert problems == [
        f"{path}: probes.home.timeout: expected a duration with a unit (e.g. '3s'), found the bare number 3"
    ]


def test_duplicate_yaml_keys(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("rto: 5m", "rto: 5m\n    rto: 6m"))
    assert problems == [
        f"{path}: line 5, column 5: expected valid YAML, found duplicate key 'rto' (the first is on line 4)"
    ]


def test_unknown_playbook_action(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("aws.route53.switch_record", "aws.route53.flip"))
    assert problems == [
        f"{path}: playbooks.fo.steps[0].action: expected one of aws.elbv2.set_listener_weights, "
        "aws.rds.failover_db_cluster, aws.rds.promote_read_replica, aws.route53.set_weights, "
        "aws.route53.switch_record, http, kubernetes.patch, kubernetes.rollout_restart, kubernetes.scale, "
        "notify, wait, wait_healthy, found 'aws.route53.flip'"
    ]


def test_missing_action_parameter(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, BASE.replace("values: [127.0.0.3]", "type: A"))
    assert problems == [
        f"{path}: playbooks.fo.steps[0].with.values: expected a value (this field is required), found nothing"
    ]


def test_directory_of_files_is_merged(tmp_path: Path) -> None:
    services, rest = BASE.split("probes:\n", 1)
    (tmp_path / "10-services.yaml").write_text(services)
    (tmp_path / "20-probes.yaml").write_text("probes:\n" + rest)
    cfg = load_config(tmp_path)
    assert set(cfg.services) == {"shop"}
    assert set(cfg.probes) == {"home"}
    assert set(cfg.playbooks) == {"fo"}


def test_directory_name_defined_twice_names_both_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text("probes:\n  home:\n    kind: http\n    url: http://127.0.0.1:2/\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == [
        f"{tmp_path / 'b.yaml'}: probes.home: expected a unique name, found it also in {tmp_path / 'a.yaml'}"
    ]


def test_directory_problem_is_attributed_to_its_file(tmp_path: Path) -> None:
    services, rest = BASE.split("probes:\n", 1)
    (tmp_path / "10-services.yaml").write_text(services)
    (tmp_path / "20-probes.yaml").write_text("probes:\n" + rest.replace("timeout: 1s", "timeout: 1"))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == [
        f"{tmp_path / '20-probes.yaml'}: probes.home.timeout: expected a duration with a unit (e.g. '1s'), "
        "found the bare number 1"
    ]


def test_several_problems_reported_at_once(tmp_path: Path) -> None:
    text = (
        BASE.replace("kind: http", "kind: gopher")
        .replace("playbook: fo", "playbook: nope")
        .replace("rto: 5m", "rto: 5")
        .replace("aws.route53.switch_record", "aws.route53.flip")
    )
    path, problems = problems_for(tmp_path, text)
    assert len(problems) == 4
    assert all(p.startswith(f"{path}: ") for p in problems)
    fields = sorted(p.split(": ")[1] for p in problems)
    assert fields == [
        "playbooks.fo.steps[0].action",
        "probes.home.kind",
        "services.shop.playbook",
        "services.shop.rto",
    ]


def demo_text(tmp_path: Path) -> str:
    return string.Template(DEMO.read_text()).substitute(
        edge_port=18080, region_port=18081, pd_port=18082, moto_port=18083, data_dir=str(tmp_path / "data")
    )


def test_demo_config_validates(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(demo_text(tmp_path))
    cfg = load_config(path)
    assert set(cfg.services) == {"checkout", "catalog"}
    assert cfg.playbooks["region-failover"].cooldown == 1800.0
    assert cfg.controller.tick == 0.2
    assert [s.name for s in cfg.probes["checkout-journey"].steps] == ["browse", "add-to-cart", "checkout"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("2h", 7200.0), ("1h30m", 5400.0)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "10x", "s10", "5m 3", "-5s"])
def test_bad_durations_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="a duration like 500ms"):
        parse_duration(text)


def test_json_schema_durations_and_unknown_keys(tmp_path: Path) -> None:
    import jsonschema
    import yaml

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    rto = schema["$defs"]["Service"]["properties"]["rto"]
    assert rto["type"] == "string"
    assert "pattern" in rto
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Service"]["additionalProperties"] is False

    validator = jsonschema.Draft202012Validator(schema)
    good = yaml.safe_load(demo_text(tmp_path))
    assert list(validator.iter_errors(good)) == []

    bad = yaml.safe_load(BASE)
    bad["services"]["shop"]["ownrs"] = ["x"]
    bad["services"]["shop"]["rto"] = 5
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert any("'ownrs' was unexpected" in m for m in messages), messages
    assert any("5 is not of type 'string'" in m for m in messages), messages
    bad["services"]["shop"]["rto"] = "5 minutes"
    bad["services"]["shop"].pop("ownrs")
    assert [e.json_path for e in validator.iter_errors(bad)] == ["$.services.shop.rto"]


def test_model_validate_accepts_the_same_document() -> None:
    import yaml

    cfg = Config.model_validate(yaml.safe_load(BASE))
    assert cfg.thresholds("home") == (3, 2)


def test_a_dependency_cycle_is_refused_naming_it(tmp_path: Path) -> None:
    """In a cycle each service waits for another that is down: an outage of them all opened no
    incident and paged nobody, and `validate` said ok. A chain of 3,000 is refused without recursion."""
    path = tmp_path / "c.yaml"
    probe = "probes:\n  p: {kind: http, url: 'http://127.0.0.1:9/'}\n"
    path.write_text(
        "services:\n"
        "  a: {tier: critical, rto: 5m, probes: [p], depends_on: [b]}\n"
        "  b: {tier: critical, rto: 5m, probes: [p], depends_on: [c]}\n"
        "  c: {tier: critical, rto: 5m, probes: [p], depends_on: [a]}\n"
        "  d: {tier: critical, rto: 5m, probes: [p], depends_on: [a, e]}\n"
        "  e: {tier: critical, rto: 5m, probes: [p]}\n" + probe
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [
        f"{path}: services.c.depends_on: expected dependencies without a cycle (in a cycle each service "
        "waits for another and none would page), found a -> b -> c -> a (3 services)"
    ]
    n = 3_000
    path.write_text(
        "services:\n"
        + "".join(
            f"  s{i}: {{tier: critical, rto: 5m, probes: [p], depends_on: [s{(i - 1) % n}]}}\n"
            for i in range(n)
        )
        + probe
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(err.value.problems) == 1 and f"({n} services)" in err.value.problems[0], err.value.problems
    path.write_text(path.read_text().replace("depends_on: [s2999]", "depends_on: []"))
    assert len(load_config(path).services) == n  # the same chain without the closing edge is fine
