"""Rendered sshd_config / ssh_config / known_hosts, proven against the bundled OpenSSH.

The bundled sshd runs as an unprivileged test user, chrooted in a busybox root (no
libc) with the bundle at /opt/udiImage and a per-job etc bound over its etc, on
127.0.0.1 and a free port; keys and certificates come from ssh-keygen here so these
tests do not depend on shifter_sshd.ssh.keys.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from support import REPO, wait_for_banner

from lab.images import busybox_tree
from lab.users import LabUser, ensure_users
from shifter_sshd.container import environment
from shifter_sshd.errors import ShifterError
from shifter_sshd.ssh import bundle as udiimage
from shifter_sshd.ssh import config as sshconfig

UDI = sshconfig.UDI
HOSTS = ("node1", "node1.cluster.test", "localhost")
SSH_AUDIT = str(Path(sys.executable).parent / "ssh-audit")
ENV = {
    "PATH": f"{UDI}/bin:/usr/bin:/bin",
    "SHIFTER_RUNTIME": "1",
    "TRICKY": "a \"quoted\" \\back\\slash #not-a-comment $HOME 'single'\ttab  two",
    **environment.LAUNCHERS,
}
HOST_PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclass
class Container:
    """A busybox root with the bundle, a job etc, the user's key, and a running sshd."""

    base: Path
    root: Path
    bundle: Path
    etc: Path
    user: LabUser
    port: int
    log: Path

    def run(self, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = self.command(argv)
        env = HOST_PATH | {"HOME": f"/home/{self.user.name}"}
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)

    def command(self, argv: Sequence[str]) -> list[str]:
        return udiimage.in_root_command(
            self.root, self.bundle, argv, self.etc, self.user.uid, self.user.gid
        )

    def ssh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([f"{UDI}/bin/ssh", *args])

    @property
    def home(self) -> Path:
        return self.root / "home" / self.user.name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True)


def _own(path: Path, user: LabUser, mode: int) -> None:
    os.chown(path, user.uid, user.gid)
    path.chmod(mode)


