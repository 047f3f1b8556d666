"""The test command (`python -m tests.run`) names what is missing and runs nothing when it may not install.

On a machine where it cannot use apt-get (not root, or CONTINUITY_NO_APT set), a missing Debian
package must stop it before pip or pytest start, with each package named and the command that
installs them. Here PATH holds only a python, so every program looked up on PATH is missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import run

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_has_a_program_and_a_reason() -> None:
    names = [p.name for p in run.PACKAGES]
    assert len(set(names)) == len(names)
    assert {"prometheus", "prometheus-alertmanager", "chromium", "buildah", "mmdebstrap"} <= set(names)
    assert all(p.program and p.why for p in run.PACKAGES)


def test_missing_packages_are_named_and_nothing_runs(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        "CONTINUITY_NO_APT": "1",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    on_path = [p for p in run.PACKAGES if not p.program.startswith("/")]
    assert on_path, "the table must have programs found on PATH"
    for pkg in on_path:
        assert f"{pkg.name} " in result.stderr and pkg.why in result.stderr, pkg.name
    install = [line for line in result.stderr.splitlines() if "apt-get install" in line]
    assert len(install) == 1 and all(p.name in install[0] for p in on_path), install
    assert "pip install" not in result.stdout + result.stderr, "nothing may run before the packages are there"
    assert "test session starts" not in result.stdout
