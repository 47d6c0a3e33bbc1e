"""The per-job state file: what the prolog did, so a fresh epilog can undo it.

Written after every mount (atomically, on /run's tmpfs) so that even a prolog
killed between two steps leaves an exact record. The epilog also sweeps
/proc/self/mountinfo under the job's directories for the one mount a crash could
leave unrecorded (made, but killed before the record was written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from .errors import node_error


@dataclass
class Mount:
    target: str  # the real path the kernel knows, never a path through the image
    kind: str  # what it is, for logs: tmpfs, image, bind, proc, devpts, ...


@dataclass
class JobState:
    job_id: str
    root: str  # the container root: udiMount/<job>
    scratch: str  # tmpfs under loopMount/<job>: image mount point and writable layers
    user: str = ""
    uid: int = -1
    image_id: str = ""
    loop_device: str = ""
    mounts: list[Mount] = field(default_factory=list)
    sshd_pid: int = 0
    sshd_start_time: int = 0  # /proc/<pid>/stat starttime, so a recycled pid is not killed
    complete: bool = False
    created: float = field(default_factory=time.time)


class StateStore:
    """``statePath/<job>.json`` files, root-only."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, job_id: str) -> str:
        return os.path.join(self.directory, f"{job_id}.json")

    def error_path(self, job_id: str) -> str:
        """Where the prolog leaves a user's error for the SPANK plugin to print."""
        return os.path.join(self.directory, f"{job_id}.error")

    def container_path(self, job_id: str) -> str:
        """World-readable description of a ready container, for the ``shifter`` command."""
        return os.path.join(self.directory, f"{job_id}.container")

    def publish(self, job_id: str, description: dict[str, object]) -> None:
        path = self.container_path(job_id)
        with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
            json.dump(description, handle)
        os.chmod(f"{path}.tmp", 0o644)
        os.rename(f"{path}.tmp", path)

    def save(self, state: JobState) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        path = self.path(state.job_id)
        tmp = f"{path}.tmp"
        data = json.dumps(dataclasses.asdict(state), separators=(",", ":"))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def load(self, job_id: str) -> JobState | None:
        try:
            with open(self.path(job_id), encoding="utf-8") as handle:
                raw = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise node_error("state", f"unreadable state file ({err})", self.path(job_id)) from None
        raw["mounts"] = [Mount(**m) for m in raw.get("mounts", [])]
        return JobState(**raw)

    def remove(self, job_id: str) -> None:
        paths = (self.path(job_id), f"{self.path(job_id)}.tmp", self.container_path(job_id))
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def job_ids(self) -> list[str]:
        """Jobs with a state file on this node (an earlier job's leftovers, say)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def write_error(self, job_id: str, message: str) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        path = self.error_path(job_id)
        with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
            handle.write(message.replace("\n", " ") + "\n")
        os.chmod(f"{path}.tmp", 0o644)
        os.rename(f"{path}.tmp", path)

    def remove_error(self, job_id: str) -> None:
        try:
            os.unlink(self.error_path(job_id))
        except FileNotFoundError:
            pass
