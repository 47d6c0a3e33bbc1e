"""What the single-node benchmarks share: a node with the Debian image and its sshd."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from lab import VENV, images

CLI = os.path.join(VENV, "bin", "shifter-sshd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sshd_node(work: Path, tag: str, image: str) -> tuple[str, int]:
    """udiRoot.conf with areas named after ``tag``, a bundle, a secret and the Debian +
    Open MPI image as ``image``; returns (config path, sshd port)."""
    port = free_port()
    config = work / "udiRoot.conf"
    config.write_text(f"imagePath={work}/images\nudiMount=/var/udiMount-{tag}\n"
                      f"loopMount=/var/udiLoopMount-{tag}\nstatePath=/run/shifter-sshd-{tag}\n"
                      f"optUdiImage={work}/udiImage\nsshKeySecret={work}/secret\n"
                      f"sshdPort={port}\nsystem={tag}\n")  # fmt: skip
    for args in (
        ["udiimage", "build"],
        ["secret", "init"],
        ["image", "import", str(images.debian_squashfs("openmpi")), image],
    ):
        subprocess.run([CLI, "--config", str(config), *args], check=True, capture_output=True)
    return str(config), port
