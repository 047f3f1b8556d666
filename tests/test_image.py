"""deploy/Dockerfile really builds, and the image really runs, with no Docker engine.

buildah builds the Dockerfile as root with no daemon (vfs storage, chroot isolation). No container
registry is reachable here, so the base is made locally the way a distribution makes one:
mmdebstrap writes a minimal Debian bookworm with python3, python3-venv and the CA certificates into
a tarball, and `buildah from scratch` + `buildah add` + `buildah commit` turn it into an image that
the Dockerfile takes through its PYTHON_IMAGE argument. The build's RUN steps reach the package
index through the machine's CA certificates and pip configuration, mounted read-only.

The built image then runs as Kubernetes runs it (the chart's securityContext): as its own non-root
user 10001, with a read-only root filesystem and writable emptyDirs only at /tmp and
/var/lib/continuity, with the chart's rendered config mounted at /etc/continuity. buildah run has
no read-only root, so the test mounts the image's filesystem, remounts it read-only in a private
mount namespace (unshare) and runs the image's ENTRYPOINT there with chroot under the image's USER,
WORKDIR and ENV, read from the image's own config.

buildah and mmdebstrap are Debian packages that the test command (`python -m tests.run`) installs;
if they are missing this test fails: a skip would let a broken image pass CI. The base tarball is
kept for the day in /var/tmp/continuity-image-cache, so a second run that day skips mmdebstrap.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path("/var/tmp/continuity-image-cache")
BASE = "localhost/continuity-base:bookworm"
IMAGE = "localhost/continuity:test"
# The build's RUN steps reach the package index only with the machine's certificates and pip config.
HOST_MOUNTS = [p for p in ("/etc/ssl/certs", "/etc/pip.conf") if os.path.exists(p)]

pytestmark = pytest.mark.timeout(1500)


@dataclass
class Buildah:
    """buildah with its own storage, so the test neither sees nor disturbs other images here."""

    storage: Path

    def __call__(self, *args: str, timeout: float = 900) -> str:
        env = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
        cmd = ["buildah", "--root", str(self.storage / "root"), "--runroot", str(self.storage / "run")]
        result = subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
        assert result.returncode == 0, (
            f"buildah {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
        return result.stdout.strip()


@dataclass
class Built:
    buildah: Buildah
    config: dict[str, Any]  # the image's OCI config: User, Env, Entrypoint, Cmd, WorkingDir
    size_mb: float
    build_s: float
    base_s: float


def _need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.fail(f"{program} is not installed: apt-get install {program} (python -m tests.run does)")


def _base_rootfs() -> tuple[Path, float]:
    """Today's mmdebstrap tarball, made now if no run today made it; and the seconds it took."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"bookworm-python3-{datetime.date.today():%Y%m%d}.tar"
    if tar.exists():
        return tar, 0.0
    for old in CACHE.glob("bookworm-python3-*.tar"):
        old.unlink()
    partial = tar.with_suffix(".partial.tar")
    started = time.monotonic()
    result = subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(partial),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    partial.rename(tar)
    return tar, time.monotonic() - started


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The Debian base image, then deploy/Dockerfile built on it; the build timed."""
    _need("buildah")
    _need("mmdebstrap")
    buildah = Buildah(tmp_path_factory.mktemp("buildah"))
    tar, base_s = _base_rootfs()
    ctr = buildah("from", "scratch")
    buildah("add", ctr, str(tar), "/")
    buildah("commit", "--quiet", ctr, BASE)
    buildah("rm", ctr)
    volumes = [arg for path in HOST_MOUNTS for arg in ("--volume", f"{path}:{path}:ro")]
    started = time.monotonic()
    buildah(
        "bud", "--quiet", "--layers=false", "--isolation", "chroot",
        "-f", "deploy/Dockerfile", "--build-arg", f"PYTHON_IMAGE={BASE}", *volumes, "-t", IMAGE, str(ROOT),
        timeout=1200,
    )  # fmt: skip
    build_s = time.monotonic() - started
    inspect = json.loads(buildah("inspect", "--type", "image", IMAGE))
    images = json.loads(buildah("images", "--json", IMAGE))
    size_mb = _megabytes(images[0]["size"])
    print(
        f"\nimage: built in {build_s:.0f} s on the Debian base (mmdebstrap {base_s:.0f} s), {size_mb:.0f} MB"
    )
    yield Built(buildah, inspect["OCIv1"]["config"], size_mb, build_s, base_s)
    for args in (("rm", "--all"), ("rmi", "--all", "--force")):
        subprocess.run(
            [
                "buildah",
                "--root",
                str(buildah.storage / "root"),
                "--runroot",
                str(buildah.storage / "run"),
                *args,
            ],
            capture_output=True,
            env={**os.environ, "STORAGE_DRIVER": "vfs"},
            check=False,
        )
    shutil.rmtree(buildah.storage, ignore_errors=True)


def _megabytes(size: str | int) -> float:
    """buildah reports an image's size as bytes or as text like '680 MB' (decimal units)."""
    if isinstance(size, int):
        return size / 1e6
    match = re.fullmatch(r"\s*([\d.]+)\s*([kMG]?B)\s*", size)
    assert match, f"unexpected size {size!r}"
    return float(match.group(1)) * {"B": 1e-6, "kB": 1e-3, "MB": 1.0, "GB": 1e3}[match.group(2)]


