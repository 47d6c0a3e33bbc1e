"""The job's sshd on one node: real OpenSSH, real keys, real container roots."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BUSYBOX, DEBIAN
from sshjob import Job, _start
from support import Node

from lab import VENV
from lab.users import LabUser
from shifter_sshd.ssh import keys

SSH_AUDIT = os.path.join(VENV, "bin", "ssh-audit")


@pytest.fixture(params=[BUSYBOX, DEBIAN])
def job(
    request: pytest.FixtureRequest, node: Node, test_users: list[LabUser], bundle: str,
    secret_file: str,
) -> Iterator[Job]:  # fmt: skip
    started = _start(node, test_users[0], request.param, "301", bundle, secret_file)
    try:
        yield started
    finally:
        node.epilog("301")


PRETTY = {BUSYBOX: "BusyBox test root", DEBIAN: "Debian GNU/Linux 12 (bookworm)"}


def _pretty(job: Job) -> str:
    return "Debian GNU/Linux 12" if os.path.exists(job.path("/usr/bin/apt")) else "BusyBox"


def test_ssh_from_inside_the_container(job: Job) -> None:
    pretty = _pretty(job)
    done = job.inside(f"ssh {job.node_name} cat /etc/os-release")
    assert done.returncode == 0, done.stderr
    assert pretty in done.stdout
    done = job.inside(f"ssh -tt {job.node_name} 'stat -c \"%n %U %G %a\" $(tty)'")
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("/dev/pts/"))
    assert line.split()[1:] == [job.user.name, "tty", "620"]
    shell = "/bin/bash" if pretty.startswith("Debian") else "/bin/sh"
    assert job.inside(f"ssh {job.node_name} 'echo $SHELL'").stdout.strip() == shell


def test_scp_and_sftp(job: Job) -> None:
    done = job.inside(
        f"echo payload > /tmp/src && scp /tmp/src {job.node_name}:/tmp/copied && "
        f"cat /tmp/copied && echo 'get /tmp/copied /tmp/fetched' > /tmp/batch && "
        f"sftp -b /tmp/batch {job.node_name} && cat /tmp/fetched"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("payload") == 2


def test_ssh_from_the_host_with_the_job_identity(job: Job) -> None:
    done = job.host_ssh("cat /etc/os-release; echo PATH=$PATH; echo PLM=$OMPI_MCA_plm")
    assert done.returncode == 0, done.stderr
    assert _pretty(job) in done.stdout
    assert "PATH=/opt/udiImage/bin:" in done.stdout
    assert "PLM=rsh" in done.stdout


def test_the_sshd_has_no_privilege(job: Job) -> None:
    state = Path(job.node.state_path, f"{job.job_id}.json").read_text()
    pid = int(state.split('"sshd_pid":')[1].split(",")[0])
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == [str(job.user.uid)] * 4
    assert status["Gid"].split() == [str(job.user.gid)] * 4
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(status[cap].strip(), 16) == 0, cap
    assert status["NoNewPrivs"].strip() == "1"
    assert os.readlink(f"/proc/{pid}/root") == job.root


def test_ssh_audit_reports_no_failure(job: Job) -> None:
    done = subprocess.run([SSH_AUDIT, "-p", str(job.port), "127.0.0.1"], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert "(fail)" not in done.stdout


def test_user_ssh_config_does_not_break_it(job: Job) -> None:
    done = job.inside(
        "mkdir -p /tmp/.ssh && printf 'Host *\\n  IdentityFile ~/.ssh/elsewhere\\n"
        "  Port 2222\\n  StrictHostKeyChecking no\\n  User root\\n' > /tmp/.ssh/config && "
        f"chmod 600 /tmp/.ssh/config && ssh {job.node_name} echo reached"
    )
    assert done.returncode == 0, done.stderr
    assert "reached" in done.stdout


REFUSED = ("Permission denied", "Host key verification failed", "Connection closed")


def _refused(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode == 255 and any(text in done.stderr for text in REFUSED)


def _write_identity(directory: Path, key_set: keys.NodeKeySet, owner: LabUser) -> str:
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chown(directory, owner.uid, owner.gid)
    identity = directory / "id"
    identity.write_bytes(key_set.user_private)
    Path(f"{identity}-cert.pub").write_bytes(key_set.user_certificate)
    for path in (identity, Path(f"{identity}-cert.pub")):
        os.chown(path, owner.uid, owner.gid)
        path.chmod(0o600)
    return str(identity)


def test_refusals(job: Job, test_users: list[LabUser], user_tmp: Path) -> None:
    other = test_users[1]
    os.chmod(user_tmp, 0o711)
    now = int(time.time())
    cases = {
        "root": job.host_ssh("true", uid=0, login="root"),
        "password": job.host_ssh("true", options=(
            "-o", "PreferredAuthentications=password,keyboard-interactive")),
        "expired": job.host_ssh("true", identity=_write_identity(user_tmp / "expired",
            job.key_set(valid_after=now - 7200, valid_before=now - 3600), job.user)),
        "another job": job.host_ssh("true", identity=_write_identity(user_tmp / "otherjob",
            job.key_set(job_id=int(job.job_id) + 1), job.user)),
        "requeued job": job.host_ssh("true", identity=_write_identity(user_tmp / "requeue",
            job.key_set(restart_count=1), job.user)),
        "other user, same CA": job.host_ssh("true", uid=other.uid, login=other.name,
            identity=_write_identity(user_tmp / "other", job.key_set(user=other.name), other)),
        "cert for another principal": job.host_ssh("true", identity=_write_identity(
            user_tmp / "principal", job.key_set(user=other.name), job.user)),
    }  # fmt: skip
    wrong = user_tmp / "wrong"
    wrong.mkdir(mode=0o700)
    os.chown(wrong, job.user.uid, job.user.gid)
    subprocess.run(["setpriv", f"--reuid={job.user.uid}", f"--regid={job.user.gid}",
                    "--clear-groups", "ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                    "-f", str(wrong / "id")], check=True)  # fmt: skip
    cases["wrong key"] = job.host_ssh("true", identity=str(wrong / "id"))
    own = user_tmp / "own"
    own.mkdir(mode=0o700)
    os.chown(own, other.uid, other.gid)
    subprocess.run(["setpriv", f"--reuid={other.uid}", f"--regid={other.gid}", "--clear-groups",
                    "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(own / "id")],
                   check=True)  # fmt: skip
    cases["other user, own key"] = job.host_ssh("true", uid=other.uid, login=other.name,
                                                identity=str(own / "id"))  # fmt: skip
    other_ca = user_tmp / "other_ca_known_hosts"
    other_ca.write_bytes(keys.cert_authority_line(
        job.key_set(job_id=int(job.job_id) + 1).ca_public, [job.node_name], job.port))  # fmt: skip
    cases["client trusts another job's CA"] = job.host_ssh("true", known_hosts=str(other_ca))
    assert job.host_ssh("true").returncode == 0  # the real identity still works
    for name, done in cases.items():
        assert _refused(done), f"{name}: rc={done.returncode} {done.stderr}"
    assert "Host key verification failed" in cases["client trusts another job's CA"].stderr


def test_epilog_stops_sshd(
    node: Node, test_users: list[LabUser], bundle: str, secret_file: str
) -> None:
    started = _start(node, test_users[0], BUSYBOX, "302", bundle, secret_file)
    pid = int(Path(node.state_path, "302.json").read_text().split('"sshd_pid":')[1].split(",")[0])
    assert Path(f"/proc/{pid}").exists()
    session = subprocess.Popen(  # a session still open at job end
        ["/usr/sbin/chroot", f"--userspec={started.user.uid}:{started.user.gid}", started.root,
         "/bin/sh", "-c", f"HOME=/tmp ssh {started.node_name} sleep 600"],
    )  # fmt: skip
    time.sleep(1)
    done = node.epilog("302")
    assert done.returncode == 0, done.stderr
    session.wait(timeout=10)
    time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert node.leftovers() == []


def _listener_in_a_session(port: int) -> tuple[int, int]:
    """A session leader (standing in for sshd) that listens on ``port``, forks a child
    holding the listener (as sshd's connection child does) and closes its own copy.
    Returns (leader, child)."""
    ready_r, ready_w = os.pipe()
    leader = os.fork()
    if leader == 0:
        os.setsid()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        sock.close()
        os.write(ready_w, str(child).encode())
        time.sleep(60)
        os._exit(0)
    os.close(ready_w)
    child = int(os.read(ready_r, 32))
    os.close(ready_r)
    return leader, child


def test_sshds_own_connection_child_is_not_another_process_on_the_port() -> None:
    """Under a racing owner, sshd's connection child can be the listener's only holder
    for a moment: that is not "port held by another process" (soak_liveness saw it)."""
    from shifter_sshd.ssh import sshd

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    leader, child = _listener_in_a_session(port)
    try:
        assert sshd.port_holders(port) == [child]
        assert sshd._our_ipv4_listener(leader, port) is None
        assert not sshd._v4_taken_by_other(leader, port)
        # the same listener, seen from any other process, is someone else's
        assert sshd._v4_taken_by_other(os.getpid(), port)
    finally:
        for pid in (child, leader):
            os.kill(pid, 9)
        os.waitpid(leader, 0)
