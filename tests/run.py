"""The test command: install what the suite needs, then run the whole suite.

    python -m tests.run [PYTEST ARGS...]

This is the README's second command and exactly what `.ci/run` calls, so a fresh machine and CI
take the same path. It does three things, in order, and stops at the first that fails:

1. The Debian packages the tests drive (real Prometheus, Alertmanager, Chromium, and buildah and
   mmdebstrap for the container image test). As root with apt-get they are installed; otherwise
   every missing one is named with the command that installs it, and nothing runs. A test that
   needs a missing program fails rather than skips, so checking first saves a confusing run.
2. This package with its `test` extra, editable, into the running interpreter (use a venv).
3. `python -m pytest` with any arguments given here.

`--no-install` skips step 2 for a quick rerun; `--check` only reports what step 1 would do.
CONTINUITY_NO_APT=1 makes a root user get the list and the command instead of an apt-get run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DebianPackage:
    """A Debian package and the program whose presence shows it is installed."""

    name: str
    program: str
    why: str
    service: str | None = None  # a unit the package starts on install, which the tests never want


# Add a row here when a test starts driving a new program: this table is the one list.
PACKAGES: tuple[DebianPackage, ...] = (
    DebianPackage("prometheus", "promtool", "the prometheus probe's real server; promtool checks alert rules",
                  service="prometheus"),
    DebianPackage("prometheus-alertmanager", "/usr/bin/prometheus-alertmanager",
                  "Alertmanager posting real webhooks to our receiver", service="prometheus-alertmanager"),
    DebianPackage("chromium", "/usr/bin/chromium", "the status page rendered at phone and desktop widths"),
    DebianPackage("buildah", "buildah", "builds and runs deploy/Dockerfile with no Docker engine"),
    DebianPackage("mmdebstrap", "mmdebstrap", "the Debian base image for the container image test"),
)  # fmt: skip


def present(pkg: DebianPackage) -> bool:
    """Whether the package's program is on this machine (by absolute path, or on PATH)."""
    if pkg.program.startswith("/"):
        return os.access(pkg.program, os.X_OK)
    return shutil.which(pkg.program) is not None


def missing_packages() -> list[DebianPackage]:
    """The packages whose program is not found, in table order."""
    return [p for p in PACKAGES if not present(p)]


def can_apt_install() -> bool:
    """apt-get works here without asking anyone: we are root, it exists, and CONTINUITY_NO_APT is unset."""
    if os.environ.get("CONTINUITY_NO_APT"):
        return False
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def explain_missing(missing: list[DebianPackage]) -> str:
    """What to tell a user who is not root: each package, why, and the one command that installs all."""
    lines = ["The tests drive these Debian packages, which are not installed:"]
    lines += [f"  {p.name:<24} ({p.program} not found): {p.why}" for p in missing]
    lines.append("Install them, then run this command again:")
    sudo = "" if os.geteuid() == 0 else "sudo "
    names = " ".join(p.name for p in missing)
    lines.append(f"  {sudo}apt-get update && {sudo}apt-get install -y --no-install-recommends {names}")
    return "\n".join(lines)


def apt_install(missing: list[DebianPackage]) -> None:
    """Install the packages with apt-get and stop any server a package started on install."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    names = [p.name for p in missing]
    print(f"tests.run: apt-get install {' '.join(names)}", flush=True)
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # another apt-get may hold the lock for a while
    subprocess.run(["apt-get", *lock, "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *names],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    for pkg in missing:
        if pkg.service:  # where an init system runs, the package starts a server; tests start their own
            for cmd in (["systemctl", "stop", pkg.service], ["service", pkg.service, "stop"]):
                if shutil.which(cmd[0]):
                    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    break


def pip_install() -> None:
    """This package with its test extra, editable, into the interpreter that runs the tests."""
    print("tests.run: pip install -e '.[test]'", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-e", ".[test]"],
        check=True,
        cwd=ROOT,
    )


def main(argv: list[str]) -> int:
    check_only = "--check" in argv
    no_install = "--no-install" in argv
    pytest_args = [a for a in argv if a not in ("--check", "--no-install")]
    missing = missing_packages()
    if missing:
        if check_only or not can_apt_install():
            print(explain_missing(missing), file=sys.stderr)
            return 2
        apt_install(missing)
        still = missing_packages()
        if still:
            print("tests.run: apt-get ran but these are still missing:", file=sys.stderr)
            print(explain_missing(still), file=sys.stderr)
            return 2
    if check_only:
        print("tests.run: every Debian package the tests need is installed")
        return 0
    if sys.prefix == sys.base_prefix and not os.environ.get("CI"):
        print("tests.run: note: not in a virtualenv; pip installs into the system interpreter", flush=True)
    if not no_install:
        pip_install()
    os.chdir(ROOT)
    return subprocess.run([sys.executable, "-m", "pytest", *pytest_args], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
