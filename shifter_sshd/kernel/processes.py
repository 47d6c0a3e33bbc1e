"""Finding and stopping everything a job left running in or against its container.

A process belongs to the container when its root directory is the container root
(ssh sessions, orted, anything started through sshd or shifter, however it
detached: setsid, nohup, double fork), or when it runs as the job user with its
working directory inside the container's mounts, or sits in the job's cgroup where
Slurm made one. Pids are matched with their start time so a recycled pid is spared.

The epilog imports this module: it stays free of signal, re, glob and dataclasses
(together about 12 ms of the epilog's start).
"""

from __future__ import annotations

import os
import time

SIGKILL = 9  # Linux's numbers: the signal module costs 2.6 ms (enum) to import
SIGTERM = 15


class Proc:
    __slots__ = ("name", "pid", "start")

    def __init__(self, pid: int, start: int, name: str) -> None:
        self.pid = pid
        self.start = start  # clock ticks since boot, field 22 of /proc/<pid>/stat
        self.name = name


class Stat:
    """The fields of ``/proc/<pid>/stat`` we use; ``read_stat`` is their one parser."""

    __slots__ = ("name", "parent", "session", "start", "state")

    def __init__(self, name: str, state: str, parent: int, session: int, start: int) -> None:
        self.name = name
        self.state = state  # R, S, D, T (stopped), t (traced), Z (zombie), X (dead)...
        self.parent = parent
        self.session = session
        self.start = start  # clock ticks since boot: tells the process from a later one


def read_stat(pid: int) -> Stat | None:
    """``pid``'s stat, or None when it is gone. The command name may hold spaces and
    parentheses, so the fields are counted from the last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    name = raw[raw.find("(") + 1 : raw.rfind(")")]
    return Stat(name, fields[0], int(fields[1]), int(fields[3]), int(fields[19]))


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(start time, command name, state) or None when the process is gone."""
    stat = read_stat(pid)
    return None if stat is None else (stat.start, stat.name, stat.state)


def start_time(pid: int) -> int | None:
    """The process's start time, which tells it from a later process with its pid."""
    stat = read_stat(pid)
    return None if stat is None else stat.start


def state(pid: int) -> str:
    """``pid``'s state letter ('' when it is gone)."""
    stat = read_stat(pid)
    return "" if stat is None else stat.state


def _under(path: str, areas: tuple[str, ...]) -> bool:
    return any(path == area or path.startswith(area.rstrip("/") + "/") for area in areas)


def _subdirs(path: str, prefix: str = "") -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.path for e in entries if e.name.startswith(prefix)
                    and e.is_dir(follow_symlinks=False)]  # fmt: skip
    except OSError:
        return []


def _job_cgroups(job_id: str) -> list[str]:
    """The job's cgroup directories: cgroup v1 ``<controller>/slurm*/uid_*/job_<id>``, or
    v2 ``system.slice/**/job_<id>`` (where Slurm's plugins made them)."""
    name = f"job_{job_id}"
    found = []
    for controller in _subdirs("/sys/fs/cgroup"):
        for slurm in _subdirs(controller, "slurm"):
            uids = _subdirs(slurm, "uid_")
            found += [os.path.join(u, name) for u in uids if os.path.isdir(os.path.join(u, name))]
    for top, dirs, _files in os.walk("/sys/fs/cgroup/system.slice"):
        if name in dirs:
            found.append(os.path.join(top, name))
            dirs.remove(name)
    return found


def _job_cgroup_pids(job_id: str) -> set[int]:
    """Pids in the job's cgroups and their children, where Slurm's plugins made them."""
    pids: set[int] = set()
    for cgroup in _job_cgroups(job_id):
        for top, _dirs, files in os.walk(cgroup):
            if "cgroup.procs" not in files:
                continue
            try:
                with open(os.path.join(top, "cgroup.procs"), encoding="ascii") as handle:
                    pids.update(int(line) for line in handle if line.strip())
            except (OSError, ValueError):
                continue
    return pids


def find(root: str, areas: tuple[str, ...], uid: int, job_id: str) -> list[Proc]:
    """Processes to stop for this job: see the module's docstring."""
    me = os.getpid()
    cgroup = _job_cgroup_pids(job_id) if uid >= 0 else set()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        if not _belongs(pid, root, areas, uid, cgroup):
            continue
        stat = _stat(pid)
        if stat is not None and stat[2] != "Z":
            found.append(Proc(pid, stat[0], stat[1]))
    return found


def _belongs(pid: int, root: str, areas: tuple[str, ...], uid: int, cgroup: set[int]) -> bool:
    try:
        if _under(os.readlink(f"/proc/{pid}/root"), (root,)):
            return True
        if uid < 0 or os.stat(f"/proc/{pid}").st_uid != uid:
            return False
        return pid in cgroup or _under(os.readlink(f"/proc/{pid}/cwd"), areas)
    except OSError:
        return False  # gone, or a kernel thread


def parent(pid: int) -> int | None:
    """The parent pid, or None when the process is gone."""
    stat = read_stat(pid)
    return None if stat is None else stat.parent


def owner(pid: int) -> int:
    """The uid owning ``pid``, or -1 when it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def slurm_jobs(pid: int) -> set[str] | None:
    """The Slurm jobs whose cgroups hold ``pid`` (none: outside every job); None if gone."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    import re

    return set(re.findall(r"/job_(\d+)(?=/|$)", text, re.MULTILINE))


def kill_now(pids: list[int], wait: float = 2.0) -> None:
    """SIGKILL ``pids`` (start time checked) and wait until they are gone."""
    victims = [Proc(pid, start, "") for pid in pids if (start := start_time(pid)) is not None]
    _signal(victims, SIGKILL)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(_alive(p) for p in victims):
        time.sleep(0.01)


def _alive(proc: Proc) -> bool:
    stat = _stat(proc.pid)
    return stat is not None and stat[0] == proc.start and stat[2] != "Z"


def _signal(procs: list[Proc], sig: int) -> None:
    for proc in procs:
        stat = _stat(proc.pid)
        if stat is None or stat[0] != proc.start:
            continue  # gone; or the pid now names another process
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def signal_if_same(pid: int, started: int, sig: int) -> bool:
    """Signal ``pid`` if it is still the process that started at ``started``."""
    if pid <= 0 or start_time(pid) != started:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop(root: str, areas: tuple[str, ...], uid: int, job_id: str, grace: float) -> list[Proc]:
    """SIGTERM, ``grace`` seconds, SIGKILL; returns once they are all gone (zombies count
    as gone: they hold no mount)."""
    victims = find(root, areas, uid, job_id)
    if not victims:
        return []
    _signal(victims, SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and find(root, areas, uid, job_id):
        time.sleep(0.02)
    for _round in range(100):
        left = find(root, areas, uid, job_id)
        if not left:
            break
        _signal(left, SIGKILL)
        time.sleep(0.02)
    return victims
