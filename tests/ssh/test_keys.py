"""Derived per-job keys: determinism, separation, the site secret, and real OpenSSH.

Nothing is mocked: certificates are read back by ssh-keygen, and a real sshd on
127.0.0.1 shows that the job's certificate logs in and that every near miss (expired,
another job, another user, a client trusting another job, a name the host
certificate does not carry) is refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_ssh_private_key,
)
from support import REPO, wait_for_banner

from lab.users import ensure_users
from shifter_sshd.errors import Kind, ShifterError
from shifter_sshd.ssh import keys

VENV_PYTHON = "/opt/shifter-sshd/venv/bin/python"
SECRET = bytes(range(64))
START = 1_700_000_000
END = START + 3600
USER = "sstest1"
UID = 2901
JOB = {"cluster": "lab", "job_id": 1234, "restart_count": 0}


def key_set(**changes: object) -> keys.NodeKeySet:
    """The reference key set, with some inputs changed."""
    args: dict[str, object] = {
        "secret": SECRET,
        **JOB,
        "uid": UID,
        "user": USER,
        "node_name": "node1",
        "host_principals": ["node1.lab", "10.0.0.1"],
        "valid_after": START,
        "valid_before": END,
        **changes,
    }
    return keys.node_key_set(**args)  # type: ignore[arg-type]


def raw_private(pem: bytes) -> bytes:
    """The private key itself: the OpenSSH file has a random check word."""
    key = load_ssh_private_key(pem, password=None)
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def key_blob(line: bytes) -> bytes:
    """The key type and base64 of a public key or certificate line, without comment."""
    return b" ".join(line.split()[:2])


# --- determinism and separation ---------------------------------------------------


def test_same_inputs_give_the_same_keys() -> None:
    one, two = key_set(), key_set()
    assert raw_private(one.user_private) == raw_private(two.user_private)
    assert raw_private(one.host_private) == raw_private(two.host_private)
    assert one.user_public == two.user_public
    assert one.host_public == two.host_public
    assert one.ca_public == two.ca_public


def test_nodes_of_a_job_share_ca_and_user_key_but_not_host_keys() -> None:
    one, two = key_set(), key_set(node_name="node2")
    assert one.ca_public == two.ca_public
    assert one.user_public == two.user_public
    assert raw_private(one.user_private) == raw_private(two.user_private)
    assert key_blob(one.host_public) != key_blob(two.host_public)


@pytest.mark.parametrize(
    "change",
    [
        {"cluster": "other"},
        {"job_id": 1235},
        {"restart_count": 1},
        {"secret": bytes(reversed(SECRET))},
        {"uid": 2902},
        {"user": "sstest2"},
    ],
    ids=["cluster", "job", "requeue", "secret", "uid", "user"],
)
def test_every_job_input_changes_every_key(change: dict[str, object]) -> None:
    one, two = key_set(), key_set(**change)
    for name in ("ca_public", "user_public", "host_public"):
        assert key_blob(getattr(one, name)) != key_blob(getattr(two, name)), name
    assert raw_private(one.user_private) != raw_private(two.user_private)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"job_id": 1, "restart_count": 23}, {"job_id": 12, "restart_count": 3}),
        ({"cluster": "lab1", "job_id": 2}, {"cluster": "lab", "job_id": 12}),
        ({"cluster": "ab", "node_name": "c"}, {"cluster": "a", "node_name": "bc"}),
    ],
    ids=["job+restart", "cluster+job", "cluster+node"],
)
def test_concatenations_never_collide(first: dict[str, object], second: dict[str, object]) -> None:
    one, two = key_set(**first), key_set(**second)
    assert key_blob(one.ca_public) != key_blob(two.ca_public)
    assert key_blob(one.host_public) != key_blob(two.host_public)


def test_serials_are_deterministic_and_key_ids_name_the_job() -> None:
    one, two = key_set(), key_set()
    assert one.user_certificate != two.user_certificate  # a fresh nonce per signature
    first, second = keygen_list(one.user_certificate), keygen_list(two.user_certificate)
    assert field(first, "Serial") == field(second, "Serial")
    assert field(first, "Key ID") == '"shifter-sshd/lab/job-1234/restart-0/user-sstest1"'
    host = keygen_list(one.host_certificate)
    assert field(host, "Key ID") == '"shifter-sshd/lab/job-1234/restart-0/node-node1"'


def test_job_ca_public_matches_the_key_set() -> None:
    assert keys.job_ca_public(SECRET, "lab", 1234, 0, UID, USER) == key_set().ca_public


def test_repr_never_shows_private_keys() -> None:
    text = repr(key_set())
    assert "PRIVATE" not in text
    assert "user_private" not in text
    assert "host_private" not in text


@pytest.mark.parametrize(
    "change",
    [
        {"secret": b"short"},
        {"cluster": ""},
        {"job_id": -1},
        {"restart_count": 2**64},
        {"user": ""},
        {"node_name": ""},
        {"host_principals": ["ok", ""]},
        {"valid_after": END, "valid_before": START},
    ],
)
def test_bad_inputs_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ShifterError, match=r"^shifter-sshd: keys: "):
        key_set(**change)


# --- validity -------------------------------------------------------------------------


def test_validity_from_start_to_end_plus_grace() -> None:
    assert keys.validity(START, END, 300, 86400) == (START - keys.CLOCK_SKEW, END + 300)


def test_validity_without_end_uses_max_lifetime() -> None:
    assert keys.validity(START, None, 300, 7200) == (START - keys.CLOCK_SKEW, START + 7200)


def test_validity_clamps_to_max_lifetime_and_after_start() -> None:
    assert keys.validity(START, START + 10**9, 300, 7200)[1] == START + 7200
    assert keys.validity(START, START - 1000, 0, 7200)[1] == START + 1


def test_validity_refuses_nonsense() -> None:
    with pytest.raises(ShifterError, match="bad certificate validity"):
        keys.validity(START, END, -1, 7200)


# --- ssh-keygen reads what we write ------------------------------------------------------


def keygen_list(certificate: bytes) -> list[str]:
    """``ssh-keygen -L`` of a certificate, in UTC, as stripped lines."""
    with tempfile.NamedTemporaryFile(suffix="-cert.pub") as file:
        file.write(certificate)
        file.flush()
        out = subprocess.run(
            ["ssh-keygen", "-L", "-f", file.name],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TZ": "UTC"},
        ).stdout
    return [line.strip() for line in out.splitlines()]


def field(lines: list[str], name: str) -> str:
    return next(line.split(": ", 1)[1] for line in lines if line.startswith(name + ":"))


def block(lines: list[str], name: str) -> list[str]:
    """The indented list under a heading such as ``Principals:``."""
    start = lines.index(name + ":") + 1
    end = next((i for i in range(start, len(lines)) if ":" in lines[i]), len(lines))
    return lines[start:end]


def fingerprint(public: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".pub") as file:
        file.write(public)
        file.flush()
        out = subprocess.run(["ssh-keygen", "-l", "-f", file.name], capture_output=True, text=True)
    return out.stdout.split()[1]


def utc(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def test_user_certificate_parses() -> None:
    ks = key_set()
    lines = keygen_list(ks.user_certificate)
    assert field(lines, "Type") == "ssh-ed25519-cert-v01@openssh.com user certificate"
    assert field(lines, "Valid") == f"from {utc(START)} to {utc(END)}"
    assert field(lines, "Signing CA").split()[1] == fingerprint(ks.ca_public)
    assert block(lines, "Principals") == [USER]
    assert block(lines, "Extensions") == sorted(keys.USER_EXTENSIONS)


def test_host_certificate_parses() -> None:
    ks = key_set()
    lines = keygen_list(ks.host_certificate)
    assert field(lines, "Type") == "ssh-ed25519-cert-v01@openssh.com host certificate"
    assert field(lines, "Valid") == f"from {utc(START)} to {utc(END)}"
    assert field(lines, "Signing CA").split()[1] == fingerprint(ks.ca_public)
    assert block(lines, "Principals") == ["node1", "node1.lab", "10.0.0.1"]
    assert field(lines, "Extensions") == "(none)"


def test_private_keys_load_in_ssh_keygen(tmp_path: Path) -> None:
    ks = key_set()
    for private, public in ((ks.user_private, ks.user_public), (ks.host_private, ks.host_public)):
        path = tmp_path / "key"
        path.write_bytes(private)
        path.chmod(0o600)
        out = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(path)], capture_output=True, check=True
        ).stdout
        assert key_blob(out) == key_blob(public)


# --- the site secret ------------------------------------------------------------------


def test_init_secret_writes_root_0600_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    keys.init_secret(str(path))
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert os.listdir(tmp_path) == ["secret"]  # no temporary file left
    header, hexed, *rest = path.read_text().split("\n")
    assert (header, rest) == (keys.SECRET_HEADER, [""])
    assert keys.load_secret(str(path)) == bytes.fromhex(hexed)
    assert len(keys.load_secret(str(path))) == keys.SECRET_BYTES


def test_init_secret_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    keys.init_secret(str(path))
    before = path.read_bytes()
    with pytest.raises(ShifterError) as err:
        keys.init_secret(str(path))
    assert str(path) in str(err.value)
    assert err.value.kind == Kind.USAGE
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["secret"]
    keys.init_secret(str(path), force=True)
    assert path.read_bytes() != before
    assert os.listdir(tmp_path) == ["secret"]


def write_secret(path: Path, secret: bytes, mode: int = 0o600) -> str:
    path.write_text(f"{keys.SECRET_HEADER}\n{secret.hex()}\n")
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(
    ("mode", "shown"), [(0o644, "0644"), (0o640, "0640"), (0o602, "0602"), (0o620, "0620")]
)
def test_load_secret_refuses_open_modes(tmp_path: Path, mode: int, shown: str) -> None:
    path = write_secret(tmp_path / "secret", SECRET, mode)
    with pytest.raises(ShifterError) as err:
        keys.load_secret(path)
    assert str(err.value) == (
        f"shifter-sshd: {path}: site secret is open to group or others (chmod 600): {shown}"
    )
    assert err.value.kind == Kind.NODE


def test_load_secret_refuses_a_user_owned_file(tmp_path: Path) -> None:
    user = ensure_users()[0]
    path = write_secret(tmp_path / "secret", SECRET)
    os.chown(path, user.uid, -1)
    with pytest.raises(ShifterError) as err:
        keys.load_secret(path)
    assert str(err.value) == f"shifter-sshd: {path}: site secret is not owned by root: uid 2901"


def test_load_secret_refuses_a_short_secret(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "secret", SECRET[:16])
    with pytest.raises(ShifterError, match=r"site secret is too short: 16 bytes, need 32$"):
        keys.load_secret(path)


def test_load_secret_refuses_a_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing")
    with pytest.raises(ShifterError) as err:
        keys.load_secret(path)
    assert str(err.value) == (
        f"shifter-sshd: {path}: no site secret (run shifter-sshd secret init): missing"
    )


def test_load_secret_refuses_other_files_without_quoting_them(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("Port 22\nPermitRootLogin yes\n")
    path.chmod(0o600)
    with pytest.raises(ShifterError, match="not a shifter-sshd site secret") as err:
        keys.load_secret(str(path))
    assert "Port" not in str(err.value)
    with pytest.raises(ShifterError, match="not a regular file"):
        keys.load_secret(str(tmp_path))


def cli_secret_init(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [VENV_PYTHON, "-m", "shifter_sshd", "secret", "init", "--path", str(path), *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO)


def test_cli_secret_init(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    done = cli_secret_init(path)
    assert (done.returncode, done.stdout) == (0, f"{path}\n"), done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = keys.load_secret(str(path))

    refused = cli_secret_init(path)
    assert refused.returncode == 2
    assert f"shifter-sshd: {path}: a site secret exists already" in refused.stderr
    assert keys.load_secret(str(path)) == first

    forced = cli_secret_init(path, "--force")
    assert forced.returncode == 0, forced.stderr
    assert keys.load_secret(str(path)) != first
    assert os.listdir(tmp_path) == ["secret"]


# --- real OpenSSH ---------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A running host sshd using one job's derived host key and CA."""

    port: int
    workdir: Path
    log: Path
    keys: keys.NodeKeySet


