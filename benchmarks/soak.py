"""Soak: many prolog/epilog cycles with ssh sessions and an mpirun in each.

Run as root: ``python -m benchmarks.soak [cycles]`` (default 200). Every cycle
builds the Debian + Open MPI container with its sshd, opens ssh sessions into it,
runs ``mpirun -np 4`` over ssh inside it, and tears it down. Prints what leaked
(mounts, loop devices, processes, open descriptors, state files: all must be 0)
and the prolog's and epilog's peak memory in the first and the last cycles.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import VENV, users

from .common import sshd_node

PROLOG = os.path.join(VENV, "bin", "shifter-sshd-prolog")
EPILOG = os.path.join(VENV, "bin", "shifter-sshd-epilog")
UDI, LOOP, STATE = (
    "/var/udiMount-soak",
    "/var/udiLoopMount-soak",
    "/run/shifter-sshd-soak",
)  # the areas sshd_node(work, "soak", ...) configures


def _rss_of(argv: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Run argv; (its own peak RSS in KiB, seconds, stderr), from wait4's rusage."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {text}")
    return usage.ru_maxrss, time.perf_counter() - started, text


def _leaks(image_path: str) -> dict[str, int]:
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if UDI in line or LOOP in line]  # fmt: skip
    loops = 0
    for name in os.listdir("/sys/block"):
        try:
            loops += image_path in Path(f"/sys/block/{name}/loop/backing_file").read_text()
        except OSError:
            continue
    processes = descriptors = 0
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.readlink(f"/proc/{pid}/root").startswith(UDI):
                processes += 1
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                descriptors += target.startswith((UDI, LOOP, image_path))
        except OSError:
            continue
    states = len(os.listdir(STATE)) if os.path.isdir(STATE) else 0
    return {"mounts": len(mounts), "loop devices": loops, "processes": processes,
            "open descriptors": descriptors, "state files": states}  # fmt: skip


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    work = Path(tempfile.mkdtemp(prefix="soak-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    config, _port = sshd_node(work, "soak", "docker:soak")
    user = users.ensure_users()[0]
    memory: list[tuple[int, int]] = []
    times: list[tuple[float, float]] = []
    try:
        for cycle in range(cycles):
            job = str(10000 + cycle)
            env = {"SLURM_JOB_ID": job, "SLURM_JOB_UID": str(user.uid),
                   "SLURM_JOB_GID": str(user.gid), "SLURM_JOB_USER": user.name,
                   "SLURMD_NODENAME": "localhost", "SLURM_NODELIST": "localhost",
                   "SLURM_JOB_CPUS_PER_NODE": "4",
                   "SPANK_SHIFTER_IMAGE": "docker:soak"}  # fmt: skip
            prolog_rss, prolog_s, _err = _rss_of([PROLOG, "--config", config], env)
            root = f"{UDI}/{job}"
            script = ("export HOME=/tmp PATH=/opt/udiImage/bin:$PATH; "
                      "for i in 1 2 3 4; do ssh localhost true & done; wait; "
                      "ssh localhost mpirun -np 4 /usr/local/bin/mpi_hello >/dev/null")  # fmt: skip
            try:
                subprocess.run(["/usr/sbin/chroot", f"--userspec={user.uid}:{user.gid}", root,
                                "/bin/bash", "-c", script], check=True, timeout=120,
                               stderr=subprocess.DEVNULL)  # fmt: skip
            finally:
                epilog_rss, epilog_s, _err = _rss_of([EPILOG, "--config", config],
                                                     {"SLURM_JOB_ID": job})  # fmt: skip
            memory.append((prolog_rss, epilog_rss))
            times.append((prolog_s, epilog_s))
            if cycle % 20 == 0:
                print(f"cycle {cycle}: leaks {_leaks(str(work))}", flush=True)
        leaks = _leaks(str(work))
        print(f"\n{cycles} cycles (ssh sessions and mpirun -np 4 in each); leaked after all:")
        for what, count in leaks.items():
            print(f"  {what:<18} {count}")
        print(f"prolog peak RSS: first {memory[0][0] / 1024:.1f} MiB, last "
              f"{memory[-1][0] / 1024:.1f} MiB; epilog: first {memory[0][1] / 1024:.1f} MiB, "
              f"last {memory[-1][1] / 1024:.1f} MiB")  # fmt: skip
        print(f"median prolog {statistics.median(t[0] for t in times) * 1000:.0f} ms, "
              f"epilog {statistics.median(t[1] for t in times) * 1000:.0f} ms")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
