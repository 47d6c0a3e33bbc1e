"""udiMount and loopMount: the root-owned areas where each job has its directory.

Shared by the prolog (which makes the job directories) and teardown (which
detaches and removes them), and kept free of config/udiroot.py so the epilog starts fast.
"""

from __future__ import annotations

import os

from ..errors import node_error

TYPE_CHECKING = False  # typing costs the epilog ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from typing import Protocol

    class Areas(Protocol):
        """config.Config, or quickconf.Places in the epilog."""

        @property
        def udi_mount(self) -> str: ...
        @property
        def loop_mount(self) -> str: ...


def job_dirs(areas: Areas, job_id: str) -> tuple[str, str]:
    """(container root, scratch) for a job, as host paths (for the state and logs)."""
    return os.path.join(areas.udi_mount, job_id), os.path.join(areas.loop_mount, job_id)


def open_area(path: str) -> int:
    """udiMount or loopMount: made if missing; must be root's and writable by root only.

    A directory others can write could have its job directory swapped; refuse it.
    """
    from . import syscalls as sc  # ctypes: not for the epilogs of jobs without a container

    os.makedirs(path, mode=0o755, exist_ok=True)
    try:
        fd = sc.openat2(sc.AT_FDCWD, path, os.O_PATH | os.O_DIRECTORY, sc.RESOLVE_NO_SYMLINKS)
    except OSError as err:
        raise node_error("rootfs", f"mount area unusable ({err.strerror})", path) from None
    info = os.fstat(fd)
    if info.st_uid != 0 or info.st_mode & 0o022:
        os.close(fd)
        raise node_error("rootfs", "mount area must be owned by root, not group/other-writable",
                         path)  # fmt: skip
    return fd
