"""A user's mistake is logged and left for the user to see; the node stays in service."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import BUSYBOX
from support import Node

from lab.users import LabUser


def _error_file(node: Node, job_id: str) -> str:
    return Path(node.state_path, f"{job_id}.error").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"SPANK_SHIFTER_IMAGE": "docker:nosuch:1"}, "image: no such image: docker:nosuch:1"),
        ({"SPANK_SHIFTER_IMAGE": "docker:bad name"}, "malformed image name"),
        (
            {"SPANK_SHIFTER_IMAGE": BUSYBOX, "SPANK_SHIFTER_IMAGE_ID": "0" * 64},
            "image no longer in the store",
        ),
        ({"SPANK_SHIFTER_VOLUME": "/nonexistent-src:/data"}, "--volume: source does not exist"),
        ({"SPANK_SHIFTER_VOLUME": "relative:/data"}, "paths must be absolute: relative"),
        ({"SPANK_SHIFTER_VOLUME": "/root:/data"}, "source not readable by sstest1: /root"),
        ({"SPANK_SHIFTER_VOLUME": "/etc:/data:ro:x"}, "expected source:destination[:flags]"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/data:bogus"}, "unknown flag (allowed: ro, rw): bogus"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/etc"}, "destination may not cover /etc: /etc"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/"}, "destination not allowed: /"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/lib64"}, "destination not allowed: /lib64"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/opt"}, "may not cover /opt/udiImage: /opt"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/var"}, "may not cover /var/hostsfile: /var"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/usr/local"}, "may not cover /usr: /usr/local"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/../etc"}, "paths may not contain '..'"),
        ({"SPANK_SHIFTER_VOLUME": "/tmp:/home/x/y"}, "destination does not exist in the image"),
        ({"SPANK_SHIFTER_VOLUME": "/dev/null:/data"}, "source is not a directory or file"),
    ],
)
def test_user_mistakes_do_not_drain(
    node: Node, test_users: list[LabUser], extra: dict[str, str], message: str
) -> None:
    user = test_users[0]
    env = node.job_env(
        "201", user.name, user.uid, user.gid, **{"SPANK_SHIFTER_IMAGE": BUSYBOX, **extra}
    )
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    assert message in done.stderr
    assert message in _error_file(node, "201")
    assert node.leftovers() == [f"{node.state_path}/201.error"]
    assert node.epilog("201").returncode == 0
    assert node.leftovers() == []


def test_unreadable_volume_is_refused(
    node: Node, test_users: list[LabUser], tmp_path: Path
) -> None:
    user = test_users[0]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # root's: the user cannot read it
    env = node.job_env("202", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=f"{private}:/data:ro")  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 0
    assert f"--volume: source not readable by sstest1: {private}" in done.stderr


def test_root_job_gets_no_container(node: Node) -> None:
    env = node.job_env("203", "root", 0, 0, SPANK_SHIFTER_IMAGE=BUSYBOX)
    done = node.prolog(env)
    assert done.returncode == 0
    assert "containers are not built for root jobs" in done.stderr


@pytest.mark.parametrize(
    ("env", "message", "code"),
    [
        ({"SLURM_JOB_ID": ""}, "missing variable (is this run by slurmd?): SLURM_JOB_ID", 1),
        ({"SLURM_JOB_ID": "12;rm"}, "malformed SLURM_JOB_ID: 12;rm", 1),
        ({"SLURM_JOB_UID": "abc"}, "SLURM_JOB_UID is not a number: abc", 1),
        ({"SLURM_JOB_USER": "sstest2"}, "SLURM_JOB_USER does not match uid 2901: sstest2", 1),
        ({"SLURM_JOB_UID": "4242424"}, "uid unknown to this node's NSS: 4242424", 1),
        ({"SLURM_JOB_CPUS_PER_NODE": "x"}, "malformed SLURM_JOB_CPUS_PER_NODE: x", 0),
    ],
)
def test_bad_job_environment(
    node: Node, test_users: list[LabUser], env: dict[str, str], message: str, code: int
) -> None:
    user = test_users[0]
    full = node.job_env("204", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
    full.update(env)
    done = node.prolog(full)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    if full["SLURM_JOB_ID"] == "204":
        assert node.epilog("204").returncode == 0
    assert [p for p in node.leftovers() if not p.endswith(".error")] == []


def test_broken_config_drains(node: Node, test_users: list[LabUser]) -> None:
    user = test_users[0]
    Path(node.config).write_text("udiMont=/var/x\n")
    done = node.prolog(
        node.job_env("205", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
    )
    assert done.returncode == 1
    assert f"{node.config}:1: unknown key (did you mean udiMount?): udiMont" in done.stderr
    os.unlink(node.config)
    done = node.epilog_env("205", SPANK_SHIFTER_IMAGE=BUSYBOX)
    assert done.returncode == 1
    assert f"config: file not found: {node.config}" in done.stderr
    # Jobs that asked for no container never drain a node over shifter-sshd's config.
    assert node.epilog("205").returncode == 0
    plain = node.job_env("205", user.name, user.uid, user.gid)
    assert node.prolog(plain).returncode == 0
