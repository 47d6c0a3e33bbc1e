"""``shifter-sshd spank build``: compile the SPANK plugin against the installed Slurm.

The plugin is the one part that must be C (slurmd, sbatch, salloc and srun dlopen
it), and it must match the Slurm it runs under, so it ships as source and is built
on the site's machine rather than as a prebuilt binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from ..errors import node_error

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shifter_sshd_spank.c")
DEFAULT_OUTPUT = "/usr/local/lib/shifter-sshd/shifter_sshd_spank.so"
INCLUDE = "/usr/include"  # where slurm/spank.h is: the Slurm the plugin will run under
CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-std=gnu11")


def build(output: str | None = None, include: str = INCLUDE) -> str:
    """Compile the plugin to ``output`` (default DEFAULT_OUTPUT) against the Slurm headers
    under ``include`` (another Slurm version's, say); return its path.

    The new file replaces the old one by rename: a daemon that has the old plugin
    loaded keeps its mapping instead of crashing on a file rewritten under it.
    """
    target = os.path.abspath(output or DEFAULT_OUTPUT)
    header = os.path.join(include, "slurm", "spank.h")
    if not os.path.exists(header):
        raise node_error("spank build", "Slurm's headers are missing (libslurm-dev)", header)
    if not os.path.exists(SOURCE):
        raise node_error("spank build", "plugin source not installed with the package", SOURCE)
    gcc = shutil.which("gcc")
    if gcc is None:
        raise node_error("spank build", "no C compiler on PATH", "gcc")
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as err:
        raise node_error(
            "spank build", f"cannot create the directory ({err.strerror})", directory
        ) from None
    partial = f"{target}.tmp{os.getpid()}"
    argv = [gcc, *CFLAGS, f"-I{include}", "-o", partial, SOURCE]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _remove(partial)
        message = done.stderr.strip() or done.stdout.strip() or "no output"
        raise node_error("spank build", f"gcc failed (exit {done.returncode})", message)
    os.chmod(partial, 0o755)  # noqa: S103 - every user's sbatch and srun load it
    os.replace(partial, target)
    return target


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
