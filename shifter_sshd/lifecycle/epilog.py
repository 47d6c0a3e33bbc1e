"""``shifter-sshd epilog``: take this node's container for the job apart.

Succeeds when there is nothing to do (no prolog ran, or the epilog runs twice).
Exits 1, which drains the node, only when mounts could not be removed: the node
then really needs an admin.

Every job end runs it, so it starts lean: the four keys it needs are read by
quickconf (config/udiroot.py only for an unusual file), and the modules it imports avoid
dataclasses, re, json, signal and typing (tests/config/test_quickconf.py checks).
Teardown does not depend on the rest of udiRoot.conf: a key an upgrade made
unknown, or a typo added after the job started, cannot strand a job's mounts.
"""

from __future__ import annotations

import os

from .. import log
from ..config import quick as quickconf
from ..errors import EXIT_NODE, EXIT_OK, ShifterError
from ..slurm.jobid import job_id_from_env


def main(config_path: str | None = None, env: dict[str, str] | None = None) -> int:
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")  # slurmd gives none
    environ = dict(os.environ) if env is None else env
    container_job = any(environ.get(f"SPANK_SHIFTER_{n}") for n in ("IMAGE", "IMAGE_ID"))
    config: quickconf.Places | None = None
    job_id = environ.get("SLURM_JOB_ID", "?")
    try:
        config = _settings(config_path)
        job_id = job_id_from_env(environ)
        if not _anything_of(config, job_id):
            return EXIT_OK  # most jobs: no container was ever made for them here
        from . import teardown
        from .state import StateStore

        clean = teardown.teardown(config, StateStore(config.state_path), job_id)
    except ShifterError as err:
        log.error(str(err))
        # slurmd gives the Epilog the job's SPANK_* variables too: a job that asked for
        # no container cannot have left one, so a broken config is no reason to drain.
        return EXIT_NODE if container_job else EXIT_OK
    except Exception as err:  # a bug: logged with its traceback; drain only if mounts remain
        log.internal_error(f"shifter-sshd: epilog: job {job_id}: internal error: {err!r}")
        return EXIT_NODE if _mounts_left(config, job_id) else EXIT_OK
    if not clean:
        log.error(f"shifter-sshd: epilog: job {job_id}: mounts left behind under "
                  f"{config.udi_mount} or {config.loop_mount}")  # fmt: skip
        return EXIT_NODE
    return EXIT_OK


def _anything_of(config: quickconf.Places, job_id: str) -> bool:
    """Whether the job has a state or error file, or a directory in an area, on this node:
    without any, no prolog made anything for it (a job without --image), and the epilog
    is done without loading teardown's modules (ctypes among them)."""
    names = [os.path.join(config.state_path, f"{job_id}.{kind}") for kind in ("json", "error")]
    names += [os.path.join(area, job_id) for area in (config.udi_mount, config.loop_mount)]
    return any(os.path.lexists(path) for path in names)


def _settings(config_path: str | None) -> quickconf.Places:
    """teardown's four keys, from quickconf or (for an unusual file) config/udiroot.py."""
    path = quickconf.resolve_path(config_path)
    text = quickconf.read_text(path)
    found = None if text is None else quickconf.places(text)
    if found is None:
        from ..config import udiroot as config_mod

        full = config_mod.load(path)
        found = quickconf.Places(full.udi_mount, full.loop_mount, full.state_path,
                                 full.kill_grace)  # fmt: skip
    return found


def _mounts_left(config: quickconf.Places | None, job_id: str) -> bool:
    """After a bug: whether anything of the job is still mounted (unknown counts as yes)."""
    from ..kernel import mounts

    if config is None:
        return True
    try:
        table = mounts.mountinfo()
    except OSError:
        return True
    areas = [os.path.join(area, job_id) for area in (config.udi_mount, config.loop_mount)]
    return any(mounts.under(area, table) for area in areas)
