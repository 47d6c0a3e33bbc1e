"""Per-job ssh keys and certificates, derived from one site secret.

Shifter generated an RSA key once and kept it in the user's home forever, and ran
ssh-keygen four times per node per job for host keys. Here every key is derived:
HKDF-SHA256 over the site secret (``sshKeySecret``, copied to every node like
munge.key) with the cluster name, job id, restart count and the job user's uid and
name gives the job's Ed25519 CA
and the user's Ed25519 key; the node name added gives each node's host key. So every
node of a job agrees without talking to the others, a requeued job (restart count + 1)
gets new keys, and without the secret no job can compute another's.

The CA signs a host certificate per node and a user certificate for the job's owner;
the CA private key exists only in memory, long enough to sign.

The site secret file is two lines: ``shifter-sshd-secret-v1`` and the secret as
lowercase hex (64 random bytes from ``os.urandom``), root-owned, mode 0600.

``cryptography`` is imported inside the functions that need it: it costs about 30 ms,
and the prolog and ``secret init`` import this module on paths that never derive.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import node_error, usage_error

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SECRET_HEADER = "shifter-sshd-secret-v1"  # noqa: S105 (a format label, not a secret)
SECRET_BYTES = 64
MIN_SECRET_BYTES = 32
_MAX_SECRET_FILE = 4096

# Domain separation: the version label starts every HKDF info, the salt names the use.
_VERSION = "shifter-sshd/keys/v2"  # v2: the job user is part of every derivation
_SALT = b"shifter-sshd per-job ssh keys"

# Certificates start this much before the job did: slurmctld stamps the start time
# with its own clock, and a node a few seconds behind would refuse a fresh certificate.
CLOCK_SKEW = 60

USER_EXTENSIONS = (
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
)


@dataclass(frozen=True)
class NodeKeySet:
    """Everything one node of a job needs, OpenSSH-encoded and ready to write.

    Public keys and certificates are one line each, newline-terminated, commented with
    the key id. The private keys are unencrypted OpenSSH private keys; they are kept
    out of ``repr`` so that logging the record cannot leak them. There is no CA
    private key: it never leaves :func:`node_key_set`.
    """

    user_private: bytes = field(repr=False)
    user_public: bytes
    user_certificate: bytes
    host_private: bytes = field(repr=False)
    host_public: bytes
    host_certificate: bytes
    ca_public: bytes


# --- the site secret ---------------------------------------------------------------


def init_secret(path: str, force: bool = False) -> None:
    """Write a new random site secret at ``path``, root-owned 0600, atomically.

    A half-written or world-readable secret must never be visible, so it is written to
    a temporary file in the same directory, fsynced and renamed into place. Without
    ``force`` an existing secret is kept (hard-linking fails if the name exists, with
    no window between check and write): replacing it changes every job's keys, and
    every node needs the new copy.
    """
    if not force and os.path.lexists(path):
        raise _exists_error(path)
    directory = os.path.dirname(os.path.abspath(path))
    text = f"{SECRET_HEADER}\n{os.urandom(SECRET_BYTES).hex()}\n".encode()
    temp = _write_private_temp(directory, text, path)
    try:
        if force:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as err:
        raise node_error(path, "cannot write the site secret", err.strerror) from None
    finally:
        _remove_quietly(temp)
    _fsync_directory(directory)


def _exists_error(path: str) -> Exception:
    return usage_error(
        path, "a site secret exists already", "--force replaces it (copy the new one everywhere)"
    )


def _write_private_temp(directory: str, data: bytes, path: str) -> str:
    """Create a root-owned 0600 file next to ``path`` holding ``data``, fsynced."""
    import tempfile

    try:
        fd, temp = tempfile.mkstemp(prefix=".secret-", dir=directory)
    except OSError as err:
        raise node_error(path, "cannot write the site secret", err.strerror) from None
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    except OSError as err:
        _remove_quietly(temp)
        raise node_error(path, "cannot write the site secret", err.strerror) from None
    finally:
        os.close(fd)
    return temp


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable: a crash must not bring back the old secret or none."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_secret(path: str) -> bytes:
    """Read the site secret, refusing one that others could read, change or guess.

    The checks use the opened file's own ``fstat``, so a file swapped in between
    cannot pass them. Errors never quote the file's contents.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise node_error(path, "no site secret (run shifter-sshd secret init)", "missing") from None
    except OSError as err:
        raise node_error(path, "cannot read the site secret", err.strerror) from None
    try:
        _check_secret_file(path, os.fstat(fd))
        data = os.read(fd, _MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    return _parse_secret(path, data)


def _check_secret_file(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise node_error(path, "site secret is not a regular file", stat.filemode(st.st_mode))
    if st.st_uid != 0:
        raise node_error(path, "site secret is not owned by root", f"uid {st.st_uid}")
    if st.st_mode & 0o077:
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        raise node_error(path, "site secret is open to group or others (chmod 600)", mode)


def _parse_secret(path: str, data: bytes) -> bytes:
    lines = data.decode("ascii", errors="replace").split("\n")
    if len(data) > _MAX_SECRET_FILE or lines[0] != SECRET_HEADER:
        raise node_error(path, "not a shifter-sshd site secret", f"expected {SECRET_HEADER!r}")
    try:
        secret = bytes.fromhex("".join(lines[1:]))
    except ValueError:
        raise node_error(path, "site secret is not hexadecimal", "damaged file") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise node_error(
            path, "site secret is too short", f"{len(secret)} bytes, need {MIN_SECRET_BYTES}"
        )
    return secret


# --- derivation ------------------------------------------------------------------------


def _field(value: str | int) -> bytes:
    """One length-prefixed field: ints as 8 bytes, strings as UTF-8.

    The length prefix makes the encoding injective, so job "1" restart 23 and job
    "12" restart 3, or cluster "ab" node "c" and cluster "a" node "bc", never meet.
    """
    raw = value.to_bytes(8, "big") if isinstance(value, int) else value.encode()
    return len(raw).to_bytes(4, "big") + raw


def _info(purpose: str, *fields: str | int) -> bytes:
    return b"".join(_field(part) for part in (_VERSION, purpose, *fields))


def _derive_key(secret: bytes, info: bytes) -> Ed25519PrivateKey:
    """An Ed25519 key whose 32-byte seed is HKDF-SHA256(secret, info)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(secret)
    return Ed25519PrivateKey.from_private_bytes(seed)


@dataclass(frozen=True)
class _Job:
    """The inputs that name one run of one job; every derivation starts from these."""

    secret: bytes = field(repr=False)
    cluster: str
    job_id: int
    restart_count: int
    uid: int
    user: str

    def key(self, purpose: str, *extra: str) -> Ed25519PrivateKey:
        fields = (self.cluster, self.job_id, self.restart_count, self.uid, self.user)
        return _derive_key(self.secret, _info(purpose, *fields, *extra))

    def key_id(self, what: str) -> str:
        """For sshd's logs: which cluster, job, run and user or node."""
        return f"shifter-sshd/{self.cluster}/job-{self.job_id}/restart-{self.restart_count}/{what}"


def _job(secret: bytes, cluster: str, job_id: int, restart_count: int, uid: int, user: str) -> _Job:
    """Check the job's inputs: bad ones would silently give keys nobody else derives."""
    if len(secret) < MIN_SECRET_BYTES:
        raise node_error("keys", "site secret is too short", f"{len(secret)} bytes")
    if not cluster:
        raise node_error("keys", "cluster name is empty", repr(cluster))
    for name, number in (("job id", job_id), ("restart count", restart_count), ("uid", uid)):
        if not 0 <= number < 2**64:
            raise node_error("keys", f"{name} out of range", number)
    if not user:
        raise node_error("keys", "user name is empty", repr(user))
    return _Job(secret, cluster, job_id, restart_count, uid, user)


def _names(what: str, names: Sequence[str]) -> list[bytes]:
    """Deduplicate principals in order; refuse empty ones, which match nothing useful."""
    if not names or any(not name for name in names):
        raise node_error("keys", f"empty {what}", list(names))
    return [name.encode() for name in dict.fromkeys(names)]


# --- certificates -----------------------------------------------------------------------


def validity(start: int, end: int | None, grace: int, max_lifetime: int) -> tuple[int, int]:
    """The certificates' (valid_after, valid_before), in seconds since the epoch.

    From the job's start (less CLOCK_SKEW) to its end plus ``grace``; when Slurm
    gives no end, ``start + max_lifetime``. ``max_lifetime`` also caps a known end,
    so a job with no real time limit cannot get a certificate valid for years.
    """
    if start < 0 or grace < 0 or max_lifetime <= 0:
        raise node_error("keys", "bad certificate validity", (start, end, grace, max_lifetime))
    latest = start + max_lifetime
    before = latest if end is None else min(end + grace, latest)
    return max(0, start - CLOCK_SKEW), max(before, start + 1)


def _check_window(valid_after: int, valid_before: int) -> None:
    if not 0 <= valid_after < valid_before < 2**64:
        raise node_error("keys", "bad certificate validity", (valid_after, valid_before))


def _serial(public_key: bytes) -> int:
    """Deterministic and distinct per certified key, so every node logs the same one."""
    import hashlib

    return int.from_bytes(hashlib.sha256(public_key).digest()[:8], "big")


def _public_line(key: Ed25519PrivateKey, comment: str) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    return raw + b" " + comment.encode() + b"\n"


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    return key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())


@dataclass(frozen=True)
class _CertRequest:
    """What one certificate says; the CA and the certified key come separately."""

    user: bool
    key_id: str
    principals: list[bytes]
    valid_after: int
    valid_before: int


def _certificate(ca: Ed25519PrivateKey, key: Ed25519PrivateKey, req: _CertRequest) -> bytes:
    """Sign ``key``'s public half. User certificates get the usual session extensions:
    without ``permit-pty`` sshd refuses a terminal even though the login succeeds."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, ssh

    public = key.public_key()
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(public)
        .serial(_serial(public.public_bytes(Encoding.Raw, PublicFormat.Raw)))
        .type(ssh.SSHCertificateType.USER if req.user else ssh.SSHCertificateType.HOST)
        .key_id(req.key_id.encode())
        .valid_principals(req.principals)
        .valid_after(req.valid_after)
        .valid_before(req.valid_before)
    )
    if req.user:
        for name in USER_EXTENSIONS:
            builder = builder.add_extension(name.encode(), b"")
    return builder.sign(ca).public_bytes() + b" " + req.key_id.encode() + b"\n"


# --- the public entry points ------------------------------------------------------------


def job_ca_public(
    secret: bytes, cluster: str, job_id: int, restart_count: int, uid: int, user: str
) -> bytes:
    """The job CA's public key line, for a client that only needs to trust the job."""
    job = _job(secret, cluster, job_id, restart_count, uid, user)
    return _public_line(job.key("ca"), job.key_id("ca"))


def cert_authority_line(ca_public: bytes, hosts: Sequence[str], port: int = 22) -> bytes:
    """A known_hosts line trusting ``ca_public`` for ``hosts`` on ``port``.

    ssh looks a non-22 port up as ``[host]:port``, so a bare name would never match.
    """
    if not hosts:
        raise node_error("keys", "no hosts for the @cert-authority line", list(hosts))
    patterns = hosts if port == 22 else [f"[{host}]:{port}" for host in hosts]
    line = f"@cert-authority {','.join(patterns)} "
    return line.encode() + ca_public.rstrip(b"\n") + b"\n"


def node_key_set(
    secret: bytes,
    cluster: str,
    job_id: int,
    restart_count: int,
    uid: int,
    user: str,
    node_name: str,
    host_principals: Sequence[str],
    valid_after: int,
    valid_before: int,
) -> NodeKeySet:
    """Derive and certify one node's keys for one run of a job.

    ``host_principals`` are the names clients may type (host name, FQDN, addresses);
    ``node_name`` is always among them. The window usually comes from :func:`validity`.
    """
    job = _job(secret, cluster, job_id, restart_count, uid, user)
    _check_window(valid_after, valid_before)
    users = _names("user", [user])
    hosts = _names("host principal", [node_name, *host_principals])
    ca, user_key, host_key = job.key("ca"), job.key("user"), job.key("host", node_name)
    user_id, host_id = job.key_id(f"user-{user}"), job.key_id(f"node-{node_name}")
    user_req = _CertRequest(True, user_id, users, valid_after, valid_before)
    host_req = _CertRequest(False, host_id, hosts, valid_after, valid_before)
    return NodeKeySet(
        user_private=_private_pem(user_key),
        user_public=_public_line(user_key, user_id),
        user_certificate=_certificate(ca, user_key, user_req),
        host_private=_private_pem(host_key),
        host_public=_public_line(host_key, host_id),
        host_certificate=_certificate(ca, host_key, host_req),
        ca_public=_public_line(ca, job.key_id("ca")),
    )
