"""The per-job files under ``statePath``: what the prolog did, and what ``shifter`` reads.

``<job>.json`` (root, 0600) records what teardown needs: the ids of the job's two
top mounts (root and scratch), the loop device, the sshd's pid and start time. It
is rewritten atomically at the few steps that change it (on /run's tmpfs), never
once per mount: teardown detaches whole trees, so it needs no list of mounts.

``<job>.container`` (the description ``shifter`` reads) and ``<job>.error`` (the
user's mistake, for the SPANK plugin to print) belong to the job user, mode 0400:
they name volumes and environment, which are nobody else's business.

``<job>.json`` is JSON with one field per line, which the epilog reads without the
json module (about 4 ms of its start, with re): see ``_read_flat``. A file in any
other JSON layout (older versions wrote one line) goes to json.

State files carry a schema version. A file written by another version is read
for the fields both know; unknown fields are ignored, missing ones take their
defaults, so an upgrade in the middle of a job never strands its teardown.
"""

from __future__ import annotations

import os
import time

from ..errors import node_error

SCHEMA = 2


class JobState:
    """A plain class, not a dataclass: dataclasses costs the epilog 8 ms of imports.

    Class attributes are the defaults; FIELDS lists every field in order.
    """

    job_id: str
    root: str  # the container root: udiMount/<job>
    scratch: str  # tmpfs under loopMount/<job>: image mount point and writable layers
    user: str = ""
    uid: int = -1
    image_id: str = ""
    loop_device: str = ""
    bundle: str = ""  # the udiImage version the container has bound (ssh/bundle.py)
    root_mount_id: int = 0  # mount ids, as /proc/self/mountinfo numbers them
    scratch_mount_id: int = 0
    sshd_pid: int = 0
    sshd_start_time: int = 0  # /proc/<pid>/stat starttime, so a recycled pid is not killed
    userns_pid: int = 0  # the job's user namespace holder (container/userns.py), and its start time
    userns_start_time: int = 0
    complete: bool = False
    created: float = 0.0
    version: int = SCHEMA

    def __init__(self, job_id: str, root: str, scratch: str) -> None:
        self.job_id = job_id
        self.root = root
        self.scratch = scratch

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in FIELDS}


FIELDS = tuple(JobState.__annotations__)
REQUIRED = ("job_id", "root", "scratch")


def from_dict(raw: dict[str, object], path: str) -> JobState:
    """A state of any schema version: the fields this version knows, defaults for others."""
    for required in REQUIRED:
        if not isinstance(raw.get(required), str):
            raise node_error("state", f"state file without a valid {required}", path)
    state = JobState(str(raw["job_id"]), str(raw["root"]), str(raw["scratch"]))
    for name in FIELDS:
        if name not in REQUIRED and name in raw and _fits(raw[name], getattr(JobState, name)):
            setattr(state, name, raw[name])
    return state


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
        from .record import error_file

        return os.path.join(self.directory, error_file(job_id))

    def container_path(self, job_id: str) -> str:
        from .record import container_file

        return os.path.join(self.directory, container_file(job_id))

    def _write(self, name: str, data: bytes, owner: int, mode: int) -> None:
        """Atomically: a new file under a temporary name, owner and mode set, renamed."""
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        from ..kernel import privileged

        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            privileged.replace_file(directory, name, data, owner, mode)
        finally:
            os.close(directory)

    def save(self, state: JobState) -> None:
        import json

        data = json.dumps(state.as_dict(), indent=0, separators=(",", ":")).encode()
        self._write(f"{state.job_id}.json", data, 0, 0o600)

    def publish(self, job_id: str, fields: dict[str, object], uid: int) -> None:
        """The record ``shifter`` reads (record.py): the job user's alone."""
        from . import record

        self._write(record.container_file(job_id), record.encode(fields), uid, 0o400)

    def write_error(self, job_id: str, message: str, uid: int = 0) -> None:
        """The user's error, for the SPANK plugin (running as the user) to print."""
        text = message.replace("\n", " ") + "\n"
        from .record import error_file

        self._write(error_file(job_id), text.encode(errors="surrogateescape"), uid, 0o400)

    def load(self, job_id: str) -> JobState | None:
        path = self.path(job_id)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            raw = _read_flat(text)
            if raw is None:
                import json

                raw = json.loads(text)
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
    state = JobState(job_id, root, scratch)
    state.created = time.time()
    return state


def _read_flat(text: str) -> dict[str, object] | None:
    """What ``save`` writes: ``{``, one ``"name":value`` per line, ``}``.

    Strings without escapes, integers, plain decimals and booleans: the values this
    file holds. Anything else (an escape, an exponent, a nested value, another
    layout) answers None, and json reads the file instead.
    """
    lines = text.split("\n")
    if len(lines) < 2 or lines[0] != "{" or lines[-1] != "}":
        return None
    raw: dict[str, object] = {}
    for line in lines[1:-1]:
        name, sep, value = line.removesuffix(",").partition('":')
        if not sep or not name.startswith('"') or '"' in name[1:] or "\\" in name:
            return None
        parsed = _flat_value(value)
        if parsed is None:
            return None
        raw[name[1:]] = parsed
    return raw


def _flat_value(value: str) -> object:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        return None if '"' in inner or "\\" in inner else inner
    if value in ("true", "false"):
        return value == "true"
    digits = value.removeprefix("-")
    if digits.isdigit() and digits.isascii():
        return int(value)
    whole, dot, fraction = digits.partition(".")
    if dot and whole.isdigit() and fraction.isdigit() and digits.isascii():
        return float(value)
    return None
