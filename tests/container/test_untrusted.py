"""Untrusted images: symlinks, '..', loops, setuid files and device nodes.

Each hostile image is built by a fixture from the busybox root. The prolog must
either build a working container or fail with a clear message, and never create,
change or bind anything outside the container root: every symlink aims at a
canary directory on the host whose contents are compared before and after.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import CLI, Node, in_root, run

from lab import images
from lab.users import LabUser

Mutation = Callable[[Path, Path], None]  # (image tree, host canary directory)


def _link(tree: Path, path: str, target: str) -> None:
    link = tree / path.lstrip("/")
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif link.exists() or link.is_symlink():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _loop(tree: Path) -> None:
    _link(tree, "/etc/nsswitch.conf", "/etc/loop2")
    _link(tree, "/etc/loop2", "/etc/nsswitch.conf")


def _remove(tree: Path, *names: str) -> None:
    for name in names:
        shutil.rmtree(tree / name)


CORPUS: dict[str, Mutation] = {
    "etc is an absolute symlink out": lambda t, c: _link(t, "/etc", str(c)),
    "etc is a dot-dot symlink out": lambda t, c: _link(t, "/etc", "../../../../../.." + str(c)),
    "passwd points at a host file": lambda t, c: _link(t, "/etc/passwd", f"{c}/passwd"),
    "group points at the host's shadow": lambda t, c: _link(t, "/etc/group", "/etc/shadow"),
    "nsswitch is a symlink loop": lambda t, c: _loop(t),
    "var is a symlink out": lambda t, c: _link(t, "/var", str(c)),
    "hostsfile points outside": lambda t, c: _link(t, "/var/hostsfile", f"{c}/hostsfile"),
    "var/shifter points outside": lambda t, c: _link(t, "/var/shifter", str(c)),
    "tmp is a symlink to /": lambda t, c: _link(t, "/tmp", "/"),
    "opt is a symlink out": lambda t, c: _link(t, "/opt", str(c)),
    "opt/udiImage is a symlink to /": lambda t, c: _link(t, "/opt/udiImage", "/"),
    "data volume target is a symlink out": lambda t, c: _link(t, "/data", str(c)),
    "home is a symlink to proc": lambda t, c: _link(t, "/home", "/proc/self/root"),
    "hosts is a directory": lambda t, c: (t / "etc/hosts").mkdir(),
    "no etc": lambda t, c: shutil.rmtree(t / "etc"),
    "no var and no tmp": lambda t, c: _remove(t, "var", "tmp"),
    "no /bin/sh": lambda t, c: (t / "bin/sh").unlink(),
}  # fmt: skip


def _snapshot(directory: Path) -> dict[str, str]:
    found = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path)] = (
            f"{stat.filemode(info.st_mode)} {info.st_uid} {info.st_mtime_ns} {digest}"
        )
    return found


# Host places a hostile image's symlinks aim at: nothing may be mounted on them.
AIMED_AT = ("/", "/etc", "/proc", "/sys", "/dev", "/tmp", "/var", "/opt")


def _host_mounts(canary: Path) -> list[str]:
    """Mount entries (id and target) on the places this test's images aim at, and
    anything mounted below the canary: this test's own paths, not the whole table."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        target = fields[4]
        if target in AIMED_AT or target == str(canary) or target.startswith(f"{canary}/"):
            found.append(f"{fields[0]} {target}")
    return sorted(found)


@pytest.fixture
def canary(user_tmp: Path) -> Iterator[Path]:
    directory = user_tmp / "canary"
    directory.mkdir()
    (directory / "passwd").write_text("canary passwd\n")
    (directory / "hostsfile").write_text("canary hostsfile\n")
    yield directory


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_image_stays_contained(
    node: Node, test_users: list[LabUser], canary: Path, user_tmp: Path, case: str
) -> None:
    tree = images.busybox_tree(user_tmp / "tree")
    CORPUS[case](tree, canary)
    squashfs = user_tmp / "hostile.sqsh"
    subprocess.run(["mksquashfs", str(tree), str(squashfs), "-quiet", "-no-progress"], check=True)
    name = f"docker:hostile:{abs(hash(case))}"
    done = run([CLI, "--config", node.config, "image", "import", str(squashfs), name], {})
    assert done.returncode == 0, done.stderr
    user = test_users[0]
    volume = user_tmp / "volume"
    volume.mkdir()
    os.chown(volume, user.uid, user.gid)
    before, mounts_before = _snapshot(canary), _host_mounts(canary)
    host_etc = {f: Path("/etc", f).read_bytes() for f in ("passwd", "group", "shadow", "hosts")}
    env = node.job_env("501", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=name,
                       SPANK_SHIFTER_VOLUME=f"{volume}:/data")  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr  # never a drained node
    built = os.path.exists(f"{node.root('501')}/var")
    if built:
        inside = in_root(node.root("501"), user.uid, [user.gid], "cat /var/hostsfile")
        if case != "no /bin/sh":
            assert inside.stdout == "node1\nnode1\n", inside.stderr
        assert _host_mounts(canary) == mounts_before
    else:
        assert "shifter-sshd: " in done.stderr  # a clear message
    assert _snapshot(canary) == before
    assert {f: Path("/etc", f).read_bytes() for f in host_etc} == host_etc
    assert node.epilog("501").returncode == 0
    assert node.leftovers() == []


def test_setuid_and_device_nodes_are_inert(
    node: Node, test_users: list[LabUser], user_tmp: Path
) -> None:
    tree = images.busybox_tree(user_tmp / "tree")
    (tree / "suid").mkdir()
    setuid = tree / "suid" / "busybox"  # busybox picks its applet from argv[0]'s name
    shutil.copy2(tree / "bin" / "busybox", setuid)
    os.chown(setuid, 0, 0)
    os.chmod(setuid, 0o4755)
    (tree / "devices").mkdir()
    os.mknod(tree / "devices" / "mem", 0o666 | stat.S_IFCHR, os.makedev(1, 1))
    os.mknod(tree / "devices" / "sda", 0o666 | stat.S_IFBLK, os.makedev(8, 0))
    squashfs = user_tmp / "tricks.sqsh"
    subprocess.run(["mksquashfs", str(tree), str(squashfs), "-quiet", "-no-progress"], check=True)
    done = run(
        [CLI, "--config", node.config, "image", "import", str(squashfs), "docker:tricks"], {}
    )
    assert done.returncode == 0, done.stderr
    user = test_users[0]
    env = node.job_env("502", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE="docker:tricks")
    assert node.prolog(env).returncode == 0
    inside = in_root(node.root("502"), user.uid, [user.gid],
                     "ls -l /suid/busybox; /suid/busybox id -u; head -c1 /devices/mem; "
                     "echo mem=$?; head -c1 /devices/sda; echo sda=$?")  # fmt: skip
    assert "-rwsr-xr-x" in inside.stdout  # the bit is there, and does nothing
    assert f"\n{user.uid}\n" in inside.stdout
    assert "mem=1" in inside.stdout and "sda=1" in inside.stdout
    assert "Permission denied" in inside.stderr
    assert node.epilog("502").returncode == 0
    assert node.leftovers() == []
