"""What the prolog needs from slurmctld beyond the environment slurmd gives it.

slurmd hands a Prolog no task count, and before Slurm 23.02 no end time and no
sharing mode either (docs/integration.md), yet the prolog needs all three: the tasks per node
for /var/hostsfile, the job's end for the certificates' validity, and whether the
job has its nodes to itself (Shifter gives jobs that share their nodes no container
sshd: two jobs' sshds would fight over one port).

One job, one cheap question: ``squeue -h -j <id> -O ...`` asks slurmctld for this
job alone (squeue's single-job request), whatever the queue holds, and prints only
numbers and enumerations (no job name, comment or path a user could fill with text
that looks like another field), with ``SLURM_TIME_FORMAT=%s`` for epoch seconds.
Where the Prolog environment has a fact (``SLURM_JOB_END_TIME``,
``SLURM_JOB_OVERSUBSCRIBE`` from 23.02, ``SLURM_JOB_EXCLUSIVE`` from 26.05), it wins:
it is the same on every node by construction.

Every node of a job derives the same facts from the same answer, or fails the same
way: when slurmctld does not answer, :func:`query` raises, the prolog turns that into
the job's error (the node stays in service), and Slurm's own message is in the log.

What the fields mean (verified on the virtual cluster, Slurm 22.05):

- ``OverSubscribe``: ``NO`` for ``--exclusive`` and partitions with
  ``OverSubscribe=EXCLUSIVE``; ``OK`` for the default (the job gets cores, other jobs
  may get the node's other cores); ``YES`` for ``--oversubscribe``; ``USER`` and
  ``MCS`` for ``--exclusive=user|mcs``. Only ``NO`` means the nodes are the job's
  alone, the test Shifter applies.
- ``NumTasks``: ``-n``, or the node count when no ``-n`` was given (indistinguishable);
  ``NTPerNode``: ``--ntasks-per-node`` or 0; ``cpus-per-task``: ``-c`` or 1.
- ``EndTime``: start plus the time limit (plus one year when the limit is infinite).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import log
from ..errors import ShifterError, node_error
from .hostlist import expand_cpus_per_node, expand_nodelist
from .jobid import job_id_from_env

SQUEUE = "/usr/bin/squeue"
WHERE = "slurm"
# The fields asked for, in order; none can hold free text.
INFINITE = 365 * 24 * 3600  # Slurm's end time for an infinite limit: start plus a year
FIELDS = ("JobID", "NumTasks", "NTPerNode", "cpus-per-task", "OverSubscribe", "EndTime",
          "NumNodes")  # fmt: skip
# What a prolog may inherit besides SLURM_*: enough for squeue, nothing of the job's.
_PASS_ENV = ("SLURM_CONF", "TZ", "LANG", "LC_ALL")


@dataclass(frozen=True)
class JobDetails:
    """The job as slurmctld sees it; a field is None when it cannot be told."""

    tasks_per_node: list[int] | None  # in SLURM_NODELIST order, one count per node
    end_time: int | None  # seconds since the epoch
    exclusive: bool | None  # True only when no other job can share the nodes
    source: str  # "squeue" or "pyslurm", for the log


def query(env: Mapping[str, str], timeout: float = 15.0) -> JobDetails:
    """The job's details; ShifterError (with Slurm's own words) when Slurm cannot say."""
    job_id = int(job_id_from_env(env))
    backend = _pyslurm_record if _pyslurm_available() else _squeue_record
    record, source = backend(job_id, env, timeout)
    return details_from_record(_with_environment(record, env), env, source)


def _with_environment(record: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Facts the Prolog environment has (Slurm 23.02 and later) win over the query's."""
    merged = dict(record)
    end, start = env.get("SLURM_JOB_END_TIME", ""), env.get("SLURM_JOB_START_TIME", "")
    if end.isdigit():
        # An infinite limit is written as a year after the start (23.02 and later put it
        # in the environment too): no end time, as squeue's "Unknown" says on 22.05.
        infinite = start.isdigit() and int(end) - int(start) >= INFINITE
        merged["end_time"] = None if infinite else int(end)
    exclusive = env.get("SLURM_JOB_EXCLUSIVE", "")  # 26.05: NO, NODE, USER, MCS, TOPO
    if exclusive:
        merged["shared"] = "none" if exclusive.upper() == "NODE" else "shared"
    elif env.get("SLURM_JOB_OVERSUBSCRIBE"):  # 23.02-25.11: NO means exclusive
        merged["shared"] = "none" if env["SLURM_JOB_OVERSUBSCRIBE"].upper() == "NO" else "ok"
    return merged


# --- squeue ---------------------------------------------------------------------------


