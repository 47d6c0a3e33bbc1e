"""A real multi-node Slurm 22.05 cluster on this one machine, for tests and the demo.

Each node is a lab.machine.Machine (PID, mount, UTS and network namespaces; veth on
the cluster's bridge) running the Debian slurmd with ``-N nodeN``; the controller is
one more machine; one munged with its own key serves them all through a socket in
the cluster's directory. Everything (slurm.conf, state, logs, job output) lives in
that directory, so a cluster never touches /etc/slurm, /etc/hosts or the host's
munge, and several clusters can run side by side (each takes a free index: its
directory, bridge and 10.77.<index>.0/24 subnet).

Usage::

    with Cluster(nodes=3, prolog="/path/prolog") as cluster:
        job = cluster.sbatch("sstest1", "#!/bin/sh\\nsrun hostname\\n", ["-N3"])
        assert cluster.wait(job) == "COMPLETED"
        print(cluster.output(job))
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

from . import VENV, slurmroots
from .labstate import LAB_ROOT, LabError, Teardown, allocate, cleanup_stale
from .machine import Machine, die_with_parent, make_bridge, plug, setup_script
from .slurmconf import (
    CTL_NAME,
    Layout,
    cgroup_conf,
    gres_conf,
    hosts,
    plugstack_conf,
    resolv_conf,
    slurm_conf,
)
from .users import ensure_users

__all__ = ["SHIFTER_PRIVATE_DIRS", "Cluster", "LabError", "cleanup_stale"]

# Node-local state of the real prolog; give these to private_dirs.
SHIFTER_PRIVATE_DIRS = ("/run/shifter-sshd", "/var/udiMount", "/var/udiLoopMount")
PATH = f"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{VENV}/bin"
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING")


class Cluster:
    """N slurmd nodes, a slurmctld and a munged; a context manager."""

    def __init__(
        self,
        nodes: int = 3,
        prolog: str | None = None,
        epilog: str | None = None,
        plugstack: Sequence[str] = (),
        private_dirs: Sequence[str] = (),
        proctrack: str = "cgroup",
        prolog_flags: str = "Alloc,Contain,DeferBatch",
        gpus: int = 0,
        gpu_files: str = "",
        slurm: str | None = None,
    ) -> None:
        self.gpus, self.gpu_files = gpus, gpu_files
        self.slurm = slurmroots.selected(slurm)  # the version; $SHIFTER_SSHD_LAB_SLURM
        self.slurm_root: str | None = None  # its Debian root; None: the host's Slurm
        self.proctrack = proctrack
        self.prolog_flags = prolog_flags
        self.node_count = nodes
        self.prolog = prolog
        self.epilog = epilog
        self.plugstack = tuple(plugstack)
        self.private_dirs = tuple(private_dirs)
        self._teardown: Teardown | None = None
        self._layout: Layout | None = None
        self.up_seconds = 0.0

    # --- life cycle -----------------------------------------------------------------

    def up(self) -> Cluster:
        """Start everything and wait until every node is idle; a few seconds."""
        start = time.monotonic()
        ensure_users()
        cleanup_stale()
        self.slurm_root = slurmroots.root(self.slurm)
        index, root = allocate()
        subnet = f"10.77.{index}"
        layout = Layout(root, subnet, self.node_count, self.prolog, self.epilog, self.plugstack,
                        self.proctrack, self.prolog_flags, gpus=self.gpus,
                        gpu_files=self.gpu_files, slurm=self.slurm)  # fmt: skip
        self._layout = layout
        self._teardown = Teardown(root, index, layout.node_names)
        # The finalizer holds only the Teardown, so a forgotten or failed cluster is
        # still taken down when it is collected or when the interpreter exits.
        weakref.finalize(self, self._teardown.run)
        try:
            self._write_files(layout)
            self._teardown.munged = self._start_munged(layout)
            self._start_machines(layout, index)
            self._wait_idle(timeout=30)
        except BaseException:
            self.down()
            raise
        self.up_seconds = time.monotonic() - start
        return self

    def down(self) -> None:
        """Kill everything and remove the bridge and the directory; idempotent."""
        if self._teardown is not None:
            self._teardown.run()

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise LabError("cluster is not up")
        return self._layout

    @property
    def index(self) -> int:
        """The cluster's slot: its directory vc<index>, bridge sslab<index>, subnet."""
        return int(self.layout.subnet.rsplit(".", 1)[1])

    @property
    def root(self) -> str:
        return self.layout.root

    @property
    def nodes(self) -> list[str]:
        return self.layout.node_names

    @property
    def conf(self) -> str:
        """Path of slurm.conf; export it as SLURM_CONF to use this cluster."""
        return self.layout.conf

    @property
    def out_dir(self) -> str:
        return self.layout.out_dir

    def _write_files(self, layout: Layout) -> None:
        for sub in ("munge", CTL_NAME, *(f"{node}/spool" for node in layout.node_names)):
            os.makedirs(layout.path(sub), mode=0o755, exist_ok=True)
        os.makedirs(layout.out_dir, exist_ok=True)
        os.chmod(layout.out_dir, 0o1777)  # job scripts and output, written as the users
        for name, text in (
            ("slurm.conf", slurm_conf(layout)),
            ("cgroup.conf", cgroup_conf(layout)),
            ("gres.conf", gres_conf(layout)),
            ("plugstack.conf", plugstack_conf(layout)),
            ("hosts", hosts(layout)),
            ("resolv.conf", resolv_conf()),
        ):
            with open(layout.path(name), "w") as f:
                f.write(text)
        key = layout.path("munge", "munge.key")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))

    def _start_munged(self, layout: Layout) -> subprocess.Popen[bytes]:
        munge = layout.path("munge")
        argv = [
            "munged", "-F", f"--socket={layout.munge_socket}",
            f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
            f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        _wait_for(lambda: os.path.exists(layout.munge_socket), 10, "munged socket")
        return proc

    def _start_machines(self, layout: Layout, index: int) -> None:
        assert self._teardown is not None
        names = [CTL_NAME, *layout.node_names]
        machines = {name: Machine.start(name, layout.root) for name in names}
        self._teardown.machines.extend(machines.values())
        make_bridge(index, layout.addr("host"))
        plug(index, list(machines.values()))
        for name, machine in machines.items():
            private = () if name == CTL_NAME else self.private_dirs
            etc = [
                (layout.path("hosts"), "/etc/hosts"),
                (layout.path("resolv.conf"), "/etc/resolv.conf"),
            ]
            script = setup_script(name, etc, layout.addr(name), layout.addr("host"), private)
            if self.slurm_root:
                binds = tuple(p for p in private if not p.startswith("/run/"))
                script += slurmroots.machine_script(self.slurm_root, binds)
            self._checked([*machine.enter(), "sh", "-c", script], f"set up {name}")
        self._teardown.daemons.append(
            self._daemon(machines[CTL_NAME], ["slurmctld", "-D", "-i"], CTL_NAME)
        )
        for node in layout.node_names:
            self._teardown.daemons.append(
                self._daemon(machines[node], ["slurmd", "-D", "-N", node], node)
            )

    def _daemon(self, machine: Machine, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.layout.path(name, "stderr.log"), "ab")  # noqa: SIM115
        with log:
            return subprocess.Popen(
                [*machine.enter(), *argv, "-f", self.conf],
                stdout=log,
                stderr=log,
                env=self._env(None),
                start_new_session=True,
            )

    def _checked(self, argv: list[str], what: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LabError(f"{what}: {done.stderr.strip() or done.returncode}")

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            try:
                states = self.sinfo_states()
            except LabError:
                return False
            return len(states) == self.node_count and all(s == "idle" for s in states.values())

        _wait_for(idle, timeout, "all nodes idle", self._logs_tail)

    def _logs_tail(self) -> str:
        tails = []
        for name in (CTL_NAME, *self.nodes):
            for log in ("stderr.log", "slurmd.log", "slurmctld.log"):
                path = self.layout.path(name, log)
                if os.path.exists(path):
                    with open(path, errors="replace") as f:
                        lines = f.read().splitlines()[-5:]
                    tails.append(f"--- {name}/{log}\n" + "\n".join(lines))
        return "\n".join(tails)

    # --- running commands -----------------------------------------------------------

    def _env(self, user: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        entry = pwd.getpwnam(user or "root")
        env = {
            "PATH": PATH,
            "HOME": entry.pw_dir,
            "USER": entry.pw_name,
            "LOGNAME": entry.pw_name,
            "LANG": "C.UTF-8",
            "SLURM_CONF": self.conf,
        }
        env.update(extra or {})
        return env

    def _as_user(self, user: str | None, argv: Sequence[str]) -> list[str]:
        if user is None:
            return list(argv)
        entry = pwd.getpwnam(user)
        return [
            "setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
            "--init-groups", "--", *argv,
        ]  # fmt: skip

    def run(
        self,
        node: str,
        argv: Sequence[str],
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside a node's namespaces (as root, or as ``user``)."""
        machine = self._machine(node)
        return self._run(
            machine.enter() + self._as_user(user, argv), user, env, timeout, check, input
        )

    def client(
        self,
        argv: Sequence[str],
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sbatch, scontrol...) on the login node: the host, or
        for another Slurm version the controller's machine, in that version's root."""
        if self.slurm_root is None:
            return self._run(self._as_user(user, argv), user, env, timeout, check, None)
        login = [*self._machine(CTL_NAME).enter(), "env", "-C", self.out_dir]
        return self._run([*login, *self._as_user(user, argv)], user, env, timeout, check, None)

    def _run(
        self,
        argv: list[str],
        user: str | None,
        env: Mapping[str, str] | None,
        timeout: float,
        check: bool,
        input: str | None,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=self._env(user, env),
            cwd=self.out_dir,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise LabError(
                f"{' '.join(argv[-6:])}: exit {done.returncode}: {done.stderr.strip()}",
                done.returncode,
                done.stderr,
            )
        return done

    def node_pid(self, node: str) -> int:
        """The pid of a node's namespace holder (its files: /proc/<pid>/root/...)."""
        return self._machine(node).pid

    def _machine(self, node: str) -> Machine:
        assert self._teardown is not None
        for machine in self._teardown.machines:
            if machine.name == node:
                return machine
        raise LabError(f"no such node: {node}")

    # --- Slurm helpers ---------------------------------------------------------------

    def submit(
        self, user: str, script: str, args: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run sbatch and return what it did, failed or not (for tests of rejections)."""
        path = os.path.join(self.out_dir, f"job-{uuid.uuid4().hex[:12]}.sh")
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o755)
        argv = [
            "sbatch",
            "--parsable",
            f"--chdir={self.out_dir}",
            f"--output={self.out_dir}/slurm-%j.out",
            *args,
            path,
        ]
        return self.client(argv, user=user, check=False)

    def sbatch(self, user: str, script: str, args: Sequence[str] = ()) -> int:
        """Submit a batch script as ``user``; return the job id; LabError if refused."""
        done = self.submit(user, script, args)
        if done.returncode != 0:
            raise LabError(f"sbatch refused: {done.stderr.strip()}", done.returncode, done.stderr)
        return int(done.stdout.strip().split(";")[0])

    def salloc(
        self, user: str, args: Sequence[str], command: Sequence[str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``salloc ARGS COMMAND`` as ``user`` on the host; COMMAND runs on the host."""
        return self.client(["salloc", *args, *command], user=user, timeout=timeout, check=False)

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, NodeList...)."""
        text = self.client(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        fields: dict[str, str] = {}
        for word in text.split():
            key, sep, value = word.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float = 60) -> str:
        """Wait until the job is over (epilogs done); its final state, or HELD."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if "held" in info.get("Reason", "").lower():
                return "HELD"
            if state not in ACTIVE:
                return state
            if time.monotonic() > deadline:
                raise LabError(f"job {job_id} still {state} after {timeout}s: {info}")
            time.sleep(0.05)

    def output(self, job_id: int) -> str:
        """The job's stdout file (sbatch here writes it to the out directory)."""
        with open(os.path.join(self.out_dir, f"slurm-{job_id}.out"), errors="replace") as f:
            return f.read()

    def sinfo_states(self) -> dict[str, str]:
        """node -> state as sinfo prints it (idle, allocated, drained, down*...)."""
        done = self.client(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
        return dict(line.split() for line in done.stdout.splitlines() if line.strip())

    def log(self, node: str) -> str:
        """A daemon's log: ``ctl`` gives slurmctld's, ``nodeN`` that node's slurmd's."""
        name = "slurmctld.log" if node == CTL_NAME else "slurmd.log"
        with open(self.layout.path(node, name), errors="replace") as f:
            return f.read()


def _wait_for(
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll ``ready()`` every 20 ms; LabError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail else ""
            raise LabError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(0.02)


if __name__ == "__main__":  # pragma: no cover - manual check: python -m lab.vcluster
    with Cluster() as c:
        print(f"up in {c.up_seconds:.2f}s at {c.root} ({LAB_ROOT}); states {c.sinfo_states()}")
