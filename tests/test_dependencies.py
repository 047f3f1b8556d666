"""Every package the code imports is declared in pyproject.toml, and optional ones are imported lazily.

An import that works only because another dependency happens to pull its distribution in (botocore
through boto3, urllib3 through kubernetes) breaks the day that dependency changes. So every
third-party import in controller/, probes/ and playbooks/ must map, through the installed
distributions' own metadata, to a distribution named in `dependencies`. An import that maps to an
optional extra (moto for the demo, matplotlib for charts) must sit inside a function, so that a
plain install can still import every module; the CLI turns its absence into a clear message.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("controller", "probes", "playbooks")


def _norm(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(requirement: str) -> str:
    """The distribution name of a requirement string such as `uvloop>=0.19; sys_platform != 'win32'`."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return _norm(match.group(1))


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """Runtime distributions, and each extra's (self-references like continuity[demo] dropped)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {_req_name(r) for r in project["dependencies"]}
    extras = {
        extra: {_req_name(r) for r in reqs if _req_name(r) != "continuity"}
        for extra, reqs in project["optional-dependencies"].items()
    }
    return runtime, extras


def imports() -> list[tuple[str, str, int, bool]]:
    """(top-level module, file, line, inside a function) for every absolute import of the packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            lazy: set[int] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lazy.update(id(n) for n in ast.walk(node) if n is not node)
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                rel = str(path.relative_to(ROOT))
                found += [(n.split(".")[0], rel, node.lineno, id(node) in lazy) for n in names]
    return found


def third_party() -> list[tuple[str, str, int, bool]]:
    """The imports that are neither the standard library nor our own packages."""
    return [i for i in imports() if i[0] not in sys.stdlib_module_names and i[0] not in PACKAGES]


def test_the_checker_sees_the_imports_it_must_judge() -> None:
    """The AST walk finds known imports, module-level and lazy, so an empty scan cannot pass."""
    found = {(m, f, lazy) for m, f, _, lazy in third_party()}
    assert ("pydantic", "controller/config.py", False) in found
    assert ("moto", "controller/demo/environment.py", True) in found
    assert ("botocore", "controller/aws.py", False) in {(m, f, lz) for m, f, lz in found if m == "botocore"}


def test_every_import_maps_to_a_declared_distribution() -> None:
    runtime, extras = declared()
    optional = set().union(*extras.values())
    owners = importlib.metadata.packages_distributions()
    problems = []
    for module, path, line, lazy in third_party():
        dists = {_norm(d) for d in owners.get(module, [])}
        if not dists:
            problems.append(f"{path}:{line}: {module} is imported but no installed distribution provides it")
        elif dists & runtime:
            continue
        elif dists & optional and lazy:
            continue
        elif dists & optional:
            extra = next(e for e, ds in extras.items() if ds & dists)
            problems.append(
                f"{path}:{line}: {module} comes from the optional extra [{extra}] but is imported at "
                "module level; import it inside the function that needs it"
            )
        else:
            problems.append(f"{path}:{line}: {module} (from {', '.join(sorted(dists))}) is not declared")
    assert not problems, "\n".join(problems)


def test_test_only_distributions_never_reach_the_code() -> None:
    """Test-only packages (pytest, helm-python-sdk, playwright...) are imported by tests, not the product."""
    runtime, extras = declared()
    test_only = extras["test"] - runtime - set().union(*(v for k, v in extras.items() if k != "test"))
    owners = importlib.metadata.packages_distributions()
    leaks = [
        f"{path}:{line}: {module}"
        for module, path, line, _ in third_party()
        if {_norm(d) for d in owners.get(module, [])} & test_only
    ]
    assert not leaks, leaks