def _squeue_record(
    job_id: int, env: Mapping[str, str], timeout: float
) -> tuple[dict[str, Any], str]:
    child_env = {k: env[k] for k in _PASS_ENV if k in env}
    child_env.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", SLURM_TIME_FORMAT="%s")
    fields = ",".join(f"{name}:|" for name in FIELDS)
    try:
        done = subprocess.run(
            [SQUEUE, "-h", "-j", str(job_id), "-O", fields],
            capture_output=True,
            env=child_env,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise node_error(WHERE, f"squeue gave no answer within {timeout:g} s", SQUEUE) from None
    except OSError as err:
        raise node_error(WHERE, f"cannot run squeue ({err.strerror})", SQUEUE) from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise node_error(
            WHERE, f"squeue failed (exit {done.returncode})", detail[-1] if detail else SQUEUE
        )
    return parse_squeue(done.stdout.decode(errors="replace"), job_id), "squeue"


def parse_squeue(output: str, job_id: int) -> dict[str, Any]:
    """The job's line of ``squeue -h -j ID -O <FIELDS, each ending in '|'>``."""
    for line in output.splitlines():
        values = [v.strip() for v in line.split("|")]
        if len(values) < len(FIELDS) or values[0] != str(job_id):
            continue
        raw = dict(zip(FIELDS, values, strict=False))
        record: dict[str, Any] = {"job_id": job_id}
        for field, key in (("NumTasks", "tasks"), ("NTPerNode", "tasks_per_node"),
                           ("cpus-per-task", "cpus_per_task"), ("EndTime", "end_time"),
                           ("NumNodes", "node_count")):  # fmt: skip
            if raw[field].isdigit():
                record[key] = int(raw[field])
        record["shared"] = "none" if raw["OverSubscribe"] == "NO" else raw["OverSubscribe"].lower()
        return record
    raise node_error(WHERE, "job not in squeue's answer", f"{job_id}: {output.strip()[:200]!r}")


# --- pyslurm (optional) ---------------------------------------------------------------


def _pyslurm_available() -> bool:
    if os.environ.get("SHIFTER_SSHD_NO_PYSLURM"):
        return False
    try:
        import pyslurm  # noqa: F401
    except ImportError:
        return False
    return True


def _pyslurm_record(
    job_id: int, env: Mapping[str, str], timeout: float
) -> tuple[dict[str, Any], str]:
    """One job through libslurm (a single-job RPC). UNTESTED HERE.

    pyslurm builds only against Slurm 25.11 (docs/integration.md), so this path never runs in
    the lab. It maps pyslurm >= 23's ``Job`` attributes onto the field names
    :func:`details_from_record` reads. ``timeout`` is libslurm's own
    (MessageTimeout): pyslurm offers no per-call limit.
    """
    import pyslurm

    try:
        job = pyslurm.Job.load(job_id)
    except Exception as err:  # pyslurm raises its own RPCError and friends
        raise node_error(WHERE, "pyslurm cannot load the job", f"{job_id}: {err}") from None
    sharing = getattr(job, "resource_sharing", getattr(job, "shared", None))
    record: dict[str, Any] = {
        "job_id": job_id,
        "node_count": getattr(job, "num_nodes", None),
        "tasks": getattr(job, "ntasks", None),
        "tasks_per_node": getattr(job, "ntasks_per_node", None),
        "cpus_per_task": getattr(job, "cpus_per_task", None),
        "end_time": getattr(job, "end_time", None),
        "shared": "none" if str(sharing).lower() in ("none", "no", "exclusive", "0") else "",
    }
    return record, "pyslurm"


# --- from a record to the details -------------------------------------------------------


def _int(record: Mapping[str, Any], name: str) -> int | None:
    value = record.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def details_from_record(
    record: Mapping[str, Any], env: Mapping[str, str], source: str
) -> JobDetails:
    """Combine slurmctld's record with the environment's allocation."""
    end = _int(record, "end_time")
    shared = record.get("shared", "missing")
    exclusive = None if shared == "missing" else shared == "none"
    return JobDetails(_tasks(record, env), end if end and end > 0 else None, exclusive, source)


def _tasks(record: Mapping[str, Any], env: Mapping[str, str]) -> list[int] | None:
    """Per-node task counts, or None (logged) where record and environment disagree."""
    node_list = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    count = env.get("SLURM_JOB_NUM_NODES", "")
    # The prolog expands the list anyway; 11 ms at 10,000 nodes is not worth twice.
    nodes = int(count) if count.isdigit() else len(expand_nodelist(node_list))
    if nodes == 0:
        return None
    if record.get("node_count") not in (None, nodes):
        log.warning(
            f"shifter-sshd: {WHERE}: squeue's node count is not SLURM_NODELIST's: "
            f"{record.get('node_count')} != {nodes} ({node_list})"
        )
        return None
    try:
        cpus = expand_cpus_per_node(env.get("SLURM_JOB_CPUS_PER_NODE", ""), nodes)
    except ShifterError as err:
        log.warning(str(err))
        return None
    tasks = _int(record, "tasks") or 0
    per_node = _int(record, "tasks_per_node") or 0
    per_task = _int(record, "cpus_per_task") or 1
    return distribute(cpus, tasks, per_node, per_task)


def distribute(cpus: list[int], tasks: int, per_node: int = 0, per_task: int = 1) -> list[int]:
    """Tasks per node as Slurm lays out the batch step (SLURM_TASKS_PER_NODE).

    ``--ntasks-per-node`` wins. Without ``-n`` (squeue then reports one task per node,
    which an explicit ``-n <nodes>`` also gives) a node runs one task per
    ``per_task`` CPUs, as Slurm's batch environment says. Otherwise Slurm's block
    layout (slurm_step_layout.c, without CR_PACK_NODES): one task on every node,
    then fill each node's CPUs in order, then deal the rest round-robin.
    """
    n = len(cpus)
    per_task = max(per_task, 1)
    slots = [max(c // per_task, 1) for c in cpus]
    if per_node > 0:
        return [per_node] * n
    if tasks <= n and tasks in (0, n):
        return slots
    counts = [0] * n
    left = tasks
    for i in range(n):  # pass 1: one task each
        if left == 0:
            break
        counts[i], left = 1, left - 1
    for i in range(n):  # pass 2: fill each node's CPUs, in node order
        take = min(slots[i] - counts[i], left)
        if take > 0:
            counts[i], left = counts[i] + take, left - take
    while left > 0:  # pass 3: more tasks than CPUs, round-robin
        for i in range(n):
            if left == 0:
                break
            counts[i], left = counts[i] + 1, left - 1
    return counts
