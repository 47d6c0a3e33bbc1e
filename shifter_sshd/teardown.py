"""Taking a job's container apart: processes, mounts, directories, loop device, state.

Order matters: processes first (a process inside keeps mounts busy), then the
mounts in reverse, then only empty directories (rmdir, never a recursive delete:
a bind mount that failed to come off must not turn into deleted user data).
"""

from __future__ import annotations

import os
import time

from . import faults, log, mounts, processes
from .config import Config
from .rootfs import job_dirs
from .state import JobState, StateStore


def teardown(config: Config, store: StateStore, job_id: str) -> bool:
    """Undo everything for ``job_id``; True when nothing is left behind.

    Each step is safe to repeat, so an epilog killed anywhere is finished by the
    next epilog or prolog.
    """
    root, scratch = job_dirs(config, job_id)
    state = store.load(job_id) or JobState(job_id=job_id, root=root, scratch=scratch)
    areas = (root, scratch)
    faults.inject("stop sshd")
    if state.sshd_pid:
        from . import sshd

        sshd.stop(state.sshd_pid, state.sshd_start_time)
    faults.inject("stop processes")
    killed = processes.stop(root, areas, state.uid, job_id, config.kill_grace)
    if killed:
        log.info(f"teardown: job {job_id}: stopped {len(killed)} process(es): "
                 + ", ".join(f"{p.pid} ({p.name})" for p in killed))  # fmt: skip
    faults.inject("unmount")
    lazy = mounts.unmount_all(state, list(areas))
    faults.inject("foreign mounts")
    if _loop_attached(state):
        _free_foreign_copies(job_id, list(areas))
    clean = not any(mounts.under(area) for area in areas)
    faults.inject("directories")
    for path in areas:
        _rmdir(path)
    _check_loop(state)
    faults.inject("state")
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


def _free_foreign_copies(job_id: str, areas: list[str]) -> None:
    """Copies of our mounts in other mount namespaces keep the loop device busy."""
    for pid, targets in mounts.foreign_copies(areas).items():
        log.info(f"teardown: job {job_id}: detaching {len(targets)} copied mount(s) in the "
                 f"mount namespace of pid {pid}")  # fmt: skip
        mounts.unmount_in(pid, targets)


def _loop_attached(state: JobState) -> bool:
    if not state.loop_device:
        return False
    backing = f"/sys/block/{os.path.basename(state.loop_device)}/loop/backing_file"
    try:
        with open(backing, encoding="utf-8") as handle:
            return state.image_id in handle.read()
    except FileNotFoundError:
        return False


def _check_loop(state: JobState) -> None:
    """The loop device frees itself with its last mount (autoclear); say if it has not."""
    for _attempt in range(200):  # the kernel clears an autoclear device from a work queue
        if not _loop_attached(state):
            return
        time.sleep(0.01)
    log.warning(
        f"teardown: job {state.job_id}: {state.loop_device} still attached: something "
        "outside the container still holds the image; it detaches itself when released"
    )
