"""Soak: racing prologs and epilogs while the job owner stops, continues and kills
her own processes at random moments.

Run as root: ``python -m benchmarks.soak_liveness [cycles]`` (default 200). Every
cycle runs the prolog (busybox image, a ``--volume``, the sshd and the user
namespace holder) and the epilog, while ``tests/redteam/racer.c chaos`` sends
SIGSTOP, SIGCONT or SIGKILL to a random choice of the user's processes every 0-2 ms.
Prints the runs, the worst and median prolog and epilog times, hangs (a run past
the sum of its deadlines plus 30 s, killed), drains (a non-zero exit) and what was
left (mounts, state files): all but the runs and times must be 0.
"""

from __future__ import annotations

import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import VENV, images, users

from .common import free_port

CLI = os.path.join(VENV, "bin", "shifter-sshd")
TAG = "soak-liveness"
UDI, LOOP, STATE = f"/var/udiMount-{TAG}", f"/var/udiLoopMount-{TAG}", f"/run/shifter-sshd-{TAG}"
DEADLINE = 2  # volumeTimeout, sshdStartTimeout, usernsTimeout
HANG = 3 * DEADLINE + 30  # past this a run counts as a hang


def _setup(work: Path) -> str:
    config = work / "udiRoot.conf"
    config.write_text(f"imagePath={work}/images\nudiMount={UDI}\nloopMount={LOOP}\n"
                      f"statePath={STATE}\noptUdiImage={work}/udiImage\n"
                      f"sshKeySecret={work}/secret\nsshdPort={free_port()}\nsystem={TAG}\n"
                      f"volumeTimeout={DEADLINE}\nsshdStartTimeout={DEADLINE}\n"
                      f"usernsTimeout={DEADLINE}\n")  # fmt: skip
    tree = images.busybox_tree(work / "busybox")
    for args in (["udiimage", "build"], ["secret", "init"],
                 ["image", "import", str(tree), "docker:busybox:soak"]):  # fmt: skip
        subprocess.run([CLI, "--config", str(config), *args], check=True, capture_output=True)
    return str(config)


def _racer(work: Path) -> str:
    binary = str(work / "racer")
    source = Path(__file__).resolve().parent.parent / "tests" / "redteam" / "racer.c"
    subprocess.run(["gcc", "-O2", "-o", binary, str(source)], check=True)
    os.chmod(binary, 0o755)
    return binary


def _run(argv: list[str], env: dict[str, str]) -> tuple[int | None, float, str]:
    """(exit code, or None for a hang; seconds; last line of stderr)."""
    started = time.monotonic()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=HANG)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - started, "hang"
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return done.returncode, time.monotonic() - started, last


def _outcome(line: str) -> str:
    if "container ready" in line:
        return "container ready"
    return line.split(": ")[1] + ": " + line.split(": ")[2] if line.count(": ") >= 2 else line


def _left() -> dict[str, int]:
    table = Path("/proc/self/mountinfo").read_text().splitlines()
    mounts = sum(1 for line in table if UDI in line or LOOP in line)
    states = (
        [n for n in os.listdir(STATE) if not n.endswith(".error")] if os.path.isdir(STATE) else []
    )
    return {"mounts": mounts, "state files": len(states)}


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    work = Path(tempfile.mkdtemp(prefix="soak-liveness-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    user = users.ensure_users()[0]
    source = work / "src"
    source.mkdir()
    os.chown(source, user.uid, user.gid)
    config = _setup(work)
    as_user = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"]
    racer = subprocess.Popen([*as_user, _racer(work), "chaos", str(os.getpid())],
                             stdout=subprocess.PIPE, start_new_session=True)  # fmt: skip
    prologs: list[float] = []
    epilogs: list[float] = []
    hangs = drains = 0
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        for cycle in range(cycles):
            job = str(20000 + cycle)
            env = {"SLURM_JOB_ID": job, "SLURM_JOB_UID": str(user.uid),
                   "SLURM_JOB_GID": str(user.gid), "SLURM_JOB_USER": user.name,
                   "SLURMD_NODENAME": "localhost", "SLURM_NODELIST": "localhost",
                   "SLURM_JOB_CPUS_PER_NODE": "2", "SPANK_SHIFTER_IMAGE": "docker:busybox:soak",
                   "SPANK_SHIFTER_VOLUME": f"{source}:/data"}  # fmt: skip
            code, seconds, last = _run([CLI, "--config", config, "prolog"], env)
            prologs.append(seconds)
            hangs += code is None
            drains += code not in (0, None)
            outcomes[_outcome(last)] += 1
            code, seconds, _last = _run([CLI, "--config", config, "epilog"], {"SLURM_JOB_ID": job})
            epilogs.append(seconds)
            hangs += code is None
            drains += code not in (0, None)
            if cycle % 50 == 0:
                print(f"cycle {cycle}: worst prolog so far {max(prologs):.2f} s", flush=True)
    finally:
        racer.terminate()
        signals = int(racer.communicate(timeout=30)[0] or b"-1")
    left = _left()
    print(f"\n{cycles} prolog/epilog cycles under the chaos racer ({signals} signals sent)")
    print(f"prolog: worst {max(prologs):.2f} s, median {statistics.median(prologs) * 1000:.0f} ms"
          f" (deadlines {DEADLINE} s each); epilog: worst {max(epilogs):.2f} s, median "
          f"{statistics.median(epilogs) * 1000:.0f} ms")  # fmt: skip
    print(f"hangs {hangs}, drains (non-zero exits) {drains}, left: {left}")
    print("prolog outcomes:")
    for what, count in outcomes.most_common():
        print(f"  {count:5d}  {what}")
    shutil.rmtree(work, ignore_errors=True)
    if hangs or drains or any(left.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