def write_private(path: Path, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sshd_config(workdir: Path, ks: keys.NodeKeySet, port: int) -> str:
    text = f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {write_private(workdir / "host_key", ks.host_private)}
HostCertificate {write_private(workdir / "host_key-cert.pub", ks.host_certificate)}
TrustedUserCAKeys {write_private(workdir / "ca.pub", ks.ca_public)}
AuthorizedKeysFile none
UsePAM no
AllowUsers {USER}
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes yes
PidFile {workdir}/sshd.pid
LogLevel VERBOSE
"""
    return write_private(workdir / "sshd_config", text.encode())


@pytest.fixture(scope="module")
def login_user() -> Iterator[str]:
    """sstest1, unlocked while the tests run.

    useradd leaves the password field ``!``, and sshd with ``UsePAM no`` refuses a
    locked account even with a valid certificate. ``*`` allows no password either.
    """
    ensure_users()
    entry = subprocess.run(["getent", "shadow", USER], capture_output=True, text=True, check=True)
    password = entry.stdout.split(":")[1]
    if password.startswith("!"):
        subprocess.run(["usermod", "-p", "*", USER], check=True)
    try:
        yield USER
    finally:
        if password.startswith("!"):
            subprocess.run(["usermod", "-p", password, USER], check=True)


@pytest.fixture(scope="module")
def server(login_user: str) -> Iterator[Server]:
    """sshd on 127.0.0.1 for job 1234, node1 (also called localhost, but not 127.0.0.1)."""
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    workdir = Path(tempfile.mkdtemp(prefix="shifter-sshd-test-keys-", dir="/run"))
    now = int(time.time())
    ks = key_set(host_principals=["localhost"], valid_after=now - 60, valid_before=now + 3600)
    port, log = free_port(), workdir / "sshd.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        config = sshd_config(workdir, ks, port)
        with open(log, "wb") as out:
            proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", config], stderr=out)
        wait_for_banner(port, proc, log)
        yield Server(port, workdir, log, ks)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir)


def ssh(server: Server, client: keys.NodeKeySet, trusted_ca: bytes, host: str) -> str:
    """Log in as sstest1 with ``client``'s key and certificate; return rc, output, log."""
    attempt = Path(tempfile.mkdtemp(dir=server.workdir))
    known = keys.cert_authority_line(trusted_ca, ["localhost", "127.0.0.1"], server.port)
    logged = server.log.stat().st_size
    command = [
        "/usr/bin/ssh", "-F", "/dev/null", "-4", "-p", str(server.port),
        "-i", write_private(attempt / "id_ed25519", client.user_private),
        "-o", f"CertificateFile={write_private(attempt / 'cert.pub', client.user_certificate)}",
        "-o", f"UserKnownHostsFile={write_private(attempt / 'known_hosts', known)}",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", "ConnectTimeout=10", f"{USER}@{host}", "id -un",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    time.sleep(0.1)  # let sshd finish its log lines
    with open(server.log, "rb") as log:
        log.seek(logged)
        sshd_said = log.read().decode(errors="replace")
    return f"rc={done.returncode}\n{done.stdout}\n{done.stderr}\n--- sshd:\n{sshd_said}"


def valid_window() -> tuple[int, int]:
    now = int(time.time())
    return now - 60, now + 3600


def test_login_with_the_job_certificate(server: Server) -> None:
    result = ssh(server, server.keys, server.keys.ca_public, "localhost")
    assert result.startswith(f"rc=0\n{USER}\n"), result
    assert 'Accepted certificate ID "shifter-sshd/lab/job-1234/restart-0/user-sstest1"' in result


def test_expired_certificate_is_refused(server: Server) -> None:
    now = int(time.time())
    expired = key_set(valid_after=now - 7200, valid_before=now - 3600)
    result = ssh(server, expired, server.keys.ca_public, "localhost")
    assert result.startswith("rc=255\n"), result
    assert "Permission denied (publickey)" in result
    assert "Certificate invalid: expired" in result


def test_certificate_of_another_job_is_refused(server: Server) -> None:
    other = key_set(job_id=1235, valid_after=valid_window()[0], valid_before=valid_window()[1])
    result = ssh(server, other, server.keys.ca_public, "localhost")
    assert result.startswith("rc=255\n"), result
    assert "Permission denied (publickey)" in result
    assert "Failed publickey for sstest1" in result
    assert "job-1235" in result


def test_certificate_for_another_user_is_refused(server: Server) -> None:
    """Another user's job with the same job id (a reused id) has another CA altogether."""
    other = key_set(user="sstest2", uid=2902, valid_after=valid_window()[0],
                    valid_before=valid_window()[1])  # fmt: skip
    assert key_blob(other.ca_public) != key_blob(server.keys.ca_public)
    result = ssh(server, other, server.keys.ca_public, "localhost")
    assert result.startswith("rc=255\n"), result
    assert "Permission denied (publickey)" in result
    assert "Accepted" not in result


def test_client_trusting_another_job_refuses_the_host(server: Server) -> None:
    other_ca = keys.job_ca_public(SECRET, "lab", 1235, 0, UID, USER)
    result = ssh(server, server.keys, other_ca, "localhost")
    assert result.startswith("rc=255\n"), result
    assert "Host key verification failed." in result
    assert "Accepted" not in result


def test_requeued_job_ca_is_another_ca(server: Server) -> None:
    requeued_ca = keys.job_ca_public(SECRET, "lab", 1234, 1, UID, USER)
    result = ssh(server, server.keys, requeued_ca, "localhost")
    assert "Host key verification failed." in result, result


def test_host_name_not_in_the_host_certificate_is_refused(server: Server) -> None:
    result = ssh(server, server.keys, server.keys.ca_public, "127.0.0.1")
    assert result.startswith("rc=255\n"), result
    assert "Certificate invalid: name is not a listed principal" in result
    assert "Host key verification failed." in result
    assert "Accepted" not in result


def test_keys_module_imports_without_cryptography() -> None:
    """The prolog imports this module on paths that never derive a key."""
    code = "import sys, shifter_sshd.ssh.keys; print('cryptography' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr
