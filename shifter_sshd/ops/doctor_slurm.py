"""``shifter-sshd doctor --slurm-conf``: slurm.conf as the prolog and the plugin need it.

Prolog and Epilog set, existing, root's and executable; PrologFlags with Alloc and
Contain (and DeferBatch, else a batch script's first ssh may race a slow node);
proctrack/cgroup when the sshd is to be the job's; a PrologEpilogTimeout; and a
plugstack.conf line for the SPANK plugin whose ``config=`` and ``state_path=`` agree
with this udiRoot.conf.
"""

from __future__ import annotations

import os

from ..config.udiroot import Config
from ..slurm import conf as slurmconf
from .findings import Finding, Found


def slurm(config: Config, path: str) -> Found:
    found: Found = []
    try:
        values = slurmconf.values(
            path, ("Prolog", "Epilog", "PrologEpilogTimeout", "PlugStackConfig", "ProctrackType")
        )
    except Exception as err:  # any reason the file cannot be read is the finding
        return [Finding("slurm.conf", f"{path}: {err}", True)]
    for key in ("prolog", "epilog"):
        _script(found, key.capitalize(), values.get(key, ""))
    flags = slurmconf.prolog_flags(path)
    if not flags & {"alloc", "contain", "runinjob"}:
        found.append(
            Finding(
                "slurm.conf",
                "PrologFlags needs Alloc (and Contain): without it "
                "node 2..N have no container when the batch script starts",
                True,
            )
        )
    if "defer_batch" not in flags and "deferbatch" not in flags:
        found.append(
            Finding(
                "slurm.conf",
                "PrologFlags without DeferBatch: a batch script's "
                "first ssh may reach a node whose prolog still runs",
                False,
            )
        )
    if config.sshd_job_containment and config.enable_sshd:
        for problem in slurmconf.missing_requirements(path):
            found.append(
                Finding(
                    "slurm.conf",
                    f"{problem} (the sshd is to be the job's: sshdJobContainment=1)",
                    True,
                )
            )
    if not values.get("prologepilogtimeout"):
        found.append(
            Finding(
                "slurm.conf",
                "no PrologEpilogTimeout: a prolog stuck on a broken "
                "node holds its job forever (120 is a fair value)",
                False,
            )
        )
    plugstack = values.get("plugstackconfig") or os.path.join(
        os.path.dirname(path), "plugstack.conf"
    )
    found += _plugstack(config, plugstack)
    return found


def _script(found: Found, key: str, script: str) -> None:
    if not script:
        found.append(Finding("slurm.conf", f"no {key}= (the container is built by it)", True))
        return
    try:
        info = os.stat(script)
    except OSError as err:
        found.append(Finding("slurm.conf", f"{key}={script}: {err.strerror}", True))
        return
    if info.st_uid != 0 or info.st_mode & 0o022 or not info.st_mode & 0o100:
        found.append(
            Finding(
                "slurm.conf",
                f"{key}={script}: must be root's, executable, not writable by others",
                True,
            )
        )


def _plugstack(config: Config, path: str) -> Found:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line.split("#", 1)[0].split() for line in handle]
    except OSError as err:
        return [Finding("plugstack.conf", f"{path}: {err.strerror}", True)]
    ours = [words for words in lines if any("shifter_sshd_spank" in w for w in words)]
    if not ours:
        return [Finding("plugstack.conf", f"{path}: no line loads shifter_sshd_spank.so", True)]
    found: Found = []
    args = dict(w.split("=", 1) for w in ours[0] if "=" in w)
    if os.path.realpath(args.get("config", "")) != os.path.realpath(config.path):
        found.append(
            Finding(
                "plugstack.conf",
                f"config={args.get('config', '(unset)')} is not this udiRoot.conf ({config.path})",
                True,
            )
        )
    if args.get("state_path", "/run/shifter-sshd") != config.state_path:
        found.append(
            Finding(
                "plugstack.conf",
                f"state_path={args.get('state_path')} is not statePath ({config.state_path})",
                True,
            )
        )
    return found