def _make_root(base: Path, user: LabUser) -> Path:
    root = busybox_tree(base / "root")
    root.chmod(0o755)
    for sub in ("dev", "opt/udiImage", f"home/{user.name}", "var/shifter/ssh"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _own(root / "home" / user.name, user, 0o700)
    _own(root / "var" / "shifter" / "ssh", user, 0o700)
    (root / "etc" / "passwd").write_text(
        f"root:x:0:0:root:/root:/bin/sh\n"
        f"{user.name}:x:{user.uid}:{user.gid}::/home/{user.name}:/bin/sh\n"
    )
    (root / "etc" / "group").write_text(f"root:x:0:\n{user.name}:x:{user.gid}:\n")
    (root / "etc" / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
    (root / "etc" / "hosts").write_text(f"127.0.0.1 {' '.join(HOSTS)}\n")
    return root


def _make_keys(base: Path, root: Path, etc: Path, user: LabUser, port: int) -> None:
    """Job CA, host key + cert, user key + cert; another CA for the refusal test."""
    ca_dir = base / "ca"
    ca_dir.mkdir(mode=0o700)
    for name in ("ca", "other_ca"):
        _keygen("-t", "ed25519", "-N", "", "-C", name, "-f", str(ca_dir / name))
    host_key = etc / "ssh_host_ed25519_key"
    _keygen("-t", "ed25519", "-N", "", "-f", str(host_key))
    _keygen("-s", str(ca_dir / "ca"), "-I", "node1", "-h", "-n", ",".join([*HOSTS, "127.0.0.1"]),
            "-V", "-5m:+1h", f"{host_key}.pub")  # fmt: skip
    _own(host_key, user, 0o600)
    shutil.copyfile(ca_dir / "ca.pub", etc / "ssh_user_ca.pub")
    user_key = root / "var" / "shifter" / "ssh" / "id_ed25519"
    _keygen("-t", "ed25519", "-N", "", "-f", str(user_key))
    _keygen("-s", str(ca_dir / "ca"), "-I", user.name, "-n", user.name, "-V", "-5m:+1h",
            f"{user_key}.pub")  # fmt: skip
    for path in user_key.parent.iterdir():
        _own(path, user, 0o600)
    other = sshconfig.render_known_hosts((ca_dir / "other_ca.pub").read_text(), HOSTS, port)
    (etc / "other_known_hosts").write_text(other)


def _write_configs(etc: Path, bundle: Path, user: LabUser, port: int, suffix: str = "") -> None:
    """sshd_config, ssh_config and ssh_known_hosts (each + suffix) for one port."""
    sshd = sshconfig.SshdSettings(
        user=user.name, port=port, listen_address="127.0.0.1", environment=ENV
    )
    known_hosts = f"{sshconfig.KNOWN_HOSTS}{suffix}"
    client = sshconfig.SshClientSettings(
        hosts=HOSTS, port=port, user=user.name, known_hosts=known_hosts
    )
    ca_line = (etc / "ssh_user_ca.pub").read_text()  # the test's one CA signs hosts too
    (etc / f"ssh_known_hosts{suffix}").write_text(
        sshconfig.render_known_hosts(ca_line, HOSTS, port)
    )
    (etc / f"sshd_config{suffix}").write_text(sshconfig.render_sshd_config(sshd, str(bundle)))
    (etc / f"ssh_config{suffix}").write_text(sshconfig.render_ssh_config(client, str(bundle)))


def _start_sshd(c: Container, port: int, config: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [f"{UDI}/libexec/sshd", "-D", "-e", "-f", config]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            c.command(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=HOST_PATH, start_new_session=True,
        )  # fmt: skip
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill sshd and whatever sessions it still has, by PID only."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if process.poll() is None:
        process.terminate()  # sshd's listener exits cleanly on SIGTERM
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=10)
    for proc in children:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)
    psutil.wait_procs(children, timeout=10)


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    user = ensure_users()[0]
    base = Path(tempfile.mkdtemp(prefix="sshconfig-test-", dir="/var/tmp"))
    process: subprocess.Popen[bytes] | None = None
    try:
        bundle = base / "udiImage"
        udiimage.build(str(bundle))
        root = _make_root(base, user)
        etc = base / "etc"
        etc.mkdir(mode=0o755)
        port = _free_port()
        _make_keys(base, root, etc, user, port)
        _write_configs(etc, bundle, user, port)
        c = Container(base, root, bundle, etc, user, port, base / "sshd.log")
        process = _start_sshd(c, port, sshconfig.SSHD_CONFIG, c.log)
        wait_for_banner(port, process, c.log)
        yield c
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(base)


# --- the rendered files ----------------------------------------------------------------


def test_sshd_accepts_the_rendered_config(container: Container) -> None:
    shown = container.run([f"{UDI}/libexec/sshd", "-T", "-f", sshconfig.SSHD_CONFIG])
    assert shown.returncode == 0, shown
    lines = set(shown.stdout.splitlines())
    expected = {
        f"port {container.port}",
        f"allowusers {container.user.name}",
        "permitrootlogin no",
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
        "pubkeyauthentication yes",
        "authorizedkeysfile none",
        "usepam no",
        "strictmodes yes",
        "x11forwarding no",
        "maxstartups 1024:30:4096",
        "persourcemaxstartups none",
        "maxsessions 1024",
        "kexalgorithms sntrup761x25519-sha512@openssh.com",
        f"modulifile {UDI}/share/moduli",
        f"subsystem sftp {UDI}/libexec/sftp-server",
        f"trustedusercakeys {sshconfig.USER_CA}",
    }
    assert expected <= lines, expected - lines


def test_known_hosts_formats() -> None:
    ca = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr0 job ca"
    line = "@cert-authority {} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr0\n"
    assert sshconfig.render_known_hosts(ca, ["a", "b.x"], 22) == line.format("a,b.x")
    assert sshconfig.render_known_hosts(ca, ["a"], 1204) == line.format("[a]:1204")


@pytest.mark.parametrize(
    "make",
    [
        lambda: sshconfig.SshdSettings(user="u\nPermitRootLogin yes", port=22),
        lambda: sshconfig.SshdSettings(user="u", port=22, host_key="/etc/k\nUsePAM yes"),
        lambda: sshconfig.SshdSettings(user="u", port=22, pid_file="/run/a b"),
        lambda: sshconfig.SshdSettings(user="u", port=0),
        lambda: sshconfig.SshdSettings(user="*", port=22),
        lambda: sshconfig.SshdSettings(user="u", port=22, environment={"A": "x\nPort 1"}),
        lambda: sshconfig.SshdSettings(user="u", port=22, environment={"A=B": "x"}),
        lambda: sshconfig.SshdSettings(user="u", port=22, max_startups="10\nX"),
        lambda: sshconfig.SshClientSettings(hosts=["n1\nHost *"], port=22),
        lambda: sshconfig.SshClientSettings(hosts=["n1 *"], port=22),
        lambda: sshconfig.SshClientSettings(hosts=[], port=22),
        lambda: sshconfig.SshClientSettings(hosts="node1", port=22),
        lambda: sshconfig.SshClientSettings(hosts=["n1"], port=22, identity_file="~/.ssh/x"),
    ],
)
def test_values_cannot_inject_config_lines(make: object) -> None:
    assert callable(make)
    settings = make()
    with pytest.raises(ShifterError):
        if isinstance(settings, sshconfig.SshdSettings):
            sshconfig.render_sshd_config(settings)
        else:
            sshconfig.render_ssh_config(settings)


@pytest.mark.parametrize("line", ["ssh-rsa AAAA", "ssh-ed25519 AAAA\n@cert-authority * x", ""])
def test_known_hosts_rejects_bad_ca_lines(line: str) -> None:
    with pytest.raises(ShifterError):
        sshconfig.render_known_hosts(line, ["node1"], 22)


def test_templates_come_from_the_bundle_else_the_sources(container: Container) -> None:
    built = container.bundle / "share" / "templates"
    assert sshconfig.template_dir(str(container.bundle)) == built
    assert sshconfig.template_dir("/nonexistent") == sshconfig.source_dir()
    assert sshconfig.source_dir() == REPO / "udiImage"


# --- logging in -------------------------------------------------------------------------


def test_login_as_the_job_user(container: Container) -> None:
    for host in HOSTS:
        done = container.ssh(host, "id -un; cat /etc/os-release")
        assert done.returncode == 0, (done, container.log.read_text())
        assert done.stdout.startswith(f'{container.user.name}\nNAME="BusyBox"'), done.stdout


def test_sessions_get_the_set_environment(container: Container) -> None:
    done = container.ssh("node1", "env")
    assert done.returncode == 0, done
    seen = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    for name, value in ENV.items():
        assert seen.get(name) == value, name


def test_scp_and_sftp_use_the_wrapper(container: Container) -> None:
    (container.root / "tmp" / "batch").write_text("get /etc/os-release /tmp/got\n")
    try:
        scp = container.run([f"{UDI}/bin/scp", "-v", "/etc/hosts", "node1:/tmp/copied"])
        assert scp.returncode == 0, scp
        assert f"Executing: program {UDI}/bin/ssh host node1" in scp.stderr
        assert (container.root / "tmp" / "copied").read_text().startswith("127.0.0.1 node1")
        sftp = container.run([f"{UDI}/bin/sftp", "-b", "/tmp/batch", "node1"])
        assert sftp.returncode == 0, sftp
        assert (container.root / "tmp" / "got").read_text().startswith('NAME="BusyBox"')
    finally:
        for name in ("batch", "copied", "got"):
            (container.root / "tmp" / name).unlink(missing_ok=True)


def test_password_and_keyboard_interactive_refused(container: Container) -> None:
    done = container.ssh("-v", "-o", "PubkeyAuthentication=no", "-o", "BatchMode=no",
                         "-o", "PreferredAuthentications=password,keyboard-interactive",
                         "node1", "true")  # fmt: skip
    assert done.returncode == 255
    assert "Authentications that can continue: publickey\n" in done.stderr, done.stderr
    assert "Permission denied (publickey)." in done.stderr


def test_client_refuses_a_host_of_another_ca(container: Container) -> None:
    other = f"{sshconfig.ETC}/other_known_hosts"
    done = container.ssh("-o", f"UserKnownHostsFile={other}",
                         "-o", f"GlobalKnownHostsFile={other}", "node1", "true")  # fmt: skip
    assert done.returncode == 255
    assert "Host key verification failed." in done.stderr, done.stderr


def test_ssh_audit_reports_no_failure(container: Container) -> None:
    command = [SSH_AUDIT, "-p", str(container.port), "127.0.0.1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout


def test_user_config_cannot_weaken_allocation_hosts(container: Container) -> None:
    dot_ssh = container.home / ".ssh"
    dot_ssh.mkdir()
    try:
        _keygen("-t", "ed25519", "-N", "", "-f", str(dot_ssh / "elsewhere"))
        (dot_ssh / "config").write_text(
            "Host *\n    IdentityFile ~/.ssh/elsewhere\n    Port 2222\n"
            "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    User root\n"
            "    ProxyCommand /bin/false\n    ControlMaster auto\n    ControlPath ~/.ssh/cm-%C\n"
        )
        for path in (dot_ssh, *dot_ssh.iterdir()):
            _own(path, container.user, 0o700 if path.is_dir() else 0o600)
        done = container.ssh("node1", "id -un")
        assert done.returncode == 0 and done.stdout == f"{container.user.name}\n", done
        ours = set(container.ssh("-G", "node1").stdout.splitlines())
        assert {f"port {container.port}", "stricthostkeychecking true", "batchmode yes",
                f"user {container.user.name}",
                f"userknownhostsfile {sshconfig.KNOWN_HOSTS}"} <= ours  # fmt: skip
        theirs = set(container.ssh("-G", "otherhost").stdout.splitlines())
        assert not any(line.startswith("proxycommand") for line in ours)
        assert {"port 2222", "stricthostkeychecking false", "user root", "proxycommand /bin/false",
                "identityfile ~/.ssh/elsewhere"} <= theirs  # fmt: skip
    finally:
        shutil.rmtree(dot_ssh)


def test_ssh_retries_while_the_peer_sshd_starts(container: Container) -> None:
    port = _free_port()
    _write_configs(container.etc, container.bundle, container.user, port, suffix="_late")
    client = subprocess.Popen(
        container.command([f"{UDI}/bin/ssh", "-F", f"{sshconfig.ETC}/ssh_config_late",
                           "node1", "echo", "up"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=HOST_PATH,
    )  # fmt: skip
    server = None
    try:
        time.sleep(1.5)
        assert client.poll() is None, client.communicate()
        log = container.base / "sshd_late.log"
        server = _start_sshd(container, port, f"{sshconfig.ETC}/sshd_config_late", log)
        out, err = client.communicate(timeout=30)
        assert client.returncode == 0 and out == "up\n", (err, log.read_text())
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if server is not None:
            _stop(server)


@pytest.mark.parametrize("value", ["yes", "no", "local", "remote"])
def test_tcp_forwarding_as_the_site_configures(value: str) -> None:
    settings = sshconfig.SshdSettings(user="alice", port=1204, allow_tcp_forwarding=value)
    lines = sshconfig.render_sshd_config(settings).splitlines()
    assert [line for line in lines if line.startswith("AllowTcpForwarding")] == [
        f"AllowTcpForwarding {value}"
    ]


def test_tcp_forwarding_refuses_anything_else() -> None:
    settings = sshconfig.SshdSettings(user="alice", port=1204, allow_tcp_forwarding="yes\nX")
    with pytest.raises(ShifterError, match="invalid AllowTcpForwarding"):
        sshconfig.render_sshd_config(settings)
