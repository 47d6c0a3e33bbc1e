"""The job's ssh material inside the container: keys, certificates and configs.

Nothing goes to the user's home directory. The per-job etc (sshd_config, ssh_config,
known_hosts, host key and certificate, the user CA) is written to the job's scratch
area and bound read-only over /opt/udiImage/etc; the user's identity goes to
/var/shifter/ssh inside the container, owned by the user, 0600.
"""

from __future__ import annotations

import os
import socket
import time

from . import keys, sshconfig
from .config import Config
from .errors import node_error
from .job import Job
from .mounts import Mounter
from .rootpath import Root
from .users import User

USER_SSH_DIR = "/var/shifter/ssh"
SSHD_LOG = f"{USER_SSH_DIR}/sshd.log"
CLIENTS = ("ssh", "scp", "sftp")  # bound over the image's own, where it has them


def host_principals(node_name: str) -> list[str]:
    """Names a client may type for this node: node name, host name, addresses."""
    names = [node_name, socket.gethostname().split(".")[0], "localhost"]
    try:
        for info in socket.getaddrinfo(node_name, None, type=socket.SOCK_STREAM):
            names.append(str(info[4][0]))
    except OSError:
        pass
    return list(dict.fromkeys(n for n in names if n))


def derive(config: Config, job: Job, user: User, end_time: int | None) -> keys.NodeKeySet:
    secret = keys.load_secret(config.ssh_key_secret)
    cluster = config.system or job.cluster
    if not cluster:
        raise node_error("keys", "no cluster name (set system= or run under slurmd)", job.job_id)
    valid_after, valid_before = keys.validity(
        int(time.time()), end_time, config.ssh_cert_grace, config.ssh_cert_max_lifetime
    )
    return keys.node_key_set(secret, cluster, int(job.job_id), job.restart_count, user.name,
                             job.node_name, host_principals(job.node_name),
                             valid_after, valid_before)  # fmt: skip


def write_etc(
    scratch: str, config: Config, user: User, key_set: keys.NodeKeySet,
    hosts: list[str], env: dict[str, str],
) -> str:  # fmt: skip
    """Render and write the per-job etc into scratch; returns its host path."""
    etc_dir = os.path.join(scratch, "udiImage-etc")
    os.mkdir(etc_dir, 0o755)
    bundle = config.opt_udi_image
    sshd = sshconfig.SshdSettings(user=user.name, port=config.sshd_port, environment=env)
    client = sshconfig.SshClientSettings(hosts=hosts, port=config.sshd_port, user=user.name)
    files = {
        "sshd_config": (sshconfig.render_sshd_config(sshd, bundle).encode(), 0o644),
        "ssh_config": (sshconfig.render_ssh_config(client, bundle).encode(), 0o644),
        "ssh_known_hosts": (sshconfig.render_known_hosts(
            key_set.ca_public.decode(), hosts, config.sshd_port).encode(), 0o644),
        "ssh_host_ed25519_key": (key_set.host_private, 0o600),
        "ssh_host_ed25519_key-cert.pub": (key_set.host_certificate, 0o644),
        "ssh_host_ed25519_key.pub": (key_set.host_public, 0o644),
        "ssh_user_ca.pub": (key_set.ca_public, 0o644),
    }  # fmt: skip
    for name, (data, mode) in files.items():
        fd = os.open(os.path.join(etc_dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
            # sshd runs as the user and must read its host key; nobody else may.
            os.fchown(fd, user.uid if mode == 0o600 else 0, user.gid if mode == 0o600 else 0)
        finally:
            os.close(fd)
    return etc_dir


def install(m: Mounter, root: Root, etc_dir: str, user: User, key_set: keys.NodeKeySet) -> None:
    """Bind the per-job etc, write the user's identity, put our ssh over the image's."""
    m.bind(etc_dir, root.real("/opt/udiImage/etc"), read_only=True, kind="udiImage etc")
    owner = (user.uid, user.gid)
    root.makedirs("/var/shifter", 0o755)
    ssh_dir = root.makedirs(USER_SSH_DIR, 0o700)
    os.chown(ssh_dir, *owner)
    os.chmod(ssh_dir, 0o700)
    root.write(sshconfig.USER_KEY, key_set.user_private, mode=0o600, owner=owner)
    root.write(sshconfig.USER_CERT, key_set.user_certificate, mode=0o644, owner=owner)
    root.write(f"{sshconfig.USER_KEY}.pub", key_set.user_public, mode=0o644, owner=owner)
    _cover_image_clients(m, root)


def _cover_image_clients(m: Mounter, root: Root) -> None:
    """The image's ssh would speak other algorithms and ignore the job CA: cover it."""
    done: set[str] = set()
    for client in CLIENTS:
        ours = root.real(f"/opt/udiImage/bin/{client}")
        for directory in ("/usr/bin", "/bin", "/usr/local/bin"):
            path = f"{directory}/{client}"
            if not root.is_file(path):
                continue
            real = root.real(path)
            if real not in done:
                m.bind(ours, real, read_only=True, kind="ssh client")
                done.add(real)
