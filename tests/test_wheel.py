"""The wheel and sdist, built as a user builds them and installed into a clean virtualenv, not editable.

Editable installs read templates and the demo config from the source tree, so they cannot show
that a wheel carries them. Here `python -m build` makes both archives, the wheel goes into a fresh
virtualenv with no extras first (what `pip install continuity` gives: the version, validation,
and a clear message where the demo's in-process AWS is missing), then with the `demo` extra
(`continuity demo` end to end, `continuity plan` with the packaged templates). Every command runs
outside the source tree with PYTHONPATH removed, and the test checks that the code it ran came
from the virtualenv's site-packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
PACKAGES = ("controller", "probes", "playbooks")

pytestmark = pytest.mark.timeout(900)
# Prints the directory of the installed demo package, where its config.yaml is packaged.
DEMO_DIR = "import controller.demo, pathlib; print(pathlib.Path(controller.demo.__file__).parent)"


def _clean_env() -> dict[str, str]:
    """The environment a user's shell would have: no PYTHONPATH pointing at the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@dataclass
class Built:
    wheel: Path
    sdist: Path


@dataclass
class Venv:
    root: Path
    work: Path

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A command from the venv's bin/, run in a scratch directory outside the source tree."""
        return subprocess.run(
            [self.bin(args[0]), *args[1:]],
            cwd=self.work,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def pip(self, *args: str) -> None:
        result = self.run("python", "-m", "pip", "install", "-q", "--no-compile", *args, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """`python -m build`: an sdist, then a wheel built from that sdist (so the sdist is complete too)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list(out.glob(f"continuity-{VERSION}-*.whl"))
    sdists = list(out.glob(f"continuity-{VERSION}.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return Built(wheels[0], sdists[0])


@pytest.fixture(scope="module")
def plain(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh virtualenv with the wheel and no extras."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    v = Venv(root, tmp_path_factory.mktemp("work"))
    v.pip(str(built.wheel))
    return v


@pytest.fixture(scope="module")
def with_demo(plain: Venv, built: Built) -> Iterator[Venv]:
    """The same virtualenv after `pip install 'continuity[demo]'` from the same wheel."""
    plain.pip(f"{built.wheel}[demo]")
    yield plain


def _package_files(names: list[str]) -> set[str]:
    """Paths under our packages (as in the archive, without its top folder), __pycache__ left out."""
    return {n for n in names if n.split("/")[0] in PACKAGES and "__pycache__" not in n}


def test_wheel_and_sdist_carry_every_file_of_the_packages(built: Built) -> None:
    """Every file of the source packages (code, templates, demo config, example playbooks) is shipped."""
    source = {
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".db")
    }
    assert "controller/demo/config.yaml" in source and "controller/templates/status.html.j2" in source
    in_wheel = _package_files(zipfile.ZipFile(built.wheel).namelist())
    assert source - in_wheel == set(), f"missing from the wheel: {sorted(source - in_wheel)}"
    with tarfile.open(built.sdist) as tar:
        in_sdist = _package_files([n.split("/", 1)[1] for n in tar.getnames() if "/" in n])
    assert source - in_sdist == set(), f"missing from the sdist: {sorted(source - in_sdist)}"


def test_plain_install_has_version_validate_and_clear_demo_message(plain: Venv) -> None:
    """No extras: the version, validation of the packaged demo config, and a clear refusal for demo."""
    where = plain.run("python", "-c", "import controller, moto", timeout=60)
    assert "No module named 'moto'" in where.stderr, "moto must not come with a plain install"
    where = plain.run("python", "-c", "import controller; print(controller.__file__)", timeout=60)
    assert where.returncode == 0 and str(plain.root) in where.stdout, where

    version = plain.run("continuity", "--version", timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"continuity {VERSION}"

    config = plain.run("python", "-c", DEMO_DIR).stdout.strip()
    valid = plain.run("continuity", "validate", "-c", f"{config}/config.yaml", timeout=60)
    assert valid.returncode == 0, valid.stdout + valid.stderr

    for args in (["demo"], ["drill", "region-lost"]):
        refused = plain.run("continuity", *args, timeout=60)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert "pip install 'continuity[demo]'" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr + refused.stdout


def test_demo_runs_end_to_end_from_the_wheel(with_demo: Venv) -> None:
    """`continuity demo` from the installed wheel: the whole chain, exit 0 only if it all worked."""
    result = with_demo.run("continuity", "demo", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OUTAGE INJECTED" in result.stdout
    assert "playbook region-failover succeeded" in result.stdout


def test_plan_renders_with_the_packaged_templates(with_demo: Venv) -> None:
    """`continuity plan` on the packaged demo config; its templates come from site-packages."""
    config = with_demo.run("python", "-c", DEMO_DIR).stdout.strip()
    out = with_demo.work / "plan"
    result = with_demo.run(
        "continuity", "plan", "-c", f"{config}/config.yaml", "--out", str(out), "--data-dir", "state"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    md = (out / "continuity-plan.md").read_text(encoding="utf-8")
    assert (out / "continuity-plan.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "checkout" in md
    site = with_demo.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    templates = Path(site.stdout.strip()) / "controller" / "templates"
    assert f"default ({templates})" in md, "the plan must name the packaged templates"
    named = {line.split("|")[3].strip() for line in md.splitlines() if line.count("|") > 4 and ".j2" in line}
    assert named and all((templates / n).is_file() for n in named), named


def test_report_without_the_charts_extra_says_how_to_add_the_chart(plain: Venv) -> None:
    """No matplotlib: the post-incident report is still written, with a line naming the extra."""
    config = plain.run("python", "-c", DEMO_DIR).stdout.strip()
    opened = plain.run(
        "python",
        "-c",
        "import time; from controller.stores import SQLiteStore\n"
        "s = SQLiteStore('state'); now = time.time()\n"
        "print(s.open_incident('checkout', 'critical', 'checkout down', now, now - 30, {}).id)",
    )
    assert opened.returncode == 0, opened.stderr
    incident = opened.stdout.strip()
    result = plain.run(
        "continuity", "report", incident, "-c", f"{config}/config.yaml", "--data-dir", "state", "--out", "rep"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written = sorted(Path(line).name for line in result.stdout.splitlines())
    assert written == [f"{incident}.html", f"{incident}.md"], written
    md = (plain.work / "rep" / f"{incident}.md").read_text(encoding="utf-8")
    assert "pip install 'continuity[charts]'" in md
