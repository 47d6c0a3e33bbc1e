"""``shifter-sshd status``: the containers on this node, what they run, what is stale.

Read-only: state files, the mount table and /proc. A container is *stale* when its
job no longer runs here (no stepd of it answers: the ``leftovers`` test); the next
prolog on the node removes it, or ``shifter-sshd epilog`` run by hand with its job id.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from ..config.udiroot import Config
from ..kernel import mounts, processes
from ..kernel.areas import job_dirs
from ..lifecycle import leftovers
from ..lifecycle.state import StateStore


@dataclass(frozen=True)
class Container:
    job_id: str
    user: str
    image: str
    age_seconds: int
    sshd_pid: int  # 0: none, or not running any more
    sshd_port: int
    sessions: int  # connections the sshd serves now
    mounts: int
    state: str  # building, ready, stale


def containers(config: Config, slurm_conf: str = "") -> list[Container]:
    store = StateStore(config.state_path)
    table = mounts.mountinfo()
    found = []
    now = time.time()
    stale = set(leftovers.dead(config, store, "", None, slurm_conf))
    for job_id in leftovers.jobs_on_node(config, store):
        state = store.load(job_id)
        description = _description(store, job_id)
        root, scratch = job_dirs(config, job_id)
        tops = {e.mount_id for e in table if e.target in (os.fsencode(root), os.fsencode(scratch))}
        alive = state is not None and processes.start_time(state.sshd_pid) == state.sshd_start_time
        sshd = state.sshd_pid if state is not None and state.sshd_pid and alive else 0
        condition = "building" if state is not None and not state.complete else "ready"
        if job_id in stale:
            condition = "stale"
        found.append(Container(
            job_id=job_id, user=state.user if state else "?",
            image=str(description.get("image") or (state.image_id[:12] if state else "?")),
            age_seconds=int(now - state.created) if state and state.created else 0,
            sshd_pid=sshd, sshd_port=_int(description.get("sshd_port")),
            sessions=len(_children(sshd)) if sshd else 0,
            mounts=len(mounts.tree(tops, table)), state=condition,
        ))  # fmt: skip
    return found


def _description(store: StateStore, job_id: str) -> dict[str, object]:
    try:
        with open(store.container_path(job_id), encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def report(found: list[Container], as_json: bool) -> str:
    if as_json:
        return json.dumps([asdict(c) for c in found], indent=1)
    if not found:
        return "no containers on this node"
    header = f"{'JOB':<10} {'USER':<12} {'IMAGE':<28} {'AGE':>8} {'SSHD':>14} {'SESSIONS':>8} "
    lines = [header + f"{'MOUNTS':>6} STATE"]
    for c in found:
        sshd = f"{c.sshd_pid}:{c.sshd_port}" if c.sshd_pid else "-"
        lines.append(f"{c.job_id:<10} {c.user:<12} {c.image[:28]:<28} {_age(c.age_seconds):>8} "
                     f"{sshd:>14} {c.sessions:>8} {c.mounts:>6} {c.state}")  # fmt: skip
    return "\n".join(lines)


def _age(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
