"""The job's sshd inside the job: adopted into the extern step, so Slurm sees it.

Slurm runs the Prolog before it creates the job's extern step (PrologFlags=Contain),
so the sshd the prolog starts sits outside the job until it is adopted. Adoption is
done by the SPANK plugin in the extern step itself (``slurm_spank_task_post_fork``
runs ``shifter-sshd adopt JOB``), which Slurm calls before it reports the prolog
done: no job step, hence no ssh session, can start before the sshd is the job's.
With ``PrologFlags=RunInJob`` (Slurm 24.05 and later) the prolog runs inside the
extern step, which then already exists: the prolog adopts the sshd itself.

Adopted, the sshd and everything started through it (sessions, orted, ranks) are in
the job's cgroups (cpuset, memory, devices), in ``scontrol listpids``, signalled by
``scancel`` and killed by Slurm at job end even if our epilog never runs. This needs
``PrologFlags=Contain`` and ``ProctrackType=proctrack/cgroup``: the prolog refuses to
start an sshd without them (a node error naming what is missing), unless the site
sets ``sshdJobContainment=0``.
"""

from __future__ import annotations

import os

from . import log, processes, slurmstepd
from .errors import node_error

REQUIRED = "PrologFlags=Contain (or RunInJob) and ProctrackType=proctrack/cgroup"


def slurm_conf_values(path: str, wanted: tuple[str, ...]) -> dict[str, str]:
    """``key=value`` settings of slurm.conf (and files it Includes), keys lower-cased."""
    found: dict[str, str] = {}
    _read_conf(path, {k.lower() for k in wanted}, found, depth=0)
    return found


def _read_conf(path: str, wanted: set[str], found: dict[str, str], depth: int) -> None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as err:
        raise node_error("slurm.conf", f"cannot read ({err.strerror})", path) from None
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        word, _sep, rest = line.partition(" ")
        if word.lower() == "include" and depth < 8:
            include = rest.strip()
            target = include if include.startswith("/") else os.path.join(
                os.path.dirname(path), include)  # fmt: skip
            _read_conf(target, wanted, found, depth + 1)
            continue
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() in wanted and " " not in key.strip():
            found[key.strip().lower()] = value.strip()


def missing_requirements(slurm_conf: str) -> list[str]:
    """What slurm.conf lacks for the sshd to be adopted and tracked; [] when nothing."""
    values = slurm_conf_values(slurm_conf, ("PrologFlags", "ProctrackType"))
    flags = {f.strip().lower() for f in values.get("prologflags", "").split(",")}
    problems = []
    if not flags & {"contain", "runinjob"}:
        problems.append(f"PrologFlags={values.get('prologflags', '')} lacks Contain")
    proctrack = values.get("proctracktype", "proctrack/cgroup")  # Slurm's default
    if proctrack.lower() != "proctrack/cgroup":
        problems.append(f"ProctrackType={proctrack} does not track adopted processes")
    return problems


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


def adopt(job_id: str, pid: int, started: int) -> bool:
    """Put our sshd (``pid`` with start time ``started``) and its family into the job.

    False when the sshd is gone (its user killed it: nothing to adopt, not the
    node's fault); StepdError when the extern step refuses or is missing.
    """
    if pid <= 0 or processes.start_time(pid) != started:
        log.warning(f"adopt: job {job_id}: its sshd (pid {pid}) is gone; nothing to adopt")
        return False
    slurmstepd.adopt(job_id, family(pid))
    log.info(f"adopt: job {job_id}: sshd pid {pid} is in the job's extern step")
    return True
