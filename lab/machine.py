"""One namespaced "machine" of the virtual cluster, and the bridge that joins them.

A machine is a tiny PID 1 (the holder) in fresh PID, mount, UTS, network and IPC
namespaces, with a /tmp and a /dev/shm of its own. Everything the machine runs
(slurmd, its prolog, the job's tasks) is entered into those namespaces with
nsenter, so killing the holder makes the kernel kill every process of the machine
at once, and with the last process the namespaces, their mounts (hosts file,
private tmpfs, container roots) and the machine's veth go too. No /run/netns file
and no mount is ever made on the host, so nothing can be left there. The holder is
also killed when the Python process that started it dies (parent-death signal), so
even a SIGKILLed test run leaves only the bridge and the cluster directory, which
lab.vcluster.cleanup_stale() removes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# Each machine's own files, at the same path in every machine (a tmpfs of its own):
# its boot id, among them.
NODE_DIR = "/run/shifter-sshd-lab/node"
BOOT_ID = f"{NODE_DIR}/boot_id"
# Interface names are limited to 15 characters: "sslab" + index + "n" + node number.
IFACE_PREFIX = "sslab"
HOLDER_MARK = "shifter-sshd-lab-holder"

# PID 1 of a machine: reaps the orphans it inherits (slurmd double-forks
# slurmstepd) and otherwise sleeps. SIGCHLD stays blocked and is taken with
# sigwait, so no exit is ever missed between a reap and the sleep.
_HOLDER = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
sys.stdout.write("ready\\n"); sys.stdout.flush(); os.close(1)
while True:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    if signal.sigwait({signal.SIGCHLD, signal.SIGTERM}) == signal.SIGTERM:
        os._exit(0)
"""

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def ip(*args: str, input_text: str | None = None) -> None:
    """Run ``ip``; raise with its stderr so a failed setup says which command failed."""
    argv = ["ip", *args]
    done = subprocess.run(argv, input=input_text, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class Machine:
    """A holder process and the namespaces it keeps alive."""

    name: str
    launcher: subprocess.Popen[str]  # the unshare process, our direct child
    pid: int  # the holder's PID as the host sees it

    @classmethod
    def start(cls, name: str, cluster_root: str) -> Machine:
        """Start a holder; the cluster root in its argv lets cleanup_stale find it."""
        argv = [
            "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc",
            "--mount", "--uts", "--net", "--ipc", "--propagation", "private",
            sys.executable, "-I", "-S", "-c", _HOLDER, HOLDER_MARK, cluster_root, name,
        ]  # fmt: skip
        launcher = subprocess.Popen(
            argv, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent
        )
        assert launcher.stdout is not None
        if launcher.stdout.readline() != "ready\n":
            launcher.kill()
            launcher.wait()
            raise RuntimeError(f"machine {name}: namespace holder did not start")
        launcher.stdout.close()
        children = _children(launcher.pid)
        if len(children) != 1:
            launcher.kill()
            raise RuntimeError(f"machine {name}: expected one holder, found {children}")
        return cls(name, launcher, children[0])

    def enter(self) -> list[str]:
        """argv prefix that runs a command inside all of this machine's namespaces."""
        return ["nsenter", "-t", str(self.pid), "-m", "-u", "-n", "-i", "-p", "--"]

    def kill(self) -> None:
        """Kill the holder: the kernel then kills everything else in the machine."""
        for pid in (self.pid, self.launcher.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.launcher.wait()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def veth_name(index: int, machine: str) -> str:
    """Host-side veth name: sslab<index>c for the controller, sslab<index>n<k>."""
    suffix = "c" if not machine.startswith("node") else "n" + machine.removeprefix("node")
    return f"{IFACE_PREFIX}{index}{suffix}"


def bridge_name(index: int) -> str:
    return f"{IFACE_PREFIX}{index}"


def make_bridge(index: int, host_addr: str) -> None:
    name = bridge_name(index)
    ip("link", "add", name, "type", "bridge")
    ip("addr", "add", f"{host_addr}/24", "dev", name)
    ip("link", "set", name, "up")


def plug(index: int, machines: Sequence[Machine]) -> None:
    """Give every machine an eth0 whose peer is a port of the cluster's bridge."""
    batch = []
    for machine in machines:
        host_end = veth_name(index, machine.name)
        batch.append(f"link add {host_end} type veth peer name eth0 netns {machine.pid}")
        batch.append(f"link set {host_end} master {bridge_name(index)} up")
    ip("-batch", "-", input_text="\n".join(batch) + "\n")


def setup_script(
    hostname: str,
    etc_files: Sequence[tuple[str, str]],
    addr: str,
    gateway: str,
    private_dirs: Sequence[str],
) -> str:
    """Shell run inside a new machine: its name, /etc files, private dirs, network.

    ``etc_files`` are (generated file, path) pairs bound over the machine's own view
    of /etc/hosts and /etc/resolv.conf; the host's files are never written.
    """
    lines = ["set -e", f"hostname {hostname}"]
    lines += [f"mount --bind {source} {target}" for source, target in etc_files]
    # What a real node has to itself: its /tmp (Slurm's PMIx plugin makes per-step
    # directories there), its /dev/shm (MPI's shared-memory segments), and its boot id:
    # UCX takes processes with the same boot id for processes of one machine and tries
    # shared memory between them. Containers get the id through the lab's siteFs.
    for path in ("/tmp", "/dev/shm"):
        lines.append(f"mount -t tmpfs -o mode=1777,size=1g lab-node {path}")
    lines += [
        f"mkdir -p {NODE_DIR}",
        f"mount -t tmpfs -o mode=0755,size=1m lab-node {NODE_DIR}",
        f"cat /proc/sys/kernel/random/uuid > {BOOT_ID}",
        f"mount --bind -o ro {BOOT_ID} /proc/sys/kernel/random/boot_id",
    ]
    for path in private_dirs:
        lines.append(f"mkdir -p {path}")
        lines.append(f"mount -t tmpfs -o mode=0755,size=64m lab-private {path}")
    lines += [
        "ip link set lo up",
        f"ip addr add {addr}/24 dev eth0",
        "ip link set eth0 up",
        f"ip route add default via {gateway}",
    ]
    return "\n".join(lines) + "\n"


def delete_link(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def lab_links() -> list[str]:
    """Names of every interface on the host that the lab made (bridges and veths)."""
    done = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    names = []
    for line in done.stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name.startswith(IFACE_PREFIX):
            names.append(name)
    return names
