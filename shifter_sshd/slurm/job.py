"""The job, read from the environment slurmd gives a Prolog and Epilog.

Nothing else is needed, so an admin can run the prolog by hand with the same
variables. slurmd provides neither PATH nor HOME (docs/integration.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import node_error
from .jobid import job_id_from_env


@dataclass(frozen=True)
class Job:
    job_id: str
    uid: int
    gid: int
    user: str
    node_name: str
    node_list: str
    cpus_per_node: str
    cluster: str
    restart_count: int
    image: str | None  # the user's name for it, e.g. docker:ubuntu:22.04
    image_id: str | None  # pinned at submission by the SPANK plugin
    volumes: str  # raw --volume value
    modules: tuple[str, ...]


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise node_error("job environment", "missing variable (is this run by slurmd?)", name)
    return value


def _integer(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default) if default is not None else _required(env, name)
    if value is None or not value.isdigit():
        raise node_error("job environment", f"{name} is not a number", value)
    return int(value)


def from_env(env: Mapping[str, str]) -> Job:
    modules = env.get("SPANK_SHIFTER_MODULE", "")
    return Job(
        job_id=job_id_from_env(env),
        uid=_integer(env, "SLURM_JOB_UID"),
        gid=_integer(env, "SLURM_JOB_GID"),
        user=_required(env, "SLURM_JOB_USER"),
        node_name=_required(env, "SLURMD_NODENAME"),
        node_list=env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or "",
        cpus_per_node=env.get("SLURM_JOB_CPUS_PER_NODE", ""),
        cluster=env.get("SLURM_CLUSTER_NAME", ""),
        restart_count=_integer(env, "SLURM_JOB_RESTART_COUNT", "0"),
        image=env.get("SPANK_SHIFTER_IMAGE") or None,
        image_id=env.get("SPANK_SHIFTER_IMAGE_ID") or None,
        volumes=env.get("SPANK_SHIFTER_VOLUME", ""),
        modules=tuple(m for m in re.split(r"[,\s]+", modules) if m),
    )
