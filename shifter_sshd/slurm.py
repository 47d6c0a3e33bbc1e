"""What the prolog needs from slurmctld beyond the environment slurmd gives it.

slurmd hands a Prolog no time limit, no task count and no sharing mode (FINDINGS), yet
the prolog needs all three: the tasks per node for /var/hostsfile, the job's end for the
certificates' validity, and whether the job has its nodes to itself (Shifter gives jobs
that share their nodes no container sshd: two jobs' sshds would fight over one port).

Source: ``/usr/bin/squeue --json`` (absolute: the prolog has no PATH; SLURM_CONF comes
from the environment). Slurm 22.05 ignores ``-j`` with ``--json``, so the whole queue
comes back and the job is picked out here; on a busy cluster that is tens of MB, so the
job's own record is cut out of the text and only that is parsed (a full parse is the
fallback). Every failure (slurmctld silent, squeue missing, job not listed, output not
understood) gives ``None`` from :func:`job_details` with one logged warning; the
prolog then falls back to what the environment says.

What squeue --json (openapi v0.0.38) reports, verified on the virtual cluster:

- ``shared``: ``"none"`` for ``--exclusive`` and for a partition with
  ``OverSubscribe=EXCLUSIVE``; ``null`` for the default (partition ``OverSubscribe=NO``
  or ``YES``: the job gets cores, other jobs may get the node's other cores);
  ``"shared"`` for ``--oversubscribe`` or ``OverSubscribe=FORCE``; ``"user"`` and
  ``"mcs"`` for ``--exclusive=user|mcs``. It is the same packed field ``scontrol show
  job`` prints as ``OverSubscribe=NO|OK|YES|USER|MCS``. Only ``"none"`` means the
  nodes are the job's alone, the test Shifter applies (``shared != 0``).
- ``tasks``: ``-n``, or the node count when no ``-n`` was given (indistinguishable);
  ``tasks_per_node``: ``--ntasks-per-node`` or 0; ``cpus_per_task``: null even with
  ``-c`` in 22.05, so it is used only when it is a number.
- ``end_time``: start plus the time limit (plus one year when the limit is infinite).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import log
from .errors import ShifterError, node_error
from .hostsfile import expand_nodelist
from .job import expand_cpus_per_node, job_id_from_env

SQUEUE = "/usr/bin/squeue"
WHERE = "slurm"
# What a prolog may inherit besides SLURM_*: enough for squeue, nothing of the job's.
_PASS_ENV = ("SLURM_CONF", "TZ", "LANG", "LC_ALL")


@dataclass(frozen=True)
class JobDetails:
    """The job as slurmctld sees it; a field is None when it cannot be told."""

    tasks_per_node: list[int] | None  # in SLURM_NODELIST order, one count per node
    end_time: int | None  # seconds since the epoch
    exclusive: bool | None  # True only when no other job can share the nodes
    source: str  # "squeue" or "pyslurm", for the log


def job_details(env: Mapping[str, str], timeout: float = 5.0) -> JobDetails | None:
    """The job's details, or None (with a warning logged) when Slurm cannot say.

    Never raises a ShifterError: a silent slurmctld must not drain a node.
    """
    try:
        return query(env, timeout)
    except ShifterError as err:
        log.warning(f"{err} (using the job environment only)")
        return None


def query(env: Mapping[str, str], timeout: float = 5.0) -> JobDetails:
    """Like :func:`job_details`, but raises ShifterError saying what went wrong."""
    job_id = int(job_id_from_env(env))
    backend = _pyslurm_record if _pyslurm_available() else _squeue_record
    record, source = backend(job_id, env, timeout)
    return details_from_record(record, env, source)


# --- squeue ---------------------------------------------------------------------------


def _squeue_record(
    job_id: int, env: Mapping[str, str], timeout: float
) -> tuple[dict[str, Any], str]:
    child_env = {k: env[k] for k in _PASS_ENV if k in env}
    child_env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    try:
        done = subprocess.run(
            [SQUEUE, "--json"],
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
    return find_job(done.stdout, job_id), "squeue"


def find_job(output: bytes | str, job_id: int) -> dict[str, Any]:
    """The record of ``job_id`` in ``squeue --json`` output.

    A busy cluster's output is tens of MB (about 4.4 kB a job) and a full ``json.loads``
    takes some 200 ms for 5,000 jobs. JSON strings cannot hold a raw newline, so in
    Slurm's indented output the line ``      "job_id": N,`` is the job's key and the
    lines ``    {`` and ``    }`` around it bound its record: only that is parsed
    (about 10 ms). Output laid out otherwise is parsed whole.
    """
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    record = _cut_record(text, job_id)
    if record is not None:
        return record
    try:
        data = json.loads(text)
    except ValueError as err:
        raise node_error(WHERE, "squeue --json output is not JSON", err) from None
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list):
        raise node_error(WHERE, "squeue --json output has no job list", text[:80])
    for job in jobs:
        if isinstance(job, dict) and job.get("job_id") == job_id:
            return job
    raise node_error(WHERE, "job not in squeue's list", job_id)


def _cut_record(text: str, job_id: int) -> dict[str, Any] | None:
    key = f'\n      "job_id": {job_id}'
    at = text.find(key)
    while at >= 0 and text[at + len(key)] not in ",\n":
        at = text.find(key, at + 1)  # job 12 while looking for job 1
    if at < 0:
        return None
    start = text.rfind("\n    {\n", 0, at + 1)  # the key may be the first
    end = text.find("\n    }", at)
    if start < 0 or end < 0:
        return None
    try:
        record = json.loads(text[start : end + 6])
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("job_id") != job_id:
        return None
    return record


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
    """One job through libslurm (a single-job RPC, no queue dump). UNTESTED HERE.

    pyslurm builds only against Slurm 25.11 (FINDINGS), so this path never runs on
    the 22.05 lab. It maps pyslurm >= 23's ``Job`` attributes onto squeue's field
    names and leaves to :func:`details_from_record` what it cannot find. ``timeout``
    is libslurm's own (MessageTimeout): pyslurm offers no per-call limit.
    """
    import pyslurm

    try:
        job = pyslurm.Job.load(job_id)
    except Exception as err:  # pyslurm raises its own RPCError and friends
        raise node_error(WHERE, "pyslurm cannot load the job", f"{job_id}: {err}") from None
    sharing = getattr(job, "resource_sharing", getattr(job, "shared", None))
    record: dict[str, Any] = {
        "job_id": job_id,
        "nodes": getattr(job, "nodes", None),
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
    if record.get("nodes") not in (None, node_list):
        log.warning(
            f"shifter-sshd: {WHERE}: squeue's node list is not SLURM_NODELIST: "
            f"{record.get('nodes')} != {node_list}"
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
