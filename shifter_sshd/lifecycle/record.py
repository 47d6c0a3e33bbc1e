"""The record the prolog publishes for ``shifter``: ``<statePath>/<job>.container``.

One module for both sides: the prolog's ``publish`` step writes it (through
``state.StateStore.publish``, the job user's alone, 0400) and ``shifter`` reads it
as that user, so its fields and file names are defined once, here. Its error
twin, ``<job>.error``, tells ``shifter`` and the SPANK plugin why there is none.

``shifter`` imports this at every start: plain classes, no dataclasses or typing.
"""

from __future__ import annotations

import os

from ..errors import ShifterError


class NoContainer(ShifterError):
    """The job has no container on this node and no error says why: it did not ask
    for one (``shifter --image`` then builds one of the caller's own)."""


def container_file(job_id: str) -> str:
    return f"{job_id}.container"


def error_file(job_id: str) -> str:
    return f"{job_id}.error"


def fields(*, job_id: str, root: str, uid: int, image: str, image_id: str, volumes: str,
           modules: list[str], env: dict[str, str], workdir: str | None,
           entrypoint: str | None, command: list[str], sshd_port: int,
           userns: tuple[int, int]) -> dict[str, object]:  # fmt: skip
    """The record as the prolog knows it; ``Container`` reads each field back."""
    return {"job_id": job_id, "root": root, "uid": uid, "image": image, "image_id": image_id,
            "volumes": volumes, "modules": modules, "env": env, "workdir": workdir,
            "entrypoint": entrypoint, "command": command, "sshd_port": sshd_port,
            "userns": list(userns)}  # fmt: skip


def encode(record: dict[str, object]) -> bytes:
    """What ``StateStore.publish`` writes."""
    import json

    return json.dumps(record).encode()


class Container:
    """The prolog's published description of this job's container (step_publish)."""

    def __init__(self, job_id: str, raw: dict[str, object]) -> None:
        self.job_id = job_id
        self.root = _text(raw, "root")
        self.uid = _number(raw, "uid")
        self.image = _text(raw, "image")
        self.image_id = _text(raw, "image_id")
        self.volumes = _text(raw, "volumes")
        modules = raw.get("modules") or []  # --module as the job gave it
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise _malformed("modules")
        self.modules: list[str] = modules
        self.workdir = str(raw.get("workdir") or "")
        # The image's ENTRYPOINT + CMD (a pulled image), or import's --entrypoint (a shell
        # command): what ``shifter`` runs when given no command. Absent before 0.4.
        command = raw.get("command") or []
        entrypoint = raw.get("entrypoint")
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise _malformed("command")
        if not command and isinstance(entrypoint, str) and entrypoint:
            command = ["/bin/sh", "-c", entrypoint]
        self.command: list[str] = command
        self.sshd_port = _number(raw, "sshd_port")
        holder = raw.get("userns") or [0, 0]  # absent in descriptions of earlier versions
        if not (isinstance(holder, list) and len(holder) == 2
                and all(isinstance(n, int) for n in holder)):  # fmt: skip
            raise _malformed("userns")
        self.userns: tuple[int, int] = (holder[0], holder[1])
        env = raw.get("env")
        if not isinstance(env, dict):
            raise _malformed("env")
        self.env = {str(k): str(v) for k, v in env.items()}

    @property
    def label(self) -> str:
        """The image as the user knows it, for messages."""
        return self.image or self.image_id[:12]


def _text(raw: dict[str, object], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str):
        raise _malformed(name)
    return value


def _number(raw: dict[str, object], name: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(name)
    return value


def _malformed(name: str) -> ShifterError:
    """A description this shifter cannot read: a prolog of another version, say."""
    return ShifterError("container description", "missing or malformed field", name)


def load(directory: str, job_id: str) -> Container:
    """The job's published container in ``directory`` (statePath), or the reason there
    is none (the prolog's error, another user's job, no ``--image``)."""
    try:
        with open(os.path.join(directory, container_file(job_id)), encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise _no_container(directory, job_id) from None
    except PermissionError:  # the prolog gives the description to the job's owner alone
        raise ShifterError(f"job {job_id}", "the container belongs to another user, not to "
                           "you", os.getuid()) from None  # fmt: skip
    except OSError as err:
        what = f"cannot read the container description ({err.strerror})"
        raise ShifterError("job", what, job_id) from None
    return Container(job_id, _decode(text, job_id))


def _decode(text: str, job_id: str) -> dict[str, object]:
    import json

    try:
        raw = json.loads(text)
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        raise ShifterError("job", "malformed container description", job_id)
    return raw


def _no_container(directory: str, job_id: str) -> ShifterError:
    try:
        with open(os.path.join(directory, error_file(job_id)), encoding="utf-8") as handle:
            reason = handle.read().strip()
    except OSError:
        reason = ""
    if reason:
        return ShifterError(f"job {job_id}", "the container could not be prepared", reason)
    return NoContainer(f"no prepared container for job {job_id} on this node",
                       "was the job submitted with --image?")  # fmt: skip
