"""This node's slurmstepd processes, asked directly: which jobs live here, and adoption.

Every job step on a node has a slurmstepd listening on a unix socket named
``<SlurmdSpoolDir>/<NodeName>_<job>.<step>``; slurmd itself decides whether a job
still runs on the node by asking those sockets. The sockets are found in
``/proc/net/unix`` (no slurm.conf parsing, no slurmctld), and spoken to with the
stepd protocol that ``scontrol listpids`` and pam_slurm_adopt use: native-endian
ints, a version handshake, then requests. It is the same in Slurm 22.05, 24.11 and
26.05 for what is used here; 26.05 closes the connection instead of replying to a
refused request, so end of file counts as a refusal.

Adoption (``REQUEST_ADD_EXTERN_PID``) puts a process into the job's extern step:
its cgroups (proctrack/cgroup, task/cgroup), accounting and ``scontrol listpids``;
everything it starts afterwards inherits that. Only root (or SlurmUser) may ask.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time

EXTERN_STEP = 0xFFFFFFFC  # SLURM_EXTERN_CONT
# Any version at or above the stepd's minimum is accepted: 22.05 takes 36<<8 and up,
# 26.05 42<<8 and up. 45<<8 is 26.05's own.
CLIENT_PROTOCOL = 45 << 8
REQUEST_STATE = 5
REQUEST_PID_IN_CONTAINER = 8
REQUEST_ADD_EXTERN_PID = 22
STATE_RUNNING = 2
_SOCKET = re.compile(rb"/([^/]+)_(\d+)\.(\d+)(?:\.\d+)?$")


class StepdError(Exception):
    """The stepd refused or did not answer; the message says which and why."""


def sockets(job_id: str | None = None) -> list[tuple[str, int]]:
    """(socket path, step id) of every stepd listening on this node (for one job)."""
    found = []
    try:
        with open("/proc/net/unix", "rb") as handle:
            lines = handle.read().splitlines()[1:]
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[5] != b"01":  # only listening sockets
            continue
        match = _SOCKET.search(fields[7])
        if match and (job_id is None or match.group(2) == job_id.encode()):
            found.append((os.fsdecode(fields[7]), int(match.group(3))))
    return found


def _recv(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise StepdError("the stepd closed the connection without an answer")
        data += chunk
    return data


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(struct.pack("=i", CLIENT_PROTOCOL))
        (version,) = struct.unpack("=i", _recv(sock, 4))
    except (OSError, StepdError) as err:
        sock.close()
        raise StepdError(f"cannot talk to the stepd at {path} ({err})") from None
    if version < 0:
        sock.close()
        raise StepdError(f"the stepd at {path} refused the connection")
    return sock


def _ask(sock: socket.socket, request: bytes, answer: str) -> tuple[int, ...]:
    sock.sendall(request)
    return struct.unpack(answer, _recv(sock, struct.calcsize(answer)))


def state(path: str, timeout: float = 5.0) -> int:
    with _connect(path, timeout) as sock:
        return _ask(sock, struct.pack("=i", REQUEST_STATE), "=i")[0]


def job_running(job_id: str) -> bool:
    """Whether any step of ``job_id`` still lives on this node (slurmd's own test)."""
    for path, _step in sockets(job_id):
        try:
            if state(path) != 0:  # NOT_RUNNING
                return True
        except StepdError:
            continue  # a stale socket: that stepd is gone
    return False


def extern_socket(job_id: str) -> str | None:
    for path, step in sockets(job_id):
        if step == EXTERN_STEP:
            return path
    return None


def adopt(job_id: str, pids: list[int], timeout: float = 10.0) -> None:
    """Add ``pids`` to the job's extern step, once it runs; StepdError if that fails.

    The socket exists a moment before the step is set up, so the state is polled
    until RUNNING first. Each pid is then checked to be in the step's container:
    with proctrack plugins that do not track added processes (linuxproc, pgid) it
    is not, and Slurm would not kill it at job end.
    """
    path = extern_socket(job_id)
    if path is None:
        raise StepdError(f"job {job_id} has no extern step on this node (PrologFlags=Contain?)")
    with _connect(path, timeout) as sock:
        deadline = time.monotonic() + timeout
        while (current := _ask(sock, struct.pack("=i", REQUEST_STATE), "=i")[0]) < STATE_RUNNING:
            if time.monotonic() > deadline:
                raise StepdError(f"the extern step of job {job_id} is still in state {current}")
            time.sleep(0.01)
        for pid in pids:
            (rc,) = _ask(sock, struct.pack("=ii", REQUEST_ADD_EXTERN_PID, pid), "=i")
            if rc != 0:
                raise StepdError(f"the extern step of job {job_id} refused pid {pid} (rc {rc})")
            (inside,) = _ask(sock, struct.pack("=ii", REQUEST_PID_IN_CONTAINER, pid), "=?")
            if not inside:
                raise StepdError(f"pid {pid} is not tracked by job {job_id}'s extern step after "
                                 "adoption: proctrack must be proctrack/cgroup")  # fmt: skip
