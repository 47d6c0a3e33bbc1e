"""Bookkeeping of virtual clusters on this host: allocation, teardown, stale cleanup.

Each cluster owns ``LAB_ROOT/vc<index>`` (with an ``owner`` file: PID and start
time of the Python process that made it), the bridge ``sslab<index>`` and its
veths. Anything of the lab whose owner is gone is stale, so cleanup_stale() can run
at any time, even while other test runs have clusters up: it only touches clusters
whose owner process no longer exists.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .machine import Machine, delete_link, lab_links

LAB_ROOT = "/run/shifter-sshd-lab"
MAX_CLUSTERS = 250
_DIR = re.compile(r"^vc(\d+)$")
_LINK = re.compile(r"^sslab(\d+)(?:c|n\d+)?$")
_IN_CMDLINE = re.compile(re.escape(LAB_ROOT) + r"/vc(\d+)\b")


class LabError(RuntimeError):
    """A lab command failed; carries the exit status and stderr when there was one."""

    def __init__(self, message: str, returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


@contextmanager
def _lock() -> Iterator[None]:
    """Serialise allocation and stale cleanup between concurrent test runs."""
    os.makedirs(LAB_ROOT, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(LAB_ROOT, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start_time(pid: int) -> str | None:
    from shifter_sshd.kernel import processes

    started = processes.start_time(pid)
    return None if started is None else str(started)


def allocate() -> tuple[int, str]:
    """Claim a free index and its directory for the calling process."""
    with _lock():
        for index in range(1, MAX_CLUSTERS + 1):
            path = os.path.join(LAB_ROOT, f"vc{index}")
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue
            with open(os.path.join(path, "owner"), "w") as f:
                f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
            return index, path
    raise LabError(f"no free virtual cluster slot under {LAB_ROOT}")


def _owner_alive(path: str) -> bool:
    try:
        with open(os.path.join(path, "owner")) as f:
            pid_text, started = f.read().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid_text)) == started


def _lab_processes() -> Iterator[tuple[int, int]]:
    """(pid, cluster index) of every process whose command line names a cluster dir."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if match := _IN_CMDLINE.search(cmdline):
            yield int(entry), int(match.group(1))


def cleanup_stale() -> list[str]:
    """Remove what crashed runs left (processes, links, directories); say what."""
    removed: list[str] = []
    with _lock():
        live: set[int] = set()
        stale: list[str] = []
        for entry in os.listdir(LAB_ROOT):
            if match := _DIR.match(entry):
                path = os.path.join(LAB_ROOT, entry)
                if _owner_alive(path):
                    live.add(int(match.group(1)))
                else:
                    stale.append(path)
        for pid, index in _lab_processes():
            if index not in live and pid != os.getpid():
                _kill(pid)
                removed.append(f"process {pid}")
        for name in lab_links():
            match = _LINK.match(name)
            if match and int(match.group(1)) not in live:
                delete_link(name)
                removed.append(f"link {name}")
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_cgroups(node_names: list[str], wait: float = 5.0) -> None:
    """Remove the empty ``slurm_<node>`` cgroup trees Slurm made for these nodes.

    Only empty directories go (rmdir, deepest first), so a cluster side by side
    with the same node names keeps its live job cgroups. Killed processes leave
    their cgroups a moment after the kill, hence the short retry.
    """
    deadline = time.monotonic() + wait
    while True:
        left = []
        for node in node_names:
            for top in glob.glob(f"/sys/fs/cgroup/*/slurm_{node}"):
                left += _rmdir_tree(top)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _rmdir_tree(top: str) -> list[str]:
    """rmdir every directory under ``top`` (and ``top``), deepest first; what stays."""
    left = []
    for directory, _subdirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError:
            left.append(directory)
    return left


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Teardown:
    """All a cluster's teardown needs, apart from the Cluster (for its finalizer)."""

    root: str
    index: int
    node_names: list[str] = field(default_factory=list)
    machines: list[Machine] = field(default_factory=list)
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)
    munged: subprocess.Popen[bytes] | None = None
    done: bool = False
    seconds: float = 0.0

    def run(self) -> None:
        """Kill the machines (and so every process in them), munged, links, directory."""
        if self.done:
            return
        self.done = True
        start = time.monotonic()
        for machine in self.machines:
            machine.kill()
        for proc in [*self.daemons, *([self.munged] if self.munged else [])]:
            proc.kill()
            proc.wait()
        self._remove_links()
        remove_cgroups(self.node_names)
        shutil.rmtree(self.root, ignore_errors=True)
        self.seconds = time.monotonic() - start

    def _remove_links(self) -> None:
        """Delete the bridge and any veth not yet gone with its namespace."""
        deadline = time.monotonic() + 5
        while True:
            mine = [n for n in lab_links() if (m := _LINK.match(n)) and int(m[1]) == self.index]
            if not mine:
                return
            for name in mine:
                delete_link(name)
            if time.monotonic() > deadline:
                raise LabError(f"could not delete links: {', '.join(mine)}")
            time.sleep(0.02)
