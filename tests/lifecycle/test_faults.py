"""Fault injection: the prolog and epilog killed at every step, processes left behind,
busy mounts, foreign mount namespaces. After each, the next run leaves nothing, and
every canary in volumes and siteFs is intact."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BUSYBOX
from sshjob import _start
from support import Node

from lab.users import LabUser
from shifter_sshd.lifecycle.prolog import STEPS

TEARDOWN_STEPS = (
    "stop sshd",
    "stop processes",
    "unmount",
    "foreign mounts",
    "directories",
    "state",
)


@dataclass
class Canaries:
    volume: Path
    site: Path

    def intact(self) -> bool:
        return (self.volume / "canary").read_text() == "volume data\n" and (
            self.site / "canary"
        ).read_text() == "site data\n"


@pytest.fixture
def canaries(node: Node, user_tmp: Path, test_users: list[LabUser]) -> Iterator[Canaries]:
    user = test_users[0]
    volume, site = user_tmp / "volume", user_tmp / "site"
    for path, text in ((volume, "volume data\n"), (site, "site data\n")):
        path.mkdir()
        (path / "canary").write_text(text)
    os.chown(volume, user.uid, user.gid)
    node.write_config(siteFs=f"{site}:/site")
    found = Canaries(volume, site)
    yield found
    assert found.intact()


def _env(node: Node, user: LabUser, job: str, canaries: Canaries, **extra: str) -> dict[str, str]:
    return node.job_env(job, user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                        SPANK_SHIFTER_VOLUME=f"{canaries.volume}:/data", **extra)  # fmt: skip


@pytest.mark.parametrize("step", [name for name, _step in STEPS])
def test_prolog_killed_at_every_step(
    node: Node, test_users: list[LabUser], canaries: Canaries, step: str
) -> None:
    user = test_users[0]
    done = node.prolog(_env(node, user, "401", canaries, SHIFTER_SSHD_FAULT=f"kill:{step}"))
    assert done.returncode == -signal.SIGKILL
    again = node.prolog(_env(node, user, "401", canaries))  # a retried prolog cleans up first
    assert again.returncode == 0, again.stderr
    assert Path(node.root("401"), "data/canary").exists()
    done = node.epilog("401")
    assert done.returncode == 0, done.stderr
    assert node.leftovers() == []


@pytest.mark.parametrize("step", TEARDOWN_STEPS)
def test_epilog_killed_at_every_step(
    node: Node, test_users: list[LabUser], canaries: Canaries, step: str
) -> None:
    user = test_users[0]
    assert node.prolog(_env(node, user, "402", canaries)).returncode == 0
    killed = node.epilog_env("402", SHIFTER_SSHD_FAULT=f"kill:{step}")
    assert killed.returncode == -signal.SIGKILL
    done = node.epilog("402")
    assert done.returncode == 0, done.stderr
    assert node.leftovers() == []


@pytest.mark.parametrize(("step", "drains"), [("unmount", True), ("state", False)])
def test_epilog_bug_is_logged_and_drains_only_with_mounts_left(
    node: Node, test_users: list[LabUser], canaries: Canaries, step: str, drains: bool
) -> None:
    """An unexpected exception: its traceback logged; exit 1 only if the job's mounts remain."""
    user = test_users[0]
    assert node.prolog(_env(node, user, "403", canaries)).returncode == 0
    buggy = node.epilog_env("403", SHIFTER_SSHD_FAULT=f"bug:{step}")
    assert buggy.returncode == (1 if drains else 0), buggy.stderr
    assert "epilog: job 403: internal error: RuntimeError" in buggy.stderr
    assert "Traceback (most recent call last):" in buggy.stderr
    done = node.epilog("403")
    assert done.returncode == 0, done.stderr
    assert node.leftovers() == []
    assert Path(canaries.volume, "canary").exists()


def _spawn_inside(root: str, user: LabUser, script: str) -> None:
    """A detached process inside the container, as the user (setsid, nohup, background)."""
    subprocess.run(["/usr/sbin/chroot", f"--userspec={user.uid}:{user.gid}", root, "/bin/sh",
                    "-c", f"cd /data; setsid nohup sh -c '{script}' >/dev/null 2>&1 &"],
                   check=True)  # fmt: skip


def test_detached_and_busy_processes_are_stopped(
    node: Node, test_users: list[LabUser], canaries: Canaries
) -> None:
    user = test_users[0]
    assert node.prolog(_env(node, user, "403", canaries)).returncode == 0
    root = node.root("403")
    _spawn_inside(root, user, 'trap "" TERM; sleep 600')  # ignores SIGTERM
    _spawn_inside(root, user, "(sleep 600 &) ; sleep 600")  # double fork
    host_side = subprocess.Popen(  # on the host, its cwd in the volume's mount
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "sleep", "600"],
        cwd=f"{root}/data", start_new_session=True,
    )  # fmt: skip
    time.sleep(0.3)
    node.write_config(killGrace="0.5")
    done = node.epilog("403")
    assert done.returncode == 0, done.stderr
    assert "stopped" in done.stderr
    assert host_side.wait(timeout=5) != 0
    assert node.leftovers() == []
    assert subprocess.run(["pgrep", "-u", str(user.uid), "-f", "sleep 600"],
                          capture_output=True, check=False).stdout == b""  # fmt: skip


def test_copy_in_another_mount_namespace(
    node: Node, test_users: list[LabUser], canaries: Canaries
) -> None:
    user = test_users[0]
    assert node.prolog(_env(node, user, "404", canaries)).returncode == 0
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
    try:
        time.sleep(0.3)
        copies = Path(f"/proc/{holder.pid}/mountinfo").read_text()
        assert node.root("404") in copies  # it captured the container's mounts
        done = node.epilog("404")
        assert done.returncode == 0, done.stderr
        assert "copied mount(s) in the mount namespace" in done.stderr
        assert node.leftovers() == []  # the loop device is free too
        assert holder.poll() is None  # the bystander itself was left alone
    finally:
        holder.kill()
        holder.wait()


def test_sshd_killed_mid_job(
    node: Node, test_users: list[LabUser], bundle: str, secret_file: str
) -> None:
    job = _start(node, test_users[0], BUSYBOX, "405", bundle, secret_file)
    state = Path(node.state_path, "405.json").read_text()
    os.kill(int(state.split('"sshd_pid":')[1].split(",")[0]), signal.SIGKILL)
    done = node.epilog(job.job_id)
    assert done.returncode == 0, done.stderr
    assert node.leftovers() == []


def test_other_containers_untouched_without_slurms_word(
    node: Node, test_users: list[LabUser], canaries: Canaries
) -> None:
    """Not knowing whether the job is exclusive, the prolog leaves other jobs alone:
    they may be live jobs sharing the node (the cluster tests show the replacement)."""
    user = test_users[0]
    assert node.prolog(_env(node, user, "406", canaries)).returncode == 0
    done = node.prolog(_env(node, user, "407", canaries))
    assert done.returncode == 0, done.stderr
    assert Path(node.root("406"), "data/canary").exists()
    assert Path(node.root("407"), "data/canary").exists()
    for job in ("406", "407"):
        assert node.epilog(job).returncode == 0
    assert node.leftovers() == []
