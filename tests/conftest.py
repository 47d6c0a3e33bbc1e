"""Shared fixtures. The tests use real mounts, loop devices and OpenSSH: they need root.

A missing prerequisite fails the run loudly; nothing is skipped silently.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED_TOOLS = ("mksquashfs", "tar2sqfs", "unsquashfs", "debootstrap", "busybox")


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        pytest.exit("shifter-sshd tests need root (real mounts, loop devices)", returncode=3)
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.exit(f"missing prerequisites: {', '.join(missing)} (run make test)", returncode=3)
