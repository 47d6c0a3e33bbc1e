"""``shifter --ssh-config DIR``: the job's container, reached from a login node or an IDE.

The job's owner already holds everything needed, inside the container: the job's
user key and its certificate (``/var/shifter/ssh``), the job CA that signs the host
certificates (``/opt/udiImage/etc/ssh_known_hosts``), the node list
(``/var/nodesfile``) and the sshd port (the prolog's record). This copies them into
``DIR``, with a ``DIR/config`` for ``ssh -F DIR/config NODE`` or an ``Include``:

- ``HostKeyAlias`` is the node's name, which the host certificate names, so strict
  host-key checking holds whatever address ``HostName`` has (the address the name
  has on the compute node that wrote the file: login nodes often cannot resolve
  compute nodes' names);
- the certificate expires with the job (``keys.py``: its validity ends at the job's
  end time plus a grace), and the epilog stops the sshd: after the job the files
  admit nobody.

It runs as the user with no privilege: it reads only what the kernel lets the caller
read (another user's container is EACCES), and writes only under ``DIR``, every file
0600 and replaced atomically. Nothing is written before every check has passed.
"""

from __future__ import annotations

import os
import socket

from ..errors import ShifterError
from ..kernel.rootpath import Root
from ..lifecycle.record import Container
from ..ssh import config as sshconfig

NODES_FILE = "/var/nodesfile"
FILES = ("id_ed25519", "id_ed25519-cert.pub", "known_hosts", "config")


class Material:
    """What ``DIR`` gets, gathered (and checked) before anything is written."""

    def __init__(self, container: Container, nodes: list[str], key: str, cert: str,
                 ca: str, user: str, proxy_jump: str | None) -> None:  # fmt: skip
        self.container = container
        self.nodes = nodes
        self.key = key
        self.cert = cert
        self.ca = ca  # "ssh-ed25519 AAAA...": the job CA's public key
        self.user = user
        self.proxy_jump = proxy_jump


def gather(container: Container, user: str, proxy_jump: str | None) -> Material:
    """The job's ssh material, read from its container as the caller."""
    where = f"job {container.job_id}"
    if not container.sshd_port:
        raise ShifterError(where, "this job has no container sshd (its nodes are shared, or "
                           "the site disabled it): nothing to reach", container.label)  # fmt: skip
    try:
        root = Root.at(container.root)
    except OSError as err:
        raise ShifterError(where, f"cannot open the container ({err.strerror})",
                           container.root) from None  # fmt: skip
    paths = (sshconfig.USER_KEY, sshconfig.USER_CERT, sshconfig.KNOWN_HOSTS, NODES_FILE)
    with root:
        texts = {path: root.read(path) or "" for path in paths}
    missing = [path for path, text in texts.items() if not text]
    if missing:
        raise ShifterError(where, "the container has no ssh material (is its sshd up?)",
                           missing[0])  # fmt: skip
    nodes = [line.strip() for line in texts[NODES_FILE].splitlines() if line.strip()]
    ca = _ca(texts[sshconfig.KNOWN_HOSTS], where)
    return Material(container, nodes, texts[sshconfig.USER_KEY], texts[sshconfig.USER_CERT],
                    ca, user, proxy_jump)  # fmt: skip


def _ca(known_hosts: str, where: str) -> str:
    for line in known_hosts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "@cert-authority" and fields[2] == "ssh-ed25519":
            return f"{fields[2]} {fields[3]}"
    raise ShifterError(where, "no job CA in the container's known_hosts", sshconfig.KNOWN_HOSTS)


def address(node: str) -> str:
    """The node's address as this node resolves it; the name itself when it does not."""
    try:
        found = socket.getaddrinfo(node, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return node
    return str(found[0][4][0]) if found else node


def render_config(m: Material, directory: str) -> str:
    """One ``Host`` block per node of the job, under its own name and ``job<id>-<node>``."""
    job = m.container.job_id
    lines = [f"# shifter --ssh-config: job {job}'s container ({m.container.label}), "
             "until the job ends", ""]  # fmt: skip
    for node in m.nodes:
        lines += [
            f"Host {node} job{job}-{node}",
            f"    HostName {address(node)}",
            f"    HostKeyAlias {node}",
            f"    Port {m.container.sshd_port}",
            f"    User {m.user}",
            f"    IdentityFile {_quote(os.path.join(directory, 'id_ed25519'))}",
            f"    CertificateFile {_quote(os.path.join(directory, 'id_ed25519-cert.pub'))}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {_quote(os.path.join(directory, 'known_hosts'))}",
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    UpdateHostKeys no",
            *([f"    ProxyJump {m.proxy_jump}"] if m.proxy_jump else []),
            "",
        ]
    return "\n".join(lines)


def _quote(path: str) -> str:
    if any(c in path for c in '"\n\r'):
        raise ShifterError("--ssh-config", "the directory name cannot be written into an "
                           "ssh config", path)  # fmt: skip
    return f'"{path}"' if any(c.isspace() for c in path) else path


def write(m: Material, directory: str) -> list[str]:
    """``directory``'s files, each 0600 and replaced atomically; returns the hosts."""
    directory = os.path.abspath(directory)
    contents = {
        "id_ed25519": m.key, "id_ed25519-cert.pub": m.cert,
        "known_hosts": f"@cert-authority {','.join(m.nodes)} {m.ca}\n",
        "config": render_config(m, directory),
    }  # fmt: skip
    dir_fd = _own_directory(directory)
    try:
        for name in FILES:
            _replace(dir_fd, name, contents[name].encode())
    finally:
        os.close(dir_fd)
    return m.nodes


def _own_directory(directory: str) -> int:
    """``directory``, made 0700 if missing (``~/.ssh`` too); an existing one must be the
    caller's and writable by nobody else (ssh refuses such a config, and a key there
    is exposed)."""
    try:
        os.makedirs(os.path.dirname(directory), 0o700, exist_ok=True)
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise ShifterError("--ssh-config", f"cannot create the directory ({err.strerror})",
                           directory) from None  # fmt: skip
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise ShifterError("--ssh-config", f"not a directory of yours ({err.strerror})",
                           directory) from None  # fmt: skip
    info = os.fstat(fd)
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        os.close(fd)
        raise ShifterError("--ssh-config", "the directory must be yours and writable by you "
                           "alone", directory)  # fmt: skip
    return fd


def _replace(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
