"""Reading inside an untrusted root, so nothing in it can redirect a lookup outside.

Every lookup goes through openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS): '..' and
absolute symlinks stop at the root, /proc magic links are refused, and a symlink
loop fails with ELOOP. This is for *reading* (the image's passwd, whether a shell
exists) and for finding mount points; everything written or mounted goes through
``privileged``, on the descriptors found here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from . import syscalls as sc

RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
MAX_READ = 16 << 20  # an image's /etc/passwd larger than this is not a passwd file


class Root:
    """A directory treated as ``/`` for every lookup, held by a descriptor."""

    def __init__(self, fd: int, path: str = "") -> None:
        self.fd = os.dup(fd)
        os.set_inheritable(self.fd, False)
        self.path = path  # the host path, for messages only

    @classmethod
    def at(cls, path: str) -> Root:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return cls(fd, path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def open(self, path: str, flags: int = os.O_PATH, mode: int = 0) -> int:
        return sc.openat2(self.fd, path.lstrip("/") or ".", flags, RESOLVE, mode)

    def exists(self, path: str) -> bool:
        try:
            os.close(self.open(path))
            return True
        except OSError:
            return False

    def is_file(self, path: str) -> bool:
        return self._mode(path, stat.S_ISREG)

    def is_dir(self, path: str) -> bool:
        return self._mode(path, stat.S_ISDIR)

    def _mode(self, path: str, test: Callable[[int], bool]) -> bool:
        try:
            fd = self.open(path)
        except OSError:
            return False
        try:
            return test(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def read(self, path: str) -> str | None:
        """A regular file's text, or None if absent; never a device, FIFO or huge file."""
        try:
            fd = self.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_READ:
                return None
            return os.read(fd, MAX_READ).decode("utf-8", errors="replace")
        finally:
            os.close(fd)
