"""Paths inside an untrusted root, resolved so nothing from the image can redirect them.

Every lookup goes through openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS): '..' and
absolute symlinks stop at the root, /proc magic links are refused, and a symlink
loop fails with ELOOP. Files are written by unlinking whatever the image put there
and creating a new file with O_EXCL | O_NOFOLLOW, so a planted symlink is replaced,
never followed. Mounts are made on ``/proc/self/fd/N`` of the resolved directory.
"""

from __future__ import annotations

import os
import stat

from . import syscalls as sc
from .errors import ShifterError, user_error

RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
MAX_READ = 16 << 20  # an image's /etc/passwd larger than this is not a passwd file


class Root:
    """A directory treated as ``/`` for every path operation."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        return sc.openat2(self.fd, path.lstrip("/") or ".", flags, RESOLVE, mode)

    def open_dir(self, path: str) -> int:
        return self.open(path, os.O_PATH | os.O_DIRECTORY)

    def real(self, path: str) -> str:
        """The host path ``path`` resolves to, checked to lie inside this root."""
        fd = self.open(path, os.O_PATH)
        try:
            return self._inside(os.readlink(sc.fd_path(fd)), path)
        finally:
            os.close(fd)

    def _inside(self, real: str, path: str) -> str:
        if real != self.path and not real.startswith(self.path.rstrip("/") + "/"):
            raise user_error("container root", "path resolves outside the root", path)
        return real

    def exists(self, path: str) -> bool:
        try:
            os.close(self.open(path, os.O_PATH))
            return True
        except OSError:
            return False

    def is_file(self, path: str) -> bool:
        try:
            fd = self.open(path, os.O_PATH)
        except OSError:
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
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

    def makedirs(self, path: str, mode: int = 0o755) -> str:
        """Create the missing directories of ``path`` inside the root; returns its real path.

        Each level is resolved from the root again, so a symlink met on the way is
        followed the way the container will see it, and never out of the root.
        """
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if self.exists(sub):
                continue
            parent = self.open("/".join(parts[: depth - 1]), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.mkdir(parts[depth - 1], mode, dir_fd=parent)
            except FileExistsError:
                pass
            finally:
                os.close(parent)
        return self.real(path)

    def write(
        self, path: str, data: bytes | str, mode: int = 0o644, owner: tuple[int, int] = (0, 0)
    ) -> None:
        """Replace ``path`` with a new regular file, whatever the image had there."""
        parent, name = os.path.split("/" + path.lstrip("/"))
        if not name:
            raise ShifterError("container root", "cannot write a directory", path)
        directory = self.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                os.unlink(name, dir_fd=directory)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                raise user_error(
                    "container root", "a directory stands where a file goes", path
                ) from None
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, mode, dir_fd=directory)
            try:
                os.write(fd, data.encode() if isinstance(data, str) else data)
                os.fchown(fd, *owner)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        finally:
            os.close(directory)
