"""The job's sshd: prolog start to sshd answering, and ``ssh node true`` latency.

Run as root: ``python -m benchmarks.bench_sshd [rounds]``. Prints, from one run:
the prolog's total time with its ssh steps (keys, files, sshd start to banner), and
``ssh node true`` into the container sshd against a host sshd (the same OpenSSH
binary, the same config, keys and algorithms, but no chroot), taken in turn, with
the ratio. The key-set cost itself is in ``benchmarks.bench_keys``.
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


def _timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]}: {done.stderr}")
    return time.perf_counter() - started, done.stderr


def _host_sshd(root: str, port: int, uid: int, gid: int, work: Path) -> subprocess.Popen[bytes]:
    """The same sshd binary and config, started on the host (no chroot) as the user."""
    etc = work / "host-etc"
    shutil.copytree(f"{root}/opt/udiImage/etc", etc)
    for path in [etc, *etc.iterdir()]:
        os.chown(path, uid, gid)
    config = (etc / "sshd_config").read_text().replace("/opt/udiImage/etc", str(etc))
    config = config.replace(f"Port {port}", f"Port {port + 1}")
    config = config.replace("/opt/udiImage", f"{root}/opt/udiImage")
    (etc / "sshd_config").write_text(config)
    bundle = f"{root}/opt/udiImage"
    argv = [f"{bundle}/lib/ld-linux-x86-64.so.2", "--library-path", f"{bundle}/lib",
            f"{bundle}/libexec/sshd", "-D", "-f", str(etc / "sshd_config"), "-E",
            str(etc / "host-sshd.log")]  # fmt: skip
    return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                             *argv])  # fmt: skip


def _ssh(root: str, uid: int, port: int, known: str) -> list[str]:
    key = f"{root}/var/shifter/ssh/id_ed25519"
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/ssh",
            "-F", "/dev/null", "-i", key, "-o", f"CertificateFile={key}-cert.pub",
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-p", str(port), "localhost", "true"]  # fmt: skip


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    work = Path(tempfile.mkdtemp(prefix="bench-sshd-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    user = users.ensure_users()[0]
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_UID": str(user.uid), "SLURM_JOB_GID": str(user.gid),
           "SLURM_JOB_USER": user.name, "SLURMD_NODENAME": "localhost",
           "SLURM_NODELIST": "localhost", "SLURM_JOB_CPUS_PER_NODE": "2",
           "SPANK_SHIFTER_IMAGE": "docker:bench", "SHIFTER_SSHD_TIMING": "1"}  # fmt: skip
    host: subprocess.Popen[bytes] | None = None
    config = ""
    try:
        config, port = sshd_node(work, "bench", "docker:bench")
        prolog: list[float] = []
        steps: dict[str, list[float]] = {}
        for _round in range(6):
            seconds, err = _timed([PROLOG, "--config", config], env)
            prolog.append(seconds)
            for line in err.splitlines():
                if line.startswith("timing "):
                    name, value = line[len("timing ") :].rsplit(" ", 1)
                    steps.setdefault(name, []).append(float(value) / 1000)
            _timed([EPILOG, "--config", config], {"SLURM_JOB_ID": "77"})
        print(f"prolog with sshd (Debian image), median of {len(prolog)}: "
              f"{statistics.median(prolog) * 1000:.1f} ms")  # fmt: skip
        for name in ("ssh keys", "ssh files", "sshd"):
            print(f"  {name:<10} {statistics.median(steps[name]) * 1000:.1f} ms")
        _timed([PROLOG, "--config", config], env)
        root = "/var/udiMount-bench/77"
        host = _host_sshd(root, port, user.uid, user.gid, work)
        time.sleep(0.5)
        known = f"{root}/opt/udiImage/etc/ssh_known_hosts"
        host_known = work / "known_host"
        host_known.write_text(Path(known).read_text().replace(f":{port} ", f":{port + 1} "))
        os.chmod(host_known, 0o644)
        container_ssh = _ssh(root, user.uid, port, known)
        host_ssh = _ssh(root, user.uid, port + 1, str(host_known))
        pairs = []
        for _round in range(rounds + 1):
            inside, _ = _timed(container_ssh)
            outside, _ = _timed(host_ssh)
            pairs.append((inside, outside))
        pairs = pairs[1:]
        inside_median = statistics.median(p[0] for p in pairs)
        outside_median = statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[0] / p[1] for p in pairs)
        print(f"ssh localhost true, {rounds} pairs: container sshd {inside_median * 1000:.1f} ms,"
              f" host sshd {outside_median * 1000:.1f} ms, ratio {ratio:.2f}")  # fmt: skip
    finally:
        if host is not None:
            host.kill()
            host.wait()
        if config:
            subprocess.run([EPILOG, "--config", config], env={"SLURM_JOB_ID": "77"}, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
