"""The descriptor-based prolog and epilog against an earlier version, side by side.

Run as root from the checkout: ``python -m benchmarks.bench_hardening [REF] [rounds]``.
REF (default ``cf9838f``, the last version that mounted by path) is checked out
into a temporary git worktree; both versions run from source with the same
interpreter, in turn, round by round, on the same images, so the ratios survive a
noisy machine. Prints medians of:

- prolog until the sshd answers (the prolog returns once it has seen the banner)
  and epilog, on the busybox and the Debian + Open MPI image;
- prolog and epilog with 10, 100 and 1,000 ``--volume`` binds (sshd off).
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

from lab import VENV, images, users

from .common import CLI, free_port

PYTHON = os.path.join(VENV, "bin", "python")
CHECKOUT = Path(__file__).resolve().parent.parent
ENTRY = "import sys; from shifter_sshd.commands.entry import {0}; sys.exit({0}())"
BEFORE = "cf9838f"


def _run(source: Path, context: str, config: Path, env: dict[str, str]) -> float:
    argv = [PYTHON, "-c", ENTRY.format(context), "--config", str(config)]
    started = time.perf_counter()
    done = subprocess.run(argv, env={**env, "PYTHONPATH": str(source)}, capture_output=True,
                          text=True, check=False, cwd="/")  # fmt: skip
    elapsed = time.perf_counter() - started
    ready = context == "epilog" or "container ready" in done.stderr
    if done.returncode != 0 or not ready:
        raise SystemExit(f"{source} {context} failed: {done.stderr}")
    return elapsed


def _config(work: Path, tag: str, extra: str) -> Path:
    config = work / f"{tag}.conf"
    config.write_text(f"imagePath={work}/images\nudiMount=/var/udiMount-{tag}\n"
                      f"loopMount=/var/udiLoopMount-{tag}\nstatePath=/run/shifter-sshd-{tag}\n"
                      f"optUdiImage={work}/udiImage\nsshKeySecret={work}/secret\n"
                      f"system=bench\n{extra}")  # fmt: skip
    return config


def _compare(label: str, versions: dict[str, Path], configs: dict[str, Path],
             env: dict[str, str], rounds: int) -> None:  # fmt: skip
    times: dict[str, list[float]] = {}
    for round_number in range(rounds + 1):  # round 0 warms up
        for name, source in versions.items():
            prolog = _run(source, "prolog", configs[name], env)
            epilog = _run(source, "epilog", configs[name], {"SLURM_JOB_ID": env["SLURM_JOB_ID"]})
            if round_number:
                times.setdefault(f"{name} prolog", []).append(prolog)
                times.setdefault(f"{name} epilog", []).append(epilog)
    medians = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n{label}, {rounds} rounds, medians:")
    for key, value in medians.items():
        print(f"  {key:<16} {value * 1000:8.1f} ms")
    for step in ("prolog", "epilog"):
        ratio = medians[f"after {step}"] / medians[f"before {step}"]
        print(f"  ratio after/before {step}: {ratio:.2f}x")


def main() -> None:
    ref = sys.argv[1] if len(sys.argv) > 1 else BEFORE
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    work = Path(tempfile.mkdtemp(prefix="bench-hardening-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    worktree = work / "before"
    subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "add", "--detach", str(worktree),
                    ref], check=True, capture_output=True)  # fmt: skip
    try:
        _bench(work, {"before": worktree, "after": CHECKOUT}, rounds)
    finally:
        subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "remove", "--force",
                        str(worktree)], check=False)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


def _bench(work: Path, versions: dict[str, Path], rounds: int) -> None:
    user = users.ensure_users()[0]
    store = _config(work, "store", "")
    for args in (["udiimage", "build"], ["secret", "init"]):
        subprocess.run([CLI, "--config", str(store), *args], check=True, capture_output=True)
    tree = images.busybox_tree(work / "busybox")
    sources = {"busybox": str(tree), "debian": str(images.debian_squashfs("openmpi"))}
    for name, source in sources.items():
        subprocess.run([CLI, "--config", str(store), "image", "import", source,
                        f"docker:{name}:bench"], check=True, capture_output=True)  # fmt: skip
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_UID": str(user.uid), "SLURM_JOB_GID": str(user.gid),
           "SLURM_JOB_USER": user.name, "SLURMD_NODENAME": "localhost",
           "SLURM_NODELIST": "localhost", "SLURM_JOB_CPUS_PER_NODE": "2"}  # fmt: skip
    port = free_port()
    for name in sources:
        configs = {v: _config(work, f"bench-{v}", f"sshdPort={port}\n") for v in versions}
        _compare(f"{name}: prolog to sshd banner, epilog", versions, configs,
                 {**env, "SPANK_SHIFTER_IMAGE": f"docker:{name}:bench"}, rounds)  # fmt: skip
    for count in (10, 100, 1000):
        volumes = []
        for index in range(count):
            path = work / "volumes" / f"v{index}"
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, user.uid, user.gid)
            volumes.append(f"{path}:/v{index}")  # on the root tmpfs: both versions make it
        limit = {"after": f"maxVolumes={count}\n"}  # the key the earlier version lacks
        configs = {v: _config(work, f"bench-{v}", "enableSshd=0\n" + limit.get(v, ""))
                   for v in versions}  # fmt: skip
        job = {**env, "SPANK_SHIFTER_IMAGE": "docker:busybox:bench",
               "SPANK_SHIFTER_VOLUME": ";".join(volumes)}  # fmt: skip
        _compare(f"{count} volumes (busybox, no sshd)", versions, configs, job,
                 max(1, rounds // (3 if count >= 1000 else 1)))  # fmt: skip


if __name__ == "__main__":
    main()
