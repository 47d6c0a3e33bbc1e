"""The per-job files under ``statePath``: what the prolog did, and what ``shifter`` reads.

``<job>.json`` (root, 0600) records what teardown needs: the ids of the job's two
top mounts (root and scratch), the loop device, the sshd's pid and start time. It
is rewritten atomically at the few steps that change it (on /run's tmpfs), never
once per mount: teardown detaches whole trees, so it needs no list of mounts.

``<job>.container`` (the description ``shifter`` reads) and ``<job>.error`` (the
user's mistake, for the SPANK plugin to print) belong to the job user, mode 0400:
they name volumes and environment, which are nobody else's business.

State files carry a schema version. A file written by another version is read
for the fields both know; unknown fields are ignored, missing ones take their
defaults, so an upgrade in the middle of a job never strands its teardown.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields

from .errors import node_error

SCHEMA = 2


@dataclass
class JobState:
    job_id: str
    root: str  # the container root: udiMount/<job>
    scratch: str  # tmpfs under loopMount/<job>: image mount point and writable layers
    user: str = ""
    uid: int = -1
    image_id: str = ""
    loop_device: str = ""
    bundle: str = ""  # the udiImage version the container has bound (udiimage.py)
    root_mount_id: int = 0  # mount ids, as /proc/self/mountinfo numbers them
    scratch_mount_id: int = 0
    sshd_pid: int = 0
    sshd_start_time: int = 0  # /proc/<pid>/stat starttime, so a recycled pid is not killed
    userns_pid: int = 0  # the job's user namespace holder (userns.py), and its start time
    userns_start_time: int = 0
    complete: bool = False
    created: float = 0.0
    version: int = SCHEMA


def from_dict(raw: dict[str, object], path: str) -> JobState:
    """A state of any schema version: the fields this version knows, defaults for others."""
    values = {}
    for field in fields(JobState):
        if field.name in raw and _fits(raw[field.name], field.default):
            values[field.name] = raw[field.name]
    for required in ("job_id", "root", "scratch"):
        if required not in values:
            raise node_error("state", f"state file without a valid {required}", path)
    return JobState(**values)  # type: ignore[arg-type]


def _fits(value: object, default: object) -> bool:
    """Whether ``value`` has the type of the field whose default is ``default``."""
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    return isinstance(value, str)  # the required fields, and the text ones


class StateStore:
    """``statePath/<job>.*`` files."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, job_id: str) -> str:
        return os.path.join(self.directory, f"{job_id}.json")

    def error_path(self, job_id: str) -> str:
        return os.path.join(self.directory, f"{job_id}.error")

    def container_path(self, job_id: str) -> str:
        return os.path.join(self.directory, f"{job_id}.container")

    def _write(self, name: str, data: bytes, owner: int, mode: int) -> None:
        """Atomically: a new file under a temporary name, owner and mode set, renamed."""
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        tmp = f".{name}.{os.getpid()}.tmp"
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                os.unlink(tmp, dir_fd=directory)
            except FileNotFoundError:
                pass
            fd = os.open(tmp, flags, 0o600, dir_fd=directory)
            try:
                os.write(fd, data)
                os.fchown(fd, owner, -1)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
        finally:
            os.close(directory)

    def save(self, state: JobState) -> None:
        data = json.dumps(asdict(state), separators=(",", ":")).encode()
        self._write(f"{state.job_id}.json", data, 0, 0o600)

    def publish(self, job_id: str, description: dict[str, object], uid: int) -> None:
        """The description ``shifter`` reads: the job user's alone."""
        self._write(f"{job_id}.container", json.dumps(description).encode(), uid, 0o400)

    def write_error(self, job_id: str, message: str, uid: int = 0) -> None:
        """The user's error, for the SPANK plugin (running as the user) to print."""
        text = message.replace("\n", " ") + "\n"
        self._write(f"{job_id}.error", text.encode(errors="surrogateescape"), uid, 0o400)

    def load(self, job_id: str) -> JobState | None:
        path = self.path(job_id)
        try:
            with open(path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise node_error("state", f"unreadable state file ({err})", path) from None
        if not isinstance(raw, dict):
            raise node_error("state", "state file is not a JSON object", path)
        return from_dict(raw, path)

    def remove(self, job_id: str) -> None:
        for path in (self.path(job_id), self.container_path(job_id)):
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

    def remove_error(self, job_id: str) -> None:
        try:
            os.unlink(self.error_path(job_id))
        except FileNotFoundError:
            pass


def new_state(job_id: str, root: str, scratch: str) -> JobState:
    return JobState(job_id=job_id, root=root, scratch=scratch, created=time.time())
