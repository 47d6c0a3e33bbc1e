"""Which containers on this node belong to no running job: they are leftovers.

A job's epilog may never run (slurmd restarted, the node rebooted into the same
state directory, an admin killed it). Its container then holds mounts, a loop
device and maybe the sshd port until something removes it. Whether a job still
runs here is decided from slurmd's own knowledge, the stepd sockets on this node
(``slurmstepd.job_running``): with ``PrologFlags=Contain`` every running job keeps
its extern step on every node of its allocation, so a job with no live stepd here
is over, whatever slurmctld says or does not say.

A container whose prolog may still be running (not complete yet) or finished a
moment ago (its extern step may not exist yet) is left alone. Without Contain a
running job may have no step here between two sruns, so the old rule stays: only
an exclusive job may take every other job's container for a dead one.
"""

from __future__ import annotations

import os
import time

from ..config.udiroot import Config
from ..slurm import conf as slurmconf
from ..slurm import stepd as slurmstepd
from .state import StateStore

GRACE = 60  # seconds after a prolog finished before a missing extern step means "over"


def jobs_on_node(config: Config, store: StateStore) -> list[str]:
    """Every job with a state file, an error file or a directory in the areas."""
    found = set(store.job_ids())
    try:
        found.update(n[: -len(".error")] for n in os.listdir(config.state_path)
                     if n.endswith(".error") and n[: -len(".error")].isdigit())  # fmt: skip
    except FileNotFoundError:
        pass
    for area in (config.udi_mount, config.loop_mount):
        try:
            found.update(name for name in os.listdir(area) if name.isdigit())
        except FileNotFoundError:
            pass
    return sorted(found)


def dead(config: Config, store: StateStore, job_id: str, exclusive: bool | None,
         slurm_conf: str) -> list[str]:  # fmt: skip
    """Other jobs' containers on this node whose jobs are over."""
    others = [j for j in jobs_on_node(config, store) if j != job_id]
    if not others:
        return []
    if slurm_conf and _contained(slurm_conf):
        return [j for j in others if _over(store, j)]
    return others if exclusive else []


def _contained(slurm_conf: str) -> bool:
    return bool(slurmconf.prolog_flags(slurm_conf) & {"contain", "runinjob"})


def _over(store: StateStore, job_id: str) -> bool:
    state = store.load(job_id)
    if state is not None and (not state.complete or time.time() - state.created < GRACE):
        return False  # its prolog runs, or its extern step may be on its way
    return not slurmstepd.job_running(job_id)
