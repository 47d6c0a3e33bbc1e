"""Helpers for tests that run the real prolog and epilog on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lab import VENV

REPO = Path(__file__).resolve().parents[1]  # the checkout
TESTS = REPO / "tests"

CLI = os.path.join(VENV, "bin", "shifter-sshd")


@dataclass
class Node:
    """One node's worth of shifter-sshd paths, unique per test so tests never collide."""

    base: Path  # holds the config and the optUdiImage stand-in
    image_path: str
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.udi_mount = f"/var/udiMount-test-{tag}"
        self.loop_mount = f"/var/udiLoopMount-test-{tag}"
        self.state_path = f"/run/shifter-sshd-test-{tag}"
        self.opt_udi_image = str(self.base / "udiImage")
        os.makedirs(self.opt_udi_image, exist_ok=True)
        self.write_config()

    @property
    def config(self) -> str:
        return str(self.base / "udiRoot.conf")

    def write_config(self, **extra: str) -> None:
        self.extra.update(extra)
        settings = {
            "imagePath": self.image_path,
            "udiMount": self.udi_mount,
            "loopMount": self.loop_mount,
            "statePath": self.state_path,
            "optUdiImage": self.opt_udi_image,
            "enableSshd": "0",
            **self.extra,
        }
        text = "".join(f"{key}={value}\n" for key, value in settings.items())
        Path(self.config).write_text(text)

    def root(self, job_id: str) -> str:
        return f"{self.udi_mount}/{job_id}"

    def job_env(self, job_id: str, user: str, uid: int, gid: int, **extra: str) -> dict[str, str]:
        env = {
            "SLURM_JOB_ID": job_id,
            "SLURM_JOB_UID": str(uid),
            "SLURM_JOB_GID": str(gid),
            "SLURM_JOB_USER": user,
            "SLURMD_NODENAME": "node1",
            "SLURM_NODELIST": "node1",
            "SLURM_JOB_CPUS_PER_NODE": "2",
            "SLURM_CLUSTER_NAME": "testcluster",
        }
        env.update(extra)
        return env

    def prolog(self, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return run([CLI, "--config", self.config, "prolog"], env)

    def epilog(self, job_id: str) -> subprocess.CompletedProcess[str]:
        return self.epilog_env(job_id)

    def epilog_env(self, job_id: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run([CLI, "--config", self.config, "epilog"], {"SLURM_JOB_ID": job_id, **extra})

    def leftovers(self) -> list[str]:
        """Everything a job could leave behind on this node: must be empty."""
        left = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if self.udi_mount in line.split()[4] or self.loop_mount in line.split()[4]
        ]
        for area in (self.udi_mount, self.loop_mount, self.state_path):
            if os.path.isdir(area):
                left += [f"{area}/{name}" for name in os.listdir(area)]
        return left + attached_loops(self.image_path)

    def cleanup(self) -> None:
        """Best effort for a failed test: never leave mounts for the next one."""
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            target = line.split()[4]
            if target.startswith((self.udi_mount, self.loop_mount)):
                subprocess.run(["umount", "-l", target], check=False)
        for area in (self.udi_mount, self.loop_mount):
            if os.path.isdir(area):
                for name in os.listdir(area):
                    os.rmdir(f"{area}/{name}") if not os.path.ismount(f"{area}/{name}") else None
                os.rmdir(area)
        subprocess.run(["rm", "-rf", "--one-file-system", self.state_path], check=False)


def attached_loops(image_path: str) -> list[str]:
    """Loop devices backed by a file of this image store."""
    found = []
    for name in os.listdir("/sys/block"):
        backing = f"/sys/block/{name}/loop/backing_file"
        try:
            with open(backing, encoding="utf-8") as handle:
                if handle.read().startswith(image_path):
                    found.append(f"/dev/{name}")
        except OSError:
            continue
    return found


def run(
    argv: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def in_root(root: str, uid: int, gids: list[int], script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script inside the container root as the user (chroot, then drop)."""
    groups = ",".join(map(str, gids))
    argv = [
        "/usr/sbin/chroot",
        f"--userspec={uid}:{gids[0]}",
        f"--groups={groups}",
        root,
        "/bin/sh",
        "-c",
        script,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/"})  # fmt: skip


def wait_for_banner(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until an sshd started by a test answers with its banner; fail with its log."""
    import pytest

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sshd exited {process.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"sshd did not answer on port {port}: {log.read_text()}")
