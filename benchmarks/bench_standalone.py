"""``shifter --image=X true`` without root against two bare starts of the same squashfs
(bubblewrap over a squashfuse mount, and unshare + squashfuse + chroot), and against
the job path (prolog, ``shifter true``, epilog).

Run as root (it prepares the store, then times as an unprivileged test user):
``python -m benchmarks.bench_standalone [rounds]`` (default 20). The four are timed in
turn, round by round, on the busybox image, so the ratios survive a noisy machine.
The bare starts do only what a container start must (a user namespace, the FUSE
mount, a root, exec); ``shifter --image`` also reads udiRoot.conf and the store,
writes /etc, makes a /dev and binds home and siteFs.
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

CLI = os.path.join(VENV, "bin", "shifter-sshd")
SHIFTER = os.path.join(VENV, "bin", "shifter")
IMAGE = "docker:busybox:bench"
TAG = "bench-standalone"
BARE = """mount -t tmpfs bare /tmp && mkdir /tmp/i && { squashfuse -f "$0" /tmp/i & p=$!; }
while [ ! -e /tmp/i/bin ]; do kill -0 $p || exit 1; done
chroot /tmp/i /bin/true; s=$?; kill $p; wait; exit $s"""
# squashfuse mounts through the setuid fusermount3, as a user's own bwrap set-up would.
BWRAP = """d=$(mktemp -d) && squashfuse "$0" "$d" || exit 1
bwrap --ro-bind "$d" / --unshare-user /bin/true; s=$?; fusermount3 -u "$d"; rmdir "$d"; exit $s"""


def _setup(work: Path) -> tuple[str, str]:
    config = work / "udiRoot.conf"
    config.write_text(f"imagePath={work}/images\nudiMount=/var/udiMount-{TAG}\n"
                      f"loopMount=/var/udiLoopMount-{TAG}\nstatePath=/run/shifter-sshd-{TAG}\n"
                      f"system={TAG}\nenableSshd=0\n")  # fmt: skip
    tree = images.busybox_tree(work / "busybox")
    done = subprocess.run([CLI, "--config", str(config), "image", "import", str(tree), IMAGE],
                          check=True, capture_output=True, text=True)  # fmt: skip
    subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
    return str(config), f"{work}/images/data/{done.stdout.strip()}.sqsh"


def _time(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, cwd="/")
    return time.perf_counter() - started


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    work = Path(tempfile.mkdtemp(prefix="bench-standalone-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    user = users.ensure_users()[1]
    as_user = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"]
    try:
        config, squashfs = _setup(work)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.home,
               "SHIFTER_SSHD_CONFIG": config}  # fmt: skip
        job = {**env, "SLURM_JOB_ID": "39001", "SLURM_JOB_UID": str(user.uid),
               "SLURM_JOB_GID": str(user.gid), "SLURM_JOB_USER": user.name,
               "SLURMD_NODENAME": "localhost", "SLURM_NODELIST": "localhost",
               "SLURM_JOB_CPUS_PER_NODE": "1", "SPANK_SHIFTER_IMAGE": IMAGE}  # fmt: skip
        runs: dict[str, list[float]] = {
            "shifter --image": [], "bwrap": [], "bare unshare": [], "job path": []
        }  # fmt: skip
        for _round in range(rounds):
            runs["shifter --image"].append(
                _time([*as_user, SHIFTER, f"--image={IMAGE}", "true"], env)
            )
            runs["bwrap"].append(_time([*as_user, "sh", "-c", BWRAP, squashfs], env))
            runs["bare unshare"].append(
                _time([*as_user, "unshare", "-Ur", "-m", "sh", "-c", BARE, squashfs], env)
            )
            started = time.perf_counter()
            subprocess.run([CLI, "--config", config, "prolog"], env=job, check=True,
                           capture_output=True)  # fmt: skip
            subprocess.run([*as_user, SHIFTER, "true"], env=job, check=True, cwd="/")
            subprocess.run([CLI, "--config", config, "epilog"], env=job, check=True,
                           capture_output=True)  # fmt: skip
            runs["job path"].append(time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(times) for name, times in runs.items()}
    ours = medians["shifter --image"]
    print(f"{rounds} rounds, busybox image, as {user.name}")
    for name, median in medians.items():
        print(f"  {name:16} median {median * 1000:7.1f} ms   "
              f"shifter --image / this = {ours / median:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
