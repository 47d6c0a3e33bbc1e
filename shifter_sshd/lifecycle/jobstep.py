"""The job's processes inside the job: adopted into the extern step, so Slurm sees them.

Slurm runs the Prolog before it creates the job's extern step (PrologFlags=Contain),
so the sshd the prolog starts sits outside the job until it is adopted. Adoption is
done by the SPANK plugin in the extern step itself (``slurm_spank_task_post_fork``
runs ``shifter-sshd adopt JOB``), which Slurm calls before it reports the prolog
done: no job step, hence no ssh session, can start before the sshd is the job's.
With ``PrologFlags=RunInJob`` (Slurm 24.05 and later) the prolog runs inside the
extern step, which then already exists: the prolog adopts the sshd itself. The
user namespace holder (``userns``) is adopted the same way.

Adopted, the sshd and everything started through it (sessions, orted, ranks) are in
the job's cgroups (cpuset, memory, devices), in ``scontrol listpids``, signalled by
``scancel`` and killed by Slurm at job end even if our epilog never runs. This needs
``PrologFlags=Contain`` and ``ProctrackType=proctrack/cgroup``: the prolog refuses to
start an sshd without them (a node error naming what is missing), unless the site
sets ``sshdJobContainment=0``.
"""

from __future__ import annotations

import os

from .. import log
from ..kernel import processes
from ..slurm import stepd as slurmstepd
from .state import JobState


def family(pid: int) -> list[int]:
    """``pid`` and its descendants now alive (ssh sessions, if any came already)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = processes.parent(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def adopt(job_id: str, state: JobState) -> list[int]:
    """Put the job's sshd (and its family) and user namespace holder into the job.

    Returns the pids adopted. A process that is gone (its user killed it) is skipped:
    not the node's fault. StepdError when the extern step refuses or is missing.
    """
    pids = []
    processes_of_the_job = (
        ("sshd", state.sshd_pid, state.sshd_start_time),
        ("userns holder", state.userns_pid, state.userns_start_time),
    )
    for name, pid, started in processes_of_the_job:
        if pid <= 0:
            continue
        if processes.start_time(pid) != started:
            log.warning(f"adopt: job {job_id}: its {name} (pid {pid}) is gone; not adopted")
            continue
        pids += family(pid)
    if pids:
        slurmstepd.adopt(job_id, pids)
        log.info(f"adopt: job {job_id}: pids {', '.join(map(str, pids))} are in its extern step")
    return pids


def adopt_if_in_job(job_id: str, state: JobState) -> None:
    """With PrologFlags=RunInJob the extern step exists already: adopt the job's
    processes (sshd, user namespace holder) now. Otherwise the SPANK plugin adopts
    them from the extern step, once Slurm made it."""
    from ..errors import node_error

    if slurmstepd.extern_socket(job_id) is None:
        return
    try:
        adopt(job_id, state)
    except slurmstepd.StepdError as err:
        raise node_error("prolog", "cannot put the job's processes into its extern step",
                         err) from None  # fmt: skip
