"""slurm.conf, read: the few settings the prolog has to know about.

Only ``key=value`` lines matter here (keys are case-insensitive, ``#`` starts a
comment, ``Include`` pulls in another file, relative to slurm.conf's directory).
The path comes from ``SLURM_CONF`` in the prolog's environment, set by slurmd.
"""

from __future__ import annotations

import os
import socket

from ..errors import node_error

TYPE_CHECKING = False  # typing costs the prolog ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from ..config.udiroot import SiteMount

REQUIRED = "PrologFlags=Contain (or RunInJob) and ProctrackType=proctrack/cgroup"
DEFAULT_SPOOL = "/var/spool/slurmd"  # Slurm's compiled-in SlurmdSpoolDir


def values(path: str, wanted: tuple[str, ...]) -> dict[str, str]:
    """``key=value`` settings of slurm.conf (and files it Includes), keys lower-cased."""
    found: dict[str, str] = {}
    _read(path, {k.lower() for k in wanted}, found, depth=0)
    return found


def _read(path: str, wanted: set[str], found: dict[str, str], depth: int) -> None:
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
            _read(target, wanted, found, depth + 1)
            continue
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() in wanted and " " not in key.strip():
            found[key.strip().lower()] = value.strip()


def prolog_flags(path: str) -> set[str]:
    flags = values(path, ("PrologFlags",)).get("prologflags", "")
    return {flag.strip().lower() for flag in flags.split(",") if flag.strip()}


def missing_requirements(path: str) -> list[str]:
    """What slurm.conf lacks for the sshd to be adopted and tracked; [] when nothing."""
    found = values(path, ("PrologFlags", "ProctrackType"))
    problems = []
    if not prolog_flags(path) & {"contain", "runinjob"}:
        problems.append(f"PrologFlags={found.get('prologflags', '')} lacks Contain")
    proctrack = found.get("proctracktype", "proctrack/cgroup")  # Slurm's default
    if proctrack.lower() != "proctrack/cgroup":
        problems.append(f"ProctrackType={proctrack} does not track adopted processes")
    return problems


def spool_dir(path: str, node_name: str) -> str:
    """SlurmdSpoolDir with slurmd's ``%n`` (node name) and ``%h`` (host name) expanded."""
    spool = values(path, ("SlurmdSpoolDir",)).get("slurmdspooldir", DEFAULT_SPOOL)
    host = socket.gethostname().split(".")[0]
    return spool.replace("%n", node_name).replace("%h", host)


def check_containment(slurm_conf: str, wanted: bool, job_id: str) -> None:
    """The sshd will be the job's (lifecycle/jobstep.py): slurm.conf must let it be."""
    if not slurm_conf:
        return  # run by hand, not by slurmd: there is no job step to join
    if not wanted:
        from .. import log

        log.warning(f"prolog: job {job_id}: sshdJobContainment=0: the sshd and its "
                    "sessions run outside the job's cgroups")  # fmt: skip
        return
    problems = missing_requirements(slurm_conf)
    if problems:
        raise node_error("slurm.conf", f"the container sshd needs {REQUIRED} "
                         "(or sshdJobContainment=0)", "; ".join(problems))  # fmt: skip


def spool_mounts(conf: str, node_name: str) -> list[SiteMount]:
    """SlurmdSpoolDir at its own path, read-write: PMIx's rendezvous and shared-memory
    store (``pmix.<job>.<step>``, made there for each step later) for ``srun --mpi=pmix
    shifter``. The user reaches nothing there they could not reach on the host."""
    from ..config.udiroot import SiteMount

    spool = spool_dir(conf, node_name)
    if not os.path.isdir(spool):
        from .. import log

        log.warning(f"prolog: SlurmdSpoolDir {spool} is not a directory: PMIx steps in "
                    "containers will fall back to slower exchanges")  # fmt: skip
        return []
    return [SiteMount(spool, spool, read_only=False, recursive=True)]
