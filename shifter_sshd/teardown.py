"""Taking a job's container apart: processes, mounts, directories, loop device, state.

Order matters: processes first (a process inside keeps mounts busy), then the
mounts in reverse, then only empty directories (rmdir, never a recursive delete:
a bind mount that failed to come off must not turn into deleted user data).
"""

from __future__ import annotations

import os
import signal
import time

from . import log, mounts
from .config import Config
from .rootfs import job_dirs
from .state import JobState, StateStore


def teardown(config: Config, store: StateStore, job_id: str) -> bool:
    """Undo everything for ``job_id``; True when nothing is left behind."""
    root, scratch = job_dirs(config, job_id)
    state = store.load(job_id) or JobState(job_id=job_id, root=root, scratch=scratch)
    if state.sshd_pid:
        from . import sshd

        sshd.stop(state.sshd_pid, state.sshd_start_time)
    killed = kill_processes(root, config.kill_grace)
    if killed:
        log.info(f"teardown: job {job_id}: killed {len(killed)} container process(es): "
                 + ", ".join(f"{pid} ({name})" for pid, name in killed))  # fmt: skip
    lazy = mounts.unmount_all(state, [root, scratch])
    clean = not any(mounts.under(area) for area in (root, scratch))
    for path in (root, scratch):
        _rmdir(path)
    _check_loop(state)
    if clean:
        store.remove(job_id)
        store.remove_error(job_id)
    if lazy:
        log.warning(f"teardown: job {job_id}: detached busy mounts lazily: {', '.join(lazy)}")
    return clean


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning(f"teardown: left in place ({err.strerror}): {path}")


def container_pids(root: str) -> list[tuple[int, str]]:
    """Processes whose root directory is the container (or inside it)."""
    found = []
    me = os.getpid()
    prefix = root.rstrip("/") + "/"
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            proc_root = os.readlink(f"/proc/{name}/root")
            if proc_root == root or proc_root.startswith(prefix):
                with open(f"/proc/{name}/comm", encoding="utf-8") as handle:
                    found.append((int(name), handle.read().strip()))
        except OSError:
            continue  # gone, or a kernel thread
    return found


def kill_processes(root: str, grace: float) -> list[tuple[int, str]]:
    """SIGTERM everything inside, SIGKILL what is left after ``grace``; wait until gone."""
    victims = container_pids(root)
    if not victims:
        return []
    _signal_all(victims, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while container_pids(root) and time.monotonic() < deadline:
        time.sleep(0.02)
    for _round in range(50):
        left = container_pids(root)
        if not left:
            break
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.02)
    return victims


def _signal_all(victims: list[tuple[int, str]], sig: int) -> None:
    for pid, _name in victims:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _check_loop(state: JobState) -> None:
    """The loop device frees itself with its last mount (autoclear); say if it has not."""
    if not state.loop_device:
        return
    backing = f"/sys/block/{os.path.basename(state.loop_device)}/loop/backing_file"
    for _attempt in range(200):  # the kernel clears an autoclear device from a work queue
        try:
            with open(backing, encoding="utf-8") as handle:
                if state.image_id not in handle.read():
                    return  # already reused by another job's image
        except FileNotFoundError:
            return
        time.sleep(0.01)
    log.warning(
        f"teardown: job {state.job_id}: {state.loop_device} still attached: another mount "
        "namespace still holds the image; it detaches itself when that namespace ends"
    )
