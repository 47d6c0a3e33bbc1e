"""The job's ssh material inside the container: keys, certificates and configs.

Nothing goes to the user's home directory. The per-job etc (sshd_config, ssh_config,
known_hosts, host key and certificate, the user CA) is written to the job's scratch
area and bound read-only over /opt/udiImage/etc. The user's identity goes to
/var/shifter/ssh, on a small tmpfs of its own mounted at /var/shifter: whatever the
image has there is covered, so nothing of the image decides where keys or sshd's log
go. The directory is root's while the keys are written and the user's afterwards.
"""

from __future__ import annotations

import os
import socket
import stat
import time

from ..config.udiroot import Config
from ..container.rootfs import RO, Tree
from ..errors import node_error, user_error
from ..kernel import privileged as priv
from ..kernel import syscalls as sc
from ..kernel.fds import Fd
from ..kernel.rootpath import Root
from ..slurm.job import Job
from ..users import User
from . import config as sshconfig
from . import keys

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
    return keys.node_key_set(secret, cluster, int(job.job_id), job.restart_count, user.uid,
                             user.name, job.node_name, host_principals(job.node_name),
                             valid_after, valid_before)  # fmt: skip


def write_etc(
    tree: Tree, config: Config, user: User, key_set: keys.NodeKeySet,
    hosts: list[str], env: dict[str, str],
) -> int:  # fmt: skip
    """Render and write the per-job etc into scratch; returns its directory descriptor."""
    bundle = config.opt_udi_image
    sshd = sshconfig.SshdSettings(
        user=user.name,
        port=config.sshd_port,
        environment=env,
        allow_tcp_forwarding=config.sshd_allow_tcp_forwarding,
    )
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
    with Fd(priv.make_dir(tree.scratch, "udiImage-etc")) as etc_dir:
        for name, (data, mode) in files.items():
            # sshd runs as the user and must read its host key; nobody else may.
            owner = (user.uid, user.gid) if mode == 0o600 else (0, 0)
            priv.write_file(etc_dir.fd, name, data, mode, owner)
        return etc_dir.take()


def install(tree: Tree, etc_dir: int, user: User, key_set: keys.NodeKeySet) -> None:
    """Bind the per-job etc, write the user's identity, put our ssh over the image's."""
    mount = Fd(priv.clone(etc_dir, RO, recursive=False))
    with mount, Fd(priv.open_entry(tree.udi, "etc")) as target:
        priv.attach(mount.fd, target.fd)
    tree.ssh = _user_ssh_dir(tree)
    owner = (user.uid, user.gid)
    for path, data, mode in (
        (sshconfig.USER_KEY, key_set.user_private, 0o600),
        (sshconfig.USER_CERT, key_set.user_certificate, 0o644),
        (f"{sshconfig.USER_KEY}.pub", key_set.user_public, 0o644),
    ):
        priv.write_file(tree.ssh, os.path.basename(path), data, mode, owner)
    priv.set_owner(tree.ssh, user.uid, user.gid, 0o700)  # last: the files are in place
    _cover_image_clients(tree)


def _user_ssh_dir(tree: Tree) -> int:
    """/var/shifter: a fresh tmpfs over whatever the image has there; ``ssh`` made in it."""
    try:
        target = priv.make_dir(tree.var, "shifter")
    except OSError:  # a file or symlink of the image's: it goes (in the /var overlay only)
        try:
            priv.remove_entry(tree.var, "shifter")
            target = priv.make_dir(tree.var, "shifter")
        except OSError as err:
            raise user_error("image", f"cannot make /var/shifter ({err.strerror})",
                             USER_SSH_DIR) from None  # fmt: skip
    options = {"source": "shifter-sshd", "mode": "0755", "size": "16m"}
    attrs = priv.NOSUID_NODEV | sc.MOUNT_ATTR_NOEXEC
    with Fd(target), Fd(priv.new_mount("tmpfs", options, attrs)) as mount:
        priv.attach(mount.fd, target)
        tree.mounts += 1
        return priv.make_dir(mount.fd, "ssh", 0o700)


def _cover_image_clients(tree: Tree) -> None:
    """The image's ssh would speak other algorithms and ignore the job CA: cover it.

    Only files on the image's own (immutable) mounts are covered.
    """
    done: set[tuple[int, int]] = set()
    bundle_bin = priv.open_entry(tree.udi, "bin")
    try:
        with tree.container() as container:
            for client in CLIENTS:
                ours = priv.open_entry(bundle_bin, client)
                try:
                    for directory in ("/usr/bin", "/bin", "/usr/local/bin"):
                        _cover(tree, container, f"{directory}/{client}", ours, done)
                finally:
                    os.close(ours)
    finally:
        os.close(bundle_bin)


def _cover(tree: Tree, container: Root, path: str, ours: int, done: set[tuple[int, int]]) -> None:
    try:
        target = container.open(path)
    except OSError:
        return
    try:
        info = os.fstat(target)
        key = (info.st_dev, info.st_ino)
        if not stat.S_ISREG(info.st_mode) or key in done:
            return
        if sc.mount_id(target) not in tree.image_mounts:
            return
        done.add(key)
        mount = priv.clone(ours, RO, recursive=False)
        try:
            priv.attach(mount, target)
            tree.mounts += 1
        finally:
            os.close(mount)
    finally:
        os.close(target)
