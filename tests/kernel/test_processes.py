"""Reading /proc/<pid>/stat (one parser) and stopping a job's processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from shifter_sshd.kernel import processes


def test_stat_of_a_process_whose_name_has_spaces_and_parentheses(tmp_path: Path) -> None:
    script = "open('/proc/self/comm', 'w').write('a) b (c'); print(flush=True); input()"
    child = subprocess.Popen(["python3", "-c", script], start_new_session=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        stat = processes.read_stat(child.pid)
        assert stat is not None
        assert (stat.name, stat.parent, stat.session) == ("a) b (c", os.getpid(), child.pid)
        assert stat.state in ("S", "R") and stat.start == processes.start_time(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while processes.state(child.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes.state(child.pid) == "T"
    finally:
        child.kill()
        child.wait()
    assert processes.read_stat(child.pid) is None and processes.state(child.pid) == ""


def test_stop_ends_the_users_processes_in_the_area_and_spares_others(tmp_path: Path) -> None:
    """A process of the user with its working directory in the job's area goes, even
    stopped (SIGKILL needs no cooperation); one outside the area, same user, stays."""
    area = tmp_path / "area"
    area.mkdir()
    os.chmod(tmp_path, 0o755)

    def as_user(cwd: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["setpriv", "--reuid=2901", "--regid=2901", "--clear-groups",
                                 "sleep", "60"], cwd=cwd)  # fmt: skip
        deadline = time.monotonic() + 10
        while (stat := processes.read_stat(proc.pid)) is None or stat.name != "sleep":
            assert time.monotonic() < deadline, "setpriv did not exec sleep"
            time.sleep(0.005)
        return proc

    inside, outside = as_user(area), as_user(tmp_path)
    try:
        os.kill(inside.pid, signal.SIGSTOP)
        found = {p.pid for p in processes.find("/nonexistent-root", (str(area),), 2901, "0")}
        assert found == {inside.pid}
        stopped = processes.stop("/nonexistent-root", (str(area),), 2901, "0", grace=0.5)
        assert [p.pid for p in stopped] == [inside.pid]
        assert inside.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert outside.poll() is None
    finally:
        for proc in (inside, outside):
            proc.kill()
            proc.wait()


def test_a_recycled_pid_is_not_signalled() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = processes.start_time(child.pid)
        assert started is not None
        assert not processes.signal_if_same(child.pid, started + 1, signal.SIGKILL)
        assert child.poll() is None
        assert processes.signal_if_same(child.pid, started, signal.SIGKILL)
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
