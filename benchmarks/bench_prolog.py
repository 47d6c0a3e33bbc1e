"""Prolog and epilog time against a plain shell script doing the same mounts.

Run as root: ``python -m benchmarks.bench_prolog [rounds]``. The two are timed in
turn, round by round, on the same images, so the ratio survives a noisy machine.
Prints, for the busybox and the Debian image: medians of prolog and epilog, the
prolog's breakdown (interpreter start and imports, image mount, /etc, binds,
/dev and devpts, hostsfile) and the script's setup and teardown (kill by pid
file, lazy unmount, as Shifter's unsetupRoot), with the ratios.
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

PROLOG = os.path.join(VENV, "bin", "shifter-sshd-prolog")
EPILOG = os.path.join(VENV, "bin", "shifter-sshd-epilog")
PYTHON = os.path.join(VENV, "bin", "python")
GROUPS = {
    "image mount": ("image mount",),
    "/etc": ("etc",),
    "binds": ("image tree", "overlays", "udiImage", "siteFs", "user volumes"),
    "ssh keys, files, sshd": ("ssh keys", "ssh files", "sshd"),
    "/dev, devpts, proc, sys": ("system",),
    "hostsfile": ("hostsfile",),
    "state, dirs, checks": ("image", "user", "request", "leftovers", "mount points", "scratch",
                            "root", "finish"),
}  # fmt: skip

SCRIPT_SETUP = """#!/bin/sh
set -e
R=$1 S=$2 IMG=$3 UDI=$4
mkdir -p "$R" "$S"
mount -t tmpfs -o nosuid,nodev,mode=0700 scratch "$S"
mkdir "$S/image" "$S/etc.upper" "$S/etc.work" "$S/var.upper" "$S/var.work"
mount -t tmpfs -o nosuid,nodev,mode=0755 root "$R"
mount -t squashfs -o loop,ro,nosuid,nodev "$IMG" "$S/image"
for d in {dirs}; do mkdir "$R/$d"; mount --bind -o ro,nosuid,nodev "$S/image/$d" "$R/$d"; done
{links}
for d in etc var; do mkdir "$R/$d"
  mount -t overlay -o lowerdir=$S/image/$d,upperdir=$S/$d.upper,workdir=$S/$d.work ov "$R/$d"