@dataclass
class Running:
    """The image's filesystem, mounted, and a way to run commands in it as Kubernetes would."""

    rootfs: Path
    config: dict[str, Any]
    etc: Path

    def run(
        self, *args: str, timeout: float = 300, entrypoint: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`args` after the image's ENTRYPOINT (or alone), as its USER, read-only root, in WORKDIR."""
        user = self.config["User"]
        env = [*self.config.get("Env", []), "HOME=/var/lib/continuity"]
        argv = [*(self.config["Entrypoint"] if entrypoint else []), *args]
        workdir = self.config.get("WorkingDir") or "/"
        r = str(self.rootfs)
        script = f"""
set -e
mount --bind "{r}" "{r}"
mount -o remount,bind,ro "{r}"
mount -t proc proc "{r}/proc"
mount --rbind /dev "{r}/dev"
mount -t tmpfs -o mode=1777 tmpfs "{r}/tmp"
mount -t tmpfs -o uid=10001,gid=10001,mode=0700 tmpfs "{r}/var/lib/continuity"
mount --bind -o ro "{self.etc}" "{r}/etc/continuity"
if [ -e /etc/hosts ] && [ -e "{r}/etc/hosts" ]; then mount --bind -o ro /etc/hosts "{r}/etc/hosts"; fi
exec chroot --userspec={user} "{r}" /bin/sh -c 'cd "$0" && exec env -i "$@"' "{workdir}" "$@"
"""
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *env, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _chart_default_config() -> str:
    """The config.yaml that the chart's default values render into its ConfigMap."""
    spec = importlib.util.spec_from_file_location("continuity_deploy_render", ROOT / "deploy" / "render.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    maps = [o for o in render.render_objects(None) if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]]
    assert len(maps) == 1, maps
    return maps[0]["data"]["config.yaml"]


@pytest.fixture(scope="module")
def running(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    ctr = built.buildah("from", "--quiet", IMAGE)
    rootfs = Path(built.buildah("mount", ctr))
    etc = tmp_path_factory.mktemp("etc-continuity")
    (etc / "config.yaml").write_text(_chart_default_config(), encoding="utf-8")
    etc.chmod(0o755)
    (etc / "config.yaml").chmod(0o644)
    yield Running(rootfs, built.config, etc)
    built.buildah("umount", ctr)
    built.buildah("rm", ctr)


def test_image_is_built_as_the_chart_expects(built: Built) -> None:
    """The image's own config: uid 10001 (the chart's runAsUser), ENTRYPOINT/CMD, no .pyc writes."""
    cfg = built.config
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["continuity"]
    assert cfg["Cmd"] == ["run", "-c", "/etc/continuity/config.yaml"]
    assert cfg["WorkingDir"] == "/var/lib/continuity"
    assert "PYTHONDONTWRITEBYTECODE=1" in cfg["Env"]
    assert "8080/tcp" in cfg.get("ExposedPorts", {})
    values = yaml.safe_load((ROOT / "deploy/helm/continuity/values.yaml").read_text(encoding="utf-8"))
    assert values["securityContext"]["runAsUser"] == 10001
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert built.size_mb > 0


def test_image_runs_non_root_with_a_read_only_root(running: Running) -> None:
    """The sandbox the other tests use is what it claims: uid 10001, / read-only, emptyDirs writable."""
    probe = running.run(
        "python3",
        "-c",
        "import os, errno\n"
        "print(os.getuid(), os.getgid())\n"
        "for path in ('/opt/continuity/x', '/etc/x', '/x'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "        print('WROTE', path)\n"
        "    except OSError as exc:\n"
        "        print(errno.errorcode[exc.errno], path)\n"
        "for path in ('/tmp/x', '/var/lib/continuity/x'):\n"
        "    open(path, 'w').write('ok')\n"
        "    print('ok', path)\n",
        entrypoint=False,
    )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] == "10001 10001"
    assert "WROTE" not in probe.stdout
    assert lines[1:4] == ["EROFS /opt/continuity/x", "EROFS /etc/x", "EROFS /x"]
    assert lines[4:] == ["ok /tmp/x", "ok /var/lib/continuity/x"]


def test_version_in_the_image(running: Running) -> None:
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    result = running.run("--version", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"continuity {version}"


def test_validate_the_charts_default_config_in_the_image(running: Running) -> None:
    """The config the chart deploys by default, at the path the chart mounts it, passes validation."""
    result = running.run("validate", "-c", "/etc/continuity/config.yaml", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_demo_end_to_end_in_the_image(running: Running) -> None:
    """`continuity demo` in the image, non-root, read-only root: the whole failover chain."""
    result = running.run("demo", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OUTAGE INJECTED" in result.stdout
    assert "playbook region-failover succeeded" in result.stdout
    assert "Traceback" not in result.stderr
