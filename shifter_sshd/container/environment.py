"""The container's environment: the image's, the site's, and what keeps MPI on ssh.

One function computes it so that ssh sessions (sshd's SetEnv) and ``shifter``
give a process the same environment wherever it enters the container.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..config.udiroot import Config, Module
from ..errors import user_error
from . import hostsfile

UDI_BIN = "/opt/udiImage/bin"
# Inside a Slurm job Open MPI and MPICH's Hydra would pick srun, which the
# container does not have (docs/user-guide.md): keep them on ssh; pdsh too (its default, rsh,
# has no server in the container).
LAUNCHERS = {"OMPI_MCA_plm": "rsh", "HYDRA_LAUNCHER": "ssh", "I_MPI_HYDRA_BOOTSTRAP": "ssh",
             "PDSH_RCMD_TYPE": "ssh"}  # fmt: skip
# What an ssh session gets of the job (the Prolog's environment): job-level variables
# only, never a step's or a task's (SLURM_STEP_ID, SLURM_PROCID...), which would lie.
JOB_VARIABLES = (
    "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_USER", "SLURM_JOB_UID", "SLURM_JOB_GID",
    "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES",
    "SLURM_JOB_CPUS_PER_NODE", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_QOS", "SLURM_JOB_RESERVATION", "SLURM_CLUSTER_NAME", "SLURMD_NODENAME",
    "SLURM_JOB_START_TIME", "SLURM_JOB_END_TIME",
)  # fmt: skip


def _apply(env: dict[str, str], source: Config | Module) -> None:
    for name, value in source.site_env:
        env[name] = value
    for name, value in source.site_env_prepend:
        env[name] = f"{value}:{env[name]}" if env.get(name) else value
    for name, value in source.site_env_append:
        env[name] = f"{env[name]}:{value}" if env.get(name) else value
    for name in source.site_env_unset:
        env.pop(name, None)


def modules(config: Config, requested: Iterable[str]) -> list[Module]:
    """The job's modules: ``defaultModules`` and ``--module``, enabled ones only."""
    found = []
    for name in dict.fromkeys([*config.default_modules, *requested]):
        module = config.module(name)
        if module is None and name == "gpu":
            continue  # built in: gpu/plan.py (a site's module_gpu_* adds to it)
        if module is None:
            raise user_error("--module", "no such module on this system", name)
        if module.enabled:
            found.append(module)
    names = {module.name for module in found}
    for module in found:
        clash = sorted(names & set(module.conflicts))
        if clash:
            raise user_error("--module", f"{module.name} cannot be loaded with {clash[0]}",
                             ",".join(sorted(names)))  # fmt: skip
    return found


def container_env(
    config: Config,
    image_env: Mapping[str, str],
    job_modules: Iterable[Module] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = dict(image_env)
    _apply(env, config)
    for module in job_modules:
        _apply(env, module)
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if p and p != UDI_BIN]
    env["PATH"] = ":".join([UDI_BIN, *path])
    env["SHIFTER_RUNTIME"] = "1"
    env.update(LAUNCHERS)
    env.update(hostsfile.ENVIRONMENT)
    env.update(extra or {})
    return env


def job_variables(job_env: Mapping[str, str], tasks: list[int]) -> dict[str, str]:
    """The job's variables for ssh sessions, from the environment slurmd gave the Prolog.

    Slurm 22.05 gives the Prolog SLURM_NODELIST and SLURM_JOB_NUM_NODES; a batch
    script also has SLURM_JOB_NODELIST and SLURM_NNODES: sessions get both names.
    SLURM_TASKS_PER_NODE is the job's layout, as the batch script sees it: Open MPI,
    seeing a Slurm job, reads the allocation from it and SLURM_NODELIST.
    """
    env = {name: job_env[name] for name in JOB_VARIABLES if job_env.get(name)}
    for one, other in (
        ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
        ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"),
        ("SLURM_JOBID", "SLURM_JOB_ID"),
    ):
        if other in env and one not in env:
            env[one] = env[other]
        if one in env and other not in env:
            env[other] = env[one]
    if tasks:
        env["SLURM_TASKS_PER_NODE"] = compress_counts(tasks)
    return {name: value for name, value in env.items() if "\n" not in value}


def compress_counts(counts: list[int]) -> str:
    """[2, 2, 2, 1] -> ``2(x3),1``, Slurm's way of writing per-node counts."""
    parts: list[str] = []
    run_value, run_length = counts[0], 0
    for count in [*counts, None]:
        if count == run_value:
            run_length += 1
            continue
        parts.append(f"{run_value}(x{run_length})" if run_length > 1 else str(run_value))
        if count is not None:
            run_value, run_length = count, 1
    return ",".join(parts)
