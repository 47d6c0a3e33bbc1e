"""The container's environment: the image's, the site's, and what keeps MPI on ssh.

One function computes it so that ssh sessions (sshd's SetEnv) and ``shifter``
give a process the same environment wherever it enters the container.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from . import hostsfile
from .config import Config, Module
from .errors import user_error

UDI_BIN = "/opt/udiImage/bin"
# Inside a Slurm job Open MPI and MPICH's Hydra would pick srun, which the
# container does not have (FINDINGS): keep them on ssh.
LAUNCHERS = {"OMPI_MCA_plm": "rsh", "HYDRA_LAUNCHER": "ssh", "I_MPI_HYDRA_BOOTSTRAP": "ssh"}


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
        if module is None:
            raise user_error("--module", "no such module on this system", name)
        if module.enabled:
            found.append(module)
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
