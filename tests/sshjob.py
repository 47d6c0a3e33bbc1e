"""A job with the container sshd on this machine, for the tests of ssh, faults and load:
the prolog run by hand, the job's identity, the host's OpenSSH client."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass

from support import Node, in_root

from lab.users import GROUP_GID, LabUser
from shifter_sshd.ssh import keys

CLUSTER = "testcluster"


@dataclass
class Job:
    node: Node
    job_id: str
    user: LabUser
    node_name: str
    port: int
    secret: bytes

    @property
    def root(self) -> str:
        return self.node.root(self.job_id)

    def path(self, inside: str) -> str:
        return os.path.join(self.root, inside.lstrip("/"))

    def inside(self, script: str) -> subprocess.CompletedProcess[str]:
        """As the job user, inside the container (chroot, then the container's ssh)."""
        return in_root(self.root, self.user.uid, [self.user.gid, GROUP_GID],
                       f"export HOME=/tmp PATH=/opt/udiImage/bin:$PATH; {script}")  # fmt: skip

    def host_ssh(
        self, command: str, *, uid: int | None = None, login: str | None = None,
        identity: str | None = None, certificate: str | None = None,
        known_hosts: str | None = None, options: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """The host's OpenSSH client with the job identity (or the one given)."""
        identity = identity or self.path("/var/shifter/ssh/id_ed25519")
        known = known_hosts or self.path("/opt/udiImage/etc/ssh_known_hosts")
        argv = ["setpriv", f"--reuid={uid if uid is not None else self.user.uid}",
                f"--regid={uid if uid is not None else self.user.gid}", "--clear-groups",
                "/usr/bin/ssh", "-F", "/dev/null", "-i", identity,
                "-o", f"CertificateFile={certificate or identity + '-cert.pub'}",
                "-o", f"UserKnownHostsFile={known}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
                "-p", str(self.port), *options, f"{login or self.user.name}@{self.node_name}",
                command]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    def key_set(self, **changes: object) -> keys.NodeKeySet:
        """A key set from the same secret, with some inputs changed (other job, user...)."""
        now = int(time.time())
        args: dict[str, object] = {
            "secret": self.secret, "cluster": CLUSTER, "job_id": int(self.job_id),
            "restart_count": 0, "uid": self.user.uid, "user": self.user.name,
            "node_name": self.node_name,
            "host_principals": [self.node_name], "valid_after": now - 60,
            "valid_before": now + 3600,
        }  # fmt: skip
        args.update(changes)
        return keys.node_key_set(**args)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node_name() -> str:
    name = socket.gethostname()
    address = socket.gethostbyname(name)
    assert address.startswith("127."), f"this machine's name {name} must resolve to loopback"
    return name


def _start(node: Node, user: LabUser, image: str, job_id: str, bundle: str, secret: str) -> Job:
    port = _free_port()
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret,
                      sshdPort=str(port), system=CLUSTER)  # fmt: skip
    name = _node_name()
    env = node.job_env(job_id, user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=image,
                       SLURMD_NODENAME=name, SLURM_NODELIST=name)  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    return Job(node, job_id, user, name, port, keys.load_secret(secret))
