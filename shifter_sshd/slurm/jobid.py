"""SLURM_JOB_ID, checked: it names the job's directories and files, so digits only.

Its own module because the epilog needs nothing else of the job and must start fast.
"""

from __future__ import annotations

from ..errors import node_error

TYPE_CHECKING = False  # typing costs the epilog ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Mapping


def job_id_from_env(env: Mapping[str, str]) -> str:
    """SLURM_JOB_ID, which names the job's directories: digits only."""
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id:
        raise node_error("job environment", "missing variable (is this run by slurmd?)",
                         "SLURM_JOB_ID")  # fmt: skip
    if not (job_id.isascii() and job_id.isdigit() and len(job_id) <= 12):
        raise node_error("job environment", "malformed SLURM_JOB_ID", job_id)
    return job_id
