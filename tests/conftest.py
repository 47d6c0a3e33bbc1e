"""Shared fixtures. The tests use real mounts, loop devices and OpenSSH: they need root.

A missing prerequisite fails the run loudly; nothing is skipped silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

REQUIRED_TOOLS = ("mksquashfs", "tar2sqfs", "unsquashfs", "debootstrap", "busybox")


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        pytest.exit("shifter-sshd tests need root (real mounts, loop devices)", returncode=3)
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.exit(f"missing prerequisites: {', '.join(missing)} (run make test)", returncode=3)


# --- images and per-test node areas -----------------------------------------------------

from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from support import CLI, Node, run  # noqa: E402

from lab import images, users  # noqa: E402

BUSYBOX = "docker:busybox:test"
DEBIAN = "docker:debian:openmpi"


@dataclass(frozen=True)
class ImageStore:
    path: str
    busybox_id: str
    debian_id: str


def _import(config: Path, source: str, name: str) -> str:
    done = run([CLI, "--config", str(config), "image", "import", source, name], dict(os.environ))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="session")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    """An image store with the busybox root and the cached Debian + Open MPI image."""
    base = tmp_path_factory.mktemp("store")
    os.chmod(base, 0o755)
    config = base / "udiRoot.conf"
    config.write_text(f"imagePath={base}/images\n")
    tree = images.busybox_tree(base / "busybox")
    busybox_id = _import(config, str(tree), BUSYBOX)
    debian_id = _import(config, str(images.debian_squashfs("openmpi")), DEBIAN)
    return ImageStore(f"{base}/images", busybox_id, debian_id)


@pytest.fixture(scope="session")
def test_users() -> list[users.LabUser]:
    return users.ensure_users()


@pytest.fixture
def node(tmp_path: Path, image_store: ImageStore) -> Iterator[Node]:
    area = Node(tmp_path, image_store.path)
    try:
        yield area
    finally:
        area.cleanup()


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    """A scratch directory the test users can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="shifter-sshd-test-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = tmp_path_factory.mktemp("bundle") / "udiImage"
    done = run([CLI, "udiimage", "build", "--dest", str(dest)], dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stderr
    os.chmod(dest.parent, 0o755)  # the job users' shifter reads it on the host side too
    return str(dest)


@pytest.fixture(scope="session")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("secret") / "ssh_key_secret")
    done = run([CLI, "secret", "init", "--path", path], dict(os.environ))
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="session")
def racer() -> Iterator[str]:
    """The racer, compiled where the test users can run it."""
    directory = tempfile.mkdtemp(prefix="shifter-sshd-racer-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    binary = os.path.join(directory, "racer")
    source = str(Path(__file__).resolve().parent / "redteam" / "racer.c")
    done = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", binary, source],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    try:
        yield binary
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def fuse_device() -> str:
    """/dev/fuse, usable by the test users, and squashfuse."""
    if not os.access("/usr/bin/squashfuse", os.X_OK) or not os.path.exists("/dev/fuse"):
        pytest.fail("squashfuse and /dev/fuse are needed (make test installs squashfuse, fuse3)")
    # A machine without udev leaves /dev/fuse root's alone; udev's rule makes it 0666.
    os.chmod("/dev/fuse", 0o666)
    return "/dev/fuse"


# --- the cluster tests' site and 3-node cluster (one of each per test module) ----------

from lab.site import Site, make_site  # noqa: E402
from lab.vcluster import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    built = make_site(with_mpich=True)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture(scope="module")
def cluster(site: Site) -> Iterator[Cluster]:
    with site.cluster(nodes=3) as up:
        yield up
