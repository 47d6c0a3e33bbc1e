"""Inside the job, as Slurm sees it: the lab cluster under proctrack/cgroup + task/cgroup.

The container sshd is adopted into each node's extern step, so ranks and sessions
started over ssh are the job's: in its cgroups and ``scontrol listpids``, limited by
``--mem``, stopped by ``scancel`` and by Slurm at job end even without our epilog.
Also: the first ssh of a batch script never meets a node whose prolog is slow
(DeferBatch), a dead job's container goes and a live one's stays (the node's stepd
sockets decide), ssh sessions carry the job's variables, and a site without
proctrack/cgroup gets a clear node error.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from test_cluster import leftovers, run_job, settled

from lab.site import BUSYBOX, FAULT_FILE, MPICH, OPENMPI, STATE, Site, make_site
from lab.vcluster import Cluster

pytestmark = pytest.mark.cluster  # make test runs these on every Slurm version

USER = "sstest1"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def output_so_far(cluster: Cluster, job: int) -> str:
    try:
        return cluster.output(job)
    except FileNotFoundError:  # the job has not started yet
        return ""


def user_processes(cluster: Cluster, node: str) -> list[str]:
    done = cluster.run(node, ["pgrep", "-a", "-u", USER], check=False)
    return done.stdout.splitlines()


def nothing_of_the_user(cluster: Cluster, node: str) -> Callable[[], bool]:
    return lambda: not user_processes(cluster, node)


def test_ranks_over_ssh_are_in_the_job_and_scancel_stops_them(cluster: Cluster) -> None:
    script = (
        "shifter mpirun -np 6 --map-by ppr:2:node sh -c 'echo \"rank $(hostname) $$ "
        '$(grep -E ":(memory|cpuset|freezer):" /proc/self/cgroup | tr "\\n" " ")"; '
        "sleep 300' &\nsleep 300\n"
    )
    job = cluster.sbatch(USER, "#!/bin/sh\n" + script, ["-N3", "--exclusive", f"--image={OPENMPI}"])
    ranks: list[tuple[str, str, str]] = []

    def six_ranks() -> bool:
        ranks[:] = re.findall(r"^rank (node\d) (\d+) (.*)$", output_so_far(cluster, job), re.M)
        return len(ranks) == 6

    wait_for(six_ranks, 60, "six ranks")
    for node, pid, cgroups in ranks:
        for controller in ("memory", "cpuset", "freezer"):
            assert f":{controller}:/slurm_{node}/uid_" in cgroups, cgroups
        if node == "node1":  # the batch step's own children: mpirun starts them locally
            assert f"/job_{job}/step_batch" in cgroups, cgroups
            continue
        assert f"/job_{job}/step_extern" in cgroups, cgroups  # through the adopted sshd
        listed = cluster.run(node, ["scontrol", "listpids", str(job)]).stdout
        assert re.search(rf"^{pid}\s+{job}\s+extern", listed, re.M), listed
    cluster.client(["scancel", str(job)])
    for node in ("node2", "node3"):
        wait_for(nothing_of_the_user(cluster, node), 30, f"no processes on {node}")
    assert settled(cluster) == {}


def test_memory_limit_applies_to_ssh_sessions(cluster: Cluster) -> None:
    # ulimit -v: without the cgroup's 100 MB, tail fails on its own (exit 1), not killed.
    script = (
        "shifter ssh node2 'ulimit -v 1000000; tail /dev/zero; echo \"hog exit $?\"'\n"
        "shifter ssh node2 echo NODE2-STILL-OK\n"
    )
    state, output = run_job(cluster, script, ["-N2", "--exclusive", "--mem=100M",
                                              f"--image={OPENMPI}"])  # fmt: skip
    assert state == "COMPLETED", output
    assert "hog exit 137" in output
    assert "NODE2-STILL-OK" in output


def test_sessions_carry_the_jobs_variables_and_mpich_runs_from_one(cluster: Cluster) -> None:
    script = (
        "shifter ssh node2 env | sort\nshifter ssh node2 mpirun -np 3 /usr/local/bin/mpi_hello\n"
    )
    job = cluster.sbatch(USER, "#!/bin/sh\n" + script, ["-N3", "--exclusive", f"--image={MPICH}"])
    assert cluster.wait(job, timeout=120) == "COMPLETED", cluster.output(job)
    output = cluster.output(job)
    env = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    assert env["SLURM_JOB_ID"] == env["SLURM_JOBID"] == str(job)
    assert env["SLURM_JOB_NODELIST"] == env["SLURM_NODELIST"] == "node[1-3]"
    assert env["SLURM_JOB_NUM_NODES"] == env["SLURM_NNODES"] == "3"
    assert env["SLURM_JOB_USER"] == USER
    assert env["SLURMD_NODENAME"] == "node2"
    assert env["PDSH_RCMD_TYPE"] == "ssh"
    for step_level in ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEPID"):
        assert step_level not in env
    assert len(re.findall(r"^rank \d of 3 on node\d: ", output, re.M)) == 3, output
    assert settled(cluster) == {}


@pytest.mark.parametrize("defer", [True, False], ids=["DeferBatch", "without"])
def test_first_ssh_to_a_slow_node(site: Site, defer: bool) -> None:
    """node2's prolog takes 4 s longer; the batch script's first ssh to it, one attempt
    only, succeeds with DeferBatch. Without it the same script meets no sshd (the
    race this setting closes)."""
    flags = "Alloc,Contain,DeferBatch" if defer else "Alloc,Contain"
    with site.cluster(nodes=2, prolog_flags=flags) as cluster:
        cluster.run("node2", ["sh", "-c", f"echo delay:image:4 > {FAULT_FILE}"])
        script = ("shifter ssh -o ConnectionAttempts=1 -o ConnectTimeout=2 node2 "
                  "echo FIRST-SSH-OK\n")  # fmt: skip
        job = cluster.sbatch(USER, "#!/bin/sh\n" + script,
                             ["-N2", "--exclusive", f"--image={BUSYBOX}"])  # fmt: skip
        state = cluster.wait(job, timeout=120)
        output = cluster.output(job)
        if defer:
            assert state == "COMPLETED", output
            assert "FIRST-SSH-OK" in output
        else:
            assert "FIRST-SSH-OK" not in output, output
        cluster.run("node2", ["rm", "-f", FAULT_FILE])


def test_slurm_stops_everything_even_without_our_epilog(site: Site) -> None:
    with site.cluster(nodes=2, epilog=False) as cluster:
        script = ("shifter ssh node2 'setsid nohup sleep 300 >/dev/null 2>&1 &'\n"
                  "echo LEFT-A-SLEEPER\n")  # fmt: skip
        job = cluster.sbatch(USER, "#!/bin/sh\n" + script,
                             ["-N2", "--exclusive", f"--image={BUSYBOX}"])  # fmt: skip
        assert cluster.wait(job, timeout=120) == "COMPLETED"
        assert "LEFT-A-SLEEPER" in cluster.output(job)
        wait_for(nothing_of_the_user(cluster, "node2"), 30, "Slurm's own cleanup")
        # Our epilog did not run: the mounts are still there, the sshd is not.
        assert str(job) in leftovers(cluster)["node2"]
        epilog = f"{site.directory}/epilog.sh"
        for node in cluster.nodes:
            cluster.run(node, [epilog], env={"SLURM_JOB_ID": str(job), "SLURM_CONF": ""})
        assert leftovers(cluster) == {}


def test_a_live_jobs_container_is_left_alone(cluster: Cluster) -> None:
    """Two jobs on one node; the second's prolog asks the node's stepds and leaves the
    first job's container (it still runs) in place."""
    small = ["-N1", "-w", "node1", "-n1", "--mem=100M", f"--image={BUSYBOX}"]
    first = cluster.sbatch(USER, "#!/bin/sh\nsleep 30\n", small)
    wait_for(lambda: cluster.job(first).get("JobState") == "RUNNING", 30, "the first job")
    root = f"/var/udiMount/{first}/etc/passwd"
    # RUNNING may come while the prolog still runs (23.02 and later show the job
    # RUNNING+CONFIGURING meanwhile): wait for its container.
    wait_for(lambda: cluster.run("node1", ["test", "-f", root], check=False).returncode == 0,
             30, "the first job's container")  # fmt: skip
    second = cluster.sbatch(USER, "#!/bin/sh\nshifter true && echo SECOND-OK\n", small)
    assert cluster.wait(second, timeout=60) == "COMPLETED", cluster.output(second)
    assert "SECOND-OK" in cluster.output(second)
    cluster.run("node1", ["test", "-f", root])  # still there
    assert cluster.job(first)["JobState"] == "RUNNING"
    cluster.client(["scancel", str(first)])
    assert settled(cluster) == {}


def test_a_leftover_holding_the_port_is_killed(cluster: Cluster, site: Site) -> None:
    """On a node the job has to itself, a user's process in no job on the sshd port is a
    leftover of an earlier job: the prolog kills it and starts the job's sshd."""
    squatter = ("import socket, time; s = socket.socket(); "
                "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                "s.bind(('0.0.0.0', 1204)); s.listen(); time.sleep(600)")  # fmt: skip
    cluster.run("node2", ["sh", "-c", f"setpriv --reuid=sstest2 --regid=sstest2 --clear-groups "
                                      f"python3 -c \"{squatter}\" >/dev/null 2>&1 &"])  # fmt: skip
    wait_for(lambda: "python3" in cluster.run("node2", ["pgrep", "-a", "-u", "sstest2"],
                                              check=False).stdout, 10, "the squatter")  # fmt: skip
    state, output = run_job(cluster, "shifter ssh node2 echo SSH-OK\n",
                            ["-N2", "--exclusive", f"--image={BUSYBOX}"])  # fmt: skip
    assert state == "COMPLETED", output
    assert "SSH-OK" in output
    assert cluster.run("node2", ["pgrep", "-u", "sstest2"], check=False).stdout == ""


def test_a_site_without_proctrack_cgroup_gets_a_clear_node_error() -> None:
    built = make_site(with_mpich=False)
    try:
        with built.cluster(nodes=1, proctrack="linuxproc") as cluster:
            job = cluster.sbatch(USER, "#!/bin/sh\ntrue\n", ["-N1", "--exclusive",
                                                             f"--image={BUSYBOX}"])  # fmt: skip
            assert cluster.wait(job, timeout=60) == "HELD"  # a failed prolog holds the job
            assert cluster.sinfo_states()["node1"].startswith("drain")
            said = cluster.run("node1", ["sh", "-c", f"cat {STATE}/*.error 2>/dev/null; true"])
            assert said.stdout == ""  # the node's fault: nothing blamed on the user
            log = cluster.log("node1")
            assert "ProctrackType=proctrack/linuxproc does not track adopted processes" in log
            # The site can choose a contained-less sshd instead, and the node serves again.
            with open(built.config, "a") as conf:
                conf.write("sshdJobContainment=0\n")
            cluster.client(["scontrol", "update", "nodename=node1", "state=resume"])
            cluster.client(["scancel", str(job)])
            again = cluster.sbatch(USER, "#!/bin/sh\nshifter ssh node1 echo UNCONTAINED-OK\n",
                                   ["-N1", "--exclusive", f"--image={BUSYBOX}"])  # fmt: skip
            assert cluster.wait(again, timeout=60) == "COMPLETED", cluster.output(again)
            assert "UNCONTAINED-OK" in cluster.output(again)
    finally:
        built.close()
