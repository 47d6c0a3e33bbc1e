"""The generated files of a virtual cluster: slurm.conf, plugstack.conf and hosts.

Kept apart from lab.vcluster so the settings a real site needs (the plugins that
work on this kernel, the prolog flags the container needs) can be read in one place.
Every path lives under the cluster's own directory: two clusters, or a cluster and
the host's own Slurm, never share a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# The controller and the host sit at fixed addresses of the cluster's /24; nodes
# start at NODE_BASE so node numbers read straight off the last octet.
HOST_OCTET = 1
CTL_OCTET = 2
NODE_BASE = 10
CTL_NAME = "ctl"


@dataclass(frozen=True)
class Layout:
    """Where one cluster keeps everything, and the addresses it uses."""

    root: str  # the cluster's directory, e.g. /run/shifter-sshd-lab/vc3
    subnet: str  # first three octets, e.g. "10.77.3"
    nodes: int
    prolog: str | None = None
    epilog: str | None = None
    plugstack: tuple[str, ...] = ()
    proctrack: str = "cgroup"  # or "linuxproc": the lab's variant without cgroups
    # Contain: the extern step every node keeps for the job's lifetime (the sshd is
    # adopted into it); DeferBatch: the batch script starts once every node's prolog
    # is done, so its first ssh never meets a node still building its container.
    prolog_flags: str = "Alloc,Contain,DeferBatch"
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    memory_mb: int = 8192  # RealMemory of each node: a limit, not a promise
    gpus: int = 0  # gres gpu per node (lab.fakegpu's device nodes)
    gpu_files: str = ""  # gres.conf File=, e.g. /var/tmp/x/dev/nvidia[0-3]
    slurm: str = "22.05"  # the version the daemons run (lab.slurmroots)

    @property
    def index(self) -> int:
        return int(self.subnet.rsplit(".", 1)[1])

    @property
    def first_job_id(self) -> int:
        """Side-by-side clusters share the host's cgroups (slurm_nodeN/uid_U/job_J):
        each numbers its jobs from its own range so none ever shares a job cgroup."""
        return self.index * 100_000 + 1

    @property
    def name(self) -> str:
        return os.path.basename(self.root)

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def addr(self, node: str) -> str:
        """The address of ``ctl``, ``host`` or ``nodeN``."""
        if node == CTL_NAME:
            return f"{self.subnet}.{CTL_OCTET}"
        if node == "host":
            return f"{self.subnet}.{HOST_OCTET}"
        return f"{self.subnet}.{NODE_BASE + int(node.removeprefix('node'))}"

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def conf(self) -> str:
        return self.path("slurm.conf")

    @property
    def munge_socket(self) -> str:
        return self.path("munge", "munge.socket")

    @property
    def out_dir(self) -> str:
        """World-writable (sticky) directory for job scripts and output files."""
        return self.path("out")


def slurm_conf(layout: Layout) -> str:
    """slurm.conf for the layout: root daemons, plugins that work on this kernel."""
    lines = [
        f"ClusterName={layout.name}",
        f"SlurmctldHost={CTL_NAME}({layout.addr(CTL_NAME)})",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={layout.munge_socket}",
        f"StateSaveLocation={layout.path(CTL_NAME, 'state')}",
        f"SlurmctldPidFile={layout.path(CTL_NAME, 'slurmctld.pid')}",
        f"SlurmctldLogFile={layout.path(CTL_NAME, 'slurmctld.log')}",
        # %n: each slurmd gets its own spool, pid and log file in the shared tree.
        f"SlurmdSpoolDir={layout.path('%n', 'spool')}",
        f"SlurmdPidFile={layout.path('%n', 'slurmd.pid')}",
        f"SlurmdLogFile={layout.path('%n', 'slurmd.log')}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"PlugStackConfig={layout.path('plugstack.conf')}",
        f"ProctrackType=proctrack/{layout.proctrack}",
        f"TaskPlugin={'task/cgroup' if layout.proctrack == 'cgroup' else 'task/none'}",
        f"PrologFlags={layout.prolog_flags}",
        "PrologEpilogTimeout=120",
        f"FirstJobId={layout.first_job_id}",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        # Without this the first batch job waits for the next scheduling pass.
        "SchedulerParameters=batch_sched_delay=0",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        "KillWait=2",
        "InactiveLimit=0",
        "MinJobAge=300",
        "MaxJobCount=50000",  # benchmarks.bench_query queues 10,000
        "SlurmdTimeout=120",
        "MailProg=/bin/true",
    ]
    if layout.gpus:
        lines.append("GresTypes=gpu")
    if layout.prolog:
        lines.append(f"Prolog={layout.prolog}")
    if layout.epilog:
        lines.append(f"Epilog={layout.epilog}")
    for node in layout.node_names:
        lines.append(
            f"NodeName={node} NodeAddr={layout.addr(node)} NodeHostname={node} "
            f"CPUs={layout.cpus} RealMemory={layout.memory_mb} State=UNKNOWN"
            + (f" Gres=gpu:{layout.gpus}" if layout.gpus else "")
        )
    lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def cgroup_conf(layout: Layout) -> str:
    """cgroup.conf: this machine's cgroup v1 hierarchies, mounted already (not by Slurm)."""
    if layout.proctrack != "cgroup":
        return "# proctrack/linuxproc: no cgroups\n"
    automount = ["CgroupAutomount=no"] if layout.slurm == "22.05" else []  # defunct since 23.x
    return "\n".join([
        "CgroupPlugin=cgroup/v1",
        *automount,
        "ConstrainCores=yes",
        "ConstrainRAMSpace=yes",
        "ConstrainSwapSpace=no",
    ]) + "\n"  # fmt: skip


def gres_conf(layout: Layout) -> str:
    """gres.conf: every node's (fake) GPUs; the same device files on every node."""
    if not layout.gpus:
        return "# no generic resources\n"
    return f"Name=gpu File={layout.gpu_files}\n"


def plugstack_conf(layout: Layout) -> str:
    return "".join(line + "\n" for line in layout.plugstack)


def hosts(layout: Layout) -> str:
    """The /etc/hosts every node sees: the lab's names only, plus localhost."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{layout.addr('host')}\t{layout.name}-host")
    lines.append(f"{layout.addr(CTL_NAME)}\t{CTL_NAME}")
    lines.extend(f"{layout.addr(node)}\t{node}" for node in layout.node_names)
    return "\n".join(lines) + "\n"


def resolv_conf() -> str:
    """No DNS inside the cluster: a lookup of an unknown name fails at once.

    The host's name server is unreachable from the nodes' namespaces, and glibc
    would wait 10 s for it on every miss (``getent hosts`` asks for IPv6 first).
    """
    return "# virtual cluster: names come from /etc/hosts\nnameserver 127.0.0.1\n"
