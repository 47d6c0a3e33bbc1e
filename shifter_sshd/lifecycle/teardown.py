"""Taking a job's container apart: processes, mounts, directories, loop device, state.

Order matters: processes first (a process inside keeps mounts busy), then the two
mount trees (root and scratch), each detached as a whole by a descriptor opened in
its root-owned area (``privileged.detach``): no path inside the container, which
the user can rename and symlink at will, is ever looked up. Then only empty
directories go (rmdir, never a recursive delete: data behind a mount stays where
it was). The mount table is read before and after, by mount id, to check that
everything of the job went and to log anything outside it that went too.
"""

from __future__ import annotations

import os
import time

from .. import faults, log
from ..errors import node_error
from ..kernel import mounts, processes
from ..kernel import privileged as priv
from ..kernel.areas import job_dirs, open_area
from .state import JobState, StateStore, new_state

TYPE_CHECKING = False  # typing costs the epilog ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from typing import Protocol

    from ..kernel.areas import Areas

    class Settings(Areas, Protocol):
        """config.Config, or quickconf.Places in the epilog."""

        @property
        def kill_grace(self) -> float: ...


def teardown(config: Settings, store: StateStore, job_id: str) -> bool:
    """Undo everything for ``job_id``; True when nothing is left behind.

    Each step is safe to repeat, so an epilog killed anywhere is finished by the
    next epilog or prolog. The epilog imports this module: it imports nothing
    heavy (tests/config/test_quickconf.py keeps count).
    """
    root, scratch = job_dirs(config, job_id)
    state = store.load(job_id) or new_state(job_id, root, scratch)
    faults.inject("stop sshd")
    # SIGTERM for sshd, which then ends its sessions; the user namespace holder
    # (container/userns.py) has nothing to save. Waiting and SIGKILL follow, for all alike.
    processes.signal_if_same(state.sshd_pid, state.sshd_start_time, processes.SIGTERM)
    processes.signal_if_same(state.userns_pid, state.userns_start_time, processes.SIGKILL)
    faults.inject("stop processes")
    areas = (root, scratch)
    killed = processes.stop(root, areas, state.uid, job_id, config.kill_grace)
    if killed:
        log.info(f"teardown: job {job_id}: stopped {len(killed)} process(es): "
                 + ", ".join(f"{p.pid} ({p.name})" for p in killed))  # fmt: skip
    faults.inject("unmount")
    before = mounts.mountinfo()
    ours = mounts.tree({e.mount_id for e in before if e.target in _raw(areas)}, before)
    detached = sum(_detach(area, job_id) for area in (config.udi_mount, config.loop_mount))
    faults.inject("foreign mounts")
    if _loop_attached(state):
        _free_foreign_copies(job_id, list(areas), config.kill_grace)
    after = mounts.mountinfo()
    clean = not any(mounts.under(area, after) for area in areas)
    _report(job_id, before, after, ours, detached)
    faults.inject("directories")
    for area in (config.udi_mount, config.loop_mount):
        _rmdir(area, job_id)
    _check_loop(state)
    faults.inject("state")
    if clean:
        store.remove(job_id)
        store.remove_error(job_id)
    return clean


def _raw(paths: tuple[str, ...]) -> set[bytes]:
    return {os.fsencode(path) for path in paths}


def _detach(area: str, job_id: str) -> int:
    """Detach what is mounted on area/job_id; 0 when the area or the directory is absent."""
    if not os.path.isdir(area):
        return 0
    area_fd = open_area(area)
    try:
        return priv.detach(area_fd, job_id)
    except OSError as err:
        raise node_error("teardown", f"cannot detach ({err.strerror})",
                         os.path.join(area, job_id)) from None  # fmt: skip
    finally:
        os.close(area_fd)


def _report(job_id: str, before: list[mounts.MountInfo], after: list[mounts.MountInfo],
            ours: set[int], detached: int) -> None:  # fmt: skip
    """Log what went: the job's trees, and anything else (another process's doing)."""
    still = {e.mount_id for e in after}
    left = ours & still
    if left:
        log.warning(f"teardown: job {job_id}: {len(left)} of its mounts are still attached")
    outside = [e for e in before if e.mount_id not in ours and e.mount_id not in still]
    if outside:
        names = ", ".join(os.fsdecode(e.target) for e in outside[:5])
        log.info(f"teardown: job {job_id}: meanwhile {len(outside)} other mount(s) went "
                 f"(not ours): {names}")  # fmt: skip
    log.debug(f"teardown: job {job_id}: detached {detached} tree(s), {len(ours)} mount(s)")


def _rmdir(area: str, job_id: str) -> None:
    if not os.path.isdir(area):
        return
    area_fd = open_area(area)
    try:
        priv.remove_dir(area_fd, job_id)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning(f"teardown: left in place ({err.strerror}): {os.path.join(area, job_id)}")
    finally:
        os.close(area_fd)


def _free_foreign_copies(job_id: str, job_dirs: list[str], timeout: float) -> None:
    """Copies of our mounts in other mount namespaces keep the loop device busy."""
    for pid, targets in mounts.foreign_copies(job_dirs).items():
        log.info(f"teardown: job {job_id}: detaching {len(targets)} copied mount(s) in the "
                 f"mount namespace of pid {pid}")  # fmt: skip
        if not mounts.unmount_in(pid, targets, timeout):
            log.warning(f"teardown: job {job_id}: could not detach the copies in the mount "
                        f"namespace of pid {pid} within {timeout:g} s")  # fmt: skip


def _loop_attached(state: JobState) -> bool:
    if not state.loop_device:
        return False
    backing = f"/sys/block/{os.path.basename(state.loop_device)}/loop/backing_file"
    try:
        with open(backing, encoding="utf-8", errors="replace") as handle:
            return bool(state.image_id) and state.image_id in handle.read()
    except FileNotFoundError:
        return False


def _check_loop(state: JobState) -> None:
    """The loop device frees itself with its last mount (autoclear); say if it has not."""
    for _attempt in range(200):  # the kernel clears an autoclear device from a work queue
        if not _loop_attached(state):
            return
        time.sleep(0.01)
    log.warning(
        f"teardown: job {state.job_id}: {state.loop_device} still attached: something outside the "
        "container still holds the image; it detaches itself when released"
    )