done
echo 'sstest1:x:2901:2901::/home/sstest1:/bin/sh' >> "$R/etc/passwd"
echo 'tty:x:5:' >> "$R/etc/group"
printf 'passwd: files\\ngroup: files\\n' > "$R/etc/nsswitch.conf"
cp /etc/hosts /etc/resolv.conf "$R/etc/"
mkdir "$R/proc" "$R/sys" "$R/dev" "$R/tmp"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --make-rslave "$R/sys"
mount --bind /dev "$R/dev"
mount -t devpts -o newinstance,gid=5,mode=620,ptmxmode=0666 devpts "$R/dev/pts"
mount --bind "$R/dev/pts/ptmx" "$R/dev/ptmx"
mount -t tmpfs -o nosuid,nodev,mode=1777 shm "$R/dev/shm"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmp "$R/tmp"
mkdir -p "$R/opt/udiImage"
mount --bind -o ro "$UDI" "$R/opt/udiImage"
printf 'node1\\nnode1\\n' > "$R/var/hostsfile"
"""
# Shifter's unsetupRoot in miniature: kill the sshd by its pid file, lazy unmounts.
SCRIPT_TEARDOWN = """#!/bin/sh
pids=$(cat "$2/sshd.pid" 2>/dev/null) && kill $pids
umount -l "$1"
umount -l "$2"
rmdir "$1" "$2"
"""


def _top_level(squashfs: str) -> tuple[list[str], list[tuple[str, str]]]:
    with tempfile.TemporaryDirectory() as mnt:
        subprocess.run(["mount", "-o", "loop,ro", squashfs, mnt], check=True)
        try:
            dirs, links = [], []
            for entry in os.scandir(mnt):
                if entry.name in ("etc", "var", "tmp", "proc", "sys", "dev", "opt"):
                    continue
                if entry.is_symlink():
                    links.append((entry.name, os.readlink(entry.path)))
                elif entry.is_dir():
                    dirs.append(entry.name)
        finally:
            subprocess.run(["umount", mnt], check=True)
    return dirs, links


def _timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    # cwd=/: from the checkout, python -c would import the package from the source tree
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, cwd="/")
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {done.stderr}")
    return elapsed, done.stderr


def bench_image(work: Path, name: str, squashfs: str, rounds: int) -> None:
    config = work / "udiRoot.conf"
    udi = work / "udiImage"
    udi.mkdir(exist_ok=True)
    config.write_text(f"imagePath={work}/images\nudiMount=/var/udiMount-bench\n"
                      f"loopMount=/var/udiLoopMount-bench\nstatePath=/run/shifter-sshd-bench\n"
                      f"optUdiImage={udi}\nenableSshd=0\n")  # fmt: skip
    cli = os.path.join(VENV, "bin", "shifter-sshd")
    subprocess.run([cli, "--config", str(config), "image", "import", squashfs, name], check=True,
                   capture_output=True)  # fmt: skip
    user = users.ensure_users()[0]
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_UID": str(user.uid), "SLURM_JOB_GID": str(user.gid),
           "SLURM_JOB_USER": user.name, "SLURMD_NODENAME": "node1", "SLURM_NODELIST": "node1",
           "SLURM_JOB_CPUS_PER_NODE": "2", "SPANK_SHIFTER_IMAGE": name,
           "SHIFTER_SSHD_TIMING": "1"}  # fmt: skip
    dirs, links = _top_level(squashfs)
    setup = work / "setup.sh"
    setup.write_text(SCRIPT_SETUP.replace("{dirs}", " ".join(dirs)).replace(
        "{links}", "\n".join(f'ln -s {target} "$R/{link}"' for link, target in links)))  # fmt: skip
    teardown = work / "teardown.sh"
    teardown.write_text(SCRIPT_TEARDOWN)
    script_args = ["/var/udiMount-script/9", "/var/udiLoopMount-script/9", squashfs, str(udi)]
    rows: dict[str, list[float]] = {}
    for round_number in range(rounds + 1):  # round 0 warms up
        prolog, err = _timed([PROLOG, "--config", str(config)], env)
        epilog, _ = _timed([EPILOG, "--config", str(config)], {"SLURM_JOB_ID": "9"})
        start_up, _ = _timed([PYTHON, "-c", "import shifter_sshd.lifecycle.prolog"])
        script_up, _ = _timed(["sh", str(setup), *script_args])
        script_down, _ = _timed(["sh", str(teardown), *script_args[:2]])
        if round_number == 0:
            continue
        steps = _step_names(err)
        sample = {"prolog": prolog, "epilog": epilog, "interpreter + imports": start_up,
                  "script setup": script_up, "script teardown": script_down}  # fmt: skip
        for group, names in GROUPS.items():
            sample[f"  {group}"] = sum(steps.get(n, 0.0) for n in names)
        sample["ratio prolog / script setup"] = prolog / script_up
        sample["ratio epilog / script teardown"] = epilog / script_down
        for key, value in sample.items():
            rows.setdefault(key, []).append(value)
    print(f"\n{name} ({os.path.getsize(squashfs) >> 20} MiB squashfs), {rounds} rounds, medians:")
    for key, values in rows.items():
        median = statistics.median(values)
        shown = f"{median:.2f}x" if key.startswith("ratio") else f"{median * 1000:.1f} ms"
        print(f"  {key:<34} {shown}")


def _step_names(stderr: str) -> dict[str, float]:
    steps = {}
    for line in stderr.splitlines():
        if line.startswith("timing "):
            name, value = line[len("timing ") :].rsplit(" ", 1)
            steps[name] = float(value) / 1000
    return steps


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    work = Path(tempfile.mkdtemp(prefix="bench-prolog-", dir="/var/tmp"))
    try:
        tree = images.busybox_tree(work / "busybox")
        busybox = work / "busybox.sqsh"
        subprocess.run(["mksquashfs", str(tree), str(busybox), "-quiet", "-no-progress"],
                       check=True)  # fmt: skip
        bench_image(work, "docker:busybox:bench", str(busybox), rounds)
        bench_image(work, "docker:debian:bench", str(images.debian_squashfs("openmpi")), rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
