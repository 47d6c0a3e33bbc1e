"""One owner per file descriptor: closed exactly once, or handed on explicitly.

Code that closes a descriptor it was handed, and then raises, leaves its caller's
``finally`` to close it again: EBADF then replaces the error that mattered (a
user's mistake became ``OSError``, which the prolog counts as the node's), and in
a process that opened something since, the second close shuts a stranger's
descriptor. With ``Fd`` whoever holds it closes it; ``take()`` passes it on.
"""

from __future__ import annotations

import os


class Fd:
    """A descriptor and the duty to close it (``with Fd(os.open(...)) as fd:``)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("descriptor used after it was closed or handed on")
        return self._fd

    def take(self) -> int:
        """The descriptor, now the caller's to close."""
        fd = self.fd
        self._fd = -1
        return fd

    def replace(self, fd: int) -> None:
        """Own ``fd`` instead, closing the one held (walking down a tree)."""
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
