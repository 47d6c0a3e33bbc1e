"""The container root on one node: real mounts, real squashfs images, real chroot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import BUSYBOX, DEBIAN, ImageStore
from support import Node, in_root

from lab.users import GROUP_GID, LabUser

PRETTY = {BUSYBOX: "BusyBox test root", DEBIAN: "Debian GNU/Linux 12 (bookworm)"}


def _mountinfo(prefix: str) -> dict[str, tuple[str, str, str]]:
    """target -> (fstype, per-mount options, superblock options) under prefix."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ")
        fields, tail = left.split(), right.split()
        if fields[4].startswith(prefix):
            found[fields[4]] = (tail[0], fields[5], tail[2])
    return found


@pytest.mark.parametrize("image", [BUSYBOX, DEBIAN])
def test_prolog_builds_the_container_and_epilog_removes_it(
    node: Node, test_users: list[LabUser], image: str, user_tmp: Path
) -> None:
    user = test_users[0]
    volume = user_tmp / "volume"
    volume.mkdir()
    (volume / "canary").write_text("user data\n")
    os.chown(volume, user.uid, user.gid)
    env = node.job_env("101", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=image,
                       SPANK_SHIFTER_VOLUME=f"{volume}:/data:ro",
                       SLURM_NODELIST="node[1-2]", SLURM_JOB_CPUS_PER_NODE="2(x2)")  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    root = node.root("101")
    inside = in_root(root, user.uid, [user.gid, GROUP_GID], (
        "grep PRETTY_NAME /etc/os-release; grep '^sstest1:' /etc/passwd; grep '^tty:' /etc/group;"
        " id; cat /data/canary; cat /var/hostsfile; echo ok > /tmp/w && cat /tmp/w"
    ))  # fmt: skip
    assert inside.returncode == 0, inside.stderr
    out = inside.stdout
    assert PRETTY[image] in out
    assert f"sstest1:x:{user.uid}:{user.gid}:" in out
    assert "tty:x:5:" in out
    assert "2990(sstestgrp)" in out
    assert "user data" in out
    assert "node1\nnode1\nnode2\nnode2\n" in out
    mounts = _mountinfo(root)
    assert "gid=5,mode=620,ptmxmode=666" in mounts[f"{root}/dev/pts"][2]
    image_mounts = [opts for fstype, opts, _sb in mounts.values() if fstype == "squashfs"]
    assert image_mounts and all("nosuid" in o and "nodev" in o and "ro" in o for o in image_mounts)
    assert "ro" in mounts[f"{root}/data"][1].split(",")
    assert "ro" in mounts[f"{root}/opt/udiImage"][1].split(",")
    sys_mounts = [
        opts for target, (_t, opts, _s) in mounts.items() if target.startswith(f"{root}/sys")
    ]
    assert len(sys_mounts) > 1  # the recursive bind carries /sys's submounts...
    for opts in sys_mounts:  # ...and every one of them is read-only, nosuid, nodev
        assert {"ro", "nosuid", "nodev"} <= set(opts.split(",")), opts

    done = node.epilog("101")
    assert done.returncode == 0, done.stderr
    assert node.leftovers() == []
    assert (volume / "canary").read_text() == "user data\n"


def test_login_shell_falls_back_to_bin_sh(node: Node, test_users: list[LabUser]) -> None:
    user = test_users[0]
    assert user.name == "sstest1"
    env = node.job_env("102", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
    assert node.prolog(env).returncode == 0
    passwd = Path(node.root("102"), "etc/passwd").read_text()
    assert f"sstest1:x:{user.uid}:{user.gid}::/home/sstest1:/bin/sh" in passwd  # no bash there
    assert node.epilog("102").returncode == 0


def test_fifty_cycles_leave_nothing(node: Node, test_users: list[LabUser]) -> None:
    user = test_users[0]
    for cycle in range(50):
        job = str(1000 + cycle)
        env = node.job_env(job, user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
        assert node.prolog(env).returncode == 0
        assert node.epilog(job).returncode == 0
        assert node.leftovers() == [], f"cycle {cycle}"


def test_epilog_twice_and_without_prolog(node: Node, test_users: list[LabUser]) -> None:
    user = test_users[0]
    assert node.epilog("103").returncode == 0  # no prolog ever ran
    env = node.job_env("103", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
    assert node.prolog(env).returncode == 0
    assert node.epilog("103").returncode == 0
    assert node.epilog("103").returncode == 0
    assert node.leftovers() == []


def test_prolog_twice_rebuilds(node: Node, test_users: list[LabUser]) -> None:
    user = test_users[0]
    env = node.job_env("104", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
    assert node.prolog(env).returncode == 0
    again = node.prolog(env)
    assert again.returncode == 0, again.stderr
    assert "removing an earlier container" in again.stderr
    assert node.epilog("104").returncode == 0
    assert node.leftovers() == []


def test_job_without_image_is_left_alone(node: Node, test_users: list[LabUser]) -> None:
    user = test_users[0]
    done = node.prolog(node.job_env("105", user.name, user.uid, user.gid))
    assert done.returncode == 0
    assert node.leftovers() == []


def test_pinned_image_id_wins(
    node: Node, test_users: list[LabUser], image_store: ImageStore
) -> None:
    user = test_users[0]
    env = node.job_env("106", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_IMAGE_ID=image_store.debian_id)  # fmt: skip
    assert node.prolog(env).returncode == 0
    assert "bookworm" in Path(node.root("106"), "etc/os-release").read_text()
    assert node.epilog("106").returncode == 0


@pytest.mark.parametrize(
    "step", ["scratch", "image tree", "etc", "system", "user volumes", "finish"]
)
def test_failure_part_way_is_rolled_back(node: Node, test_users: list[LabUser], step: str) -> None:
    user = test_users[0]
    env = node.job_env("107", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SHIFTER_SSHD_FAULT=f"raise:{step}")  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 1  # an injected node failure drains
    assert f"failing on purpose at step: {step}" in done.stderr
    assert node.leftovers() == []


def test_site_fs_and_writable_root_setting(
    node: Node, test_users: list[LabUser], tmp_path: Path
) -> None:
    user = test_users[0]
    site = tmp_path / "site"
    site.mkdir()
    (site / "canary").write_text("site data\n")
    node.write_config(siteFs=f"{site}:/global:ro", mountUdiRootWritable="0")
    env = node.job_env("108", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    root = node.root("108")
    assert Path(root, "global/canary").read_text() == "site data\n"
    assert "ro" in _mountinfo(root)[root][1].split(",")
    assert node.epilog("108").returncode == 0
    assert (site / "canary").read_text() == "site data\n"
    assert node.leftovers() == []


def test_etc_path_files_are_copied(node: Node, test_users: list[LabUser], tmp_path: Path) -> None:
    user = test_users[0]
    site_etc = tmp_path / "etc"
    site_etc.mkdir()
    (site_etc / "site.conf").write_text("from the site\n")
    node.write_config(etcPath=str(site_etc), usersToImport="nobody")
    env = node.job_env("109", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
    assert node.prolog(env).returncode == 0
    etc = Path(node.root("109"), "etc")
    assert (etc / "site.conf").read_text() == "from the site\n"
    assert "\nnobody:x:65534:" in (etc / "passwd").read_text()
    assert (etc / "nsswitch.conf").read_text().count("files") >= 2
    assert node.epilog("109").returncode == 0
