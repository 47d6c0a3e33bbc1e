"""shifter_sshd.slurm.query against a real Slurm 22.05 cluster, and node lists against Slurm's.

A stand-in Prolog runs ``slurm.query`` exactly as the real prolog would (as root, from
slurmd, with no PATH) and leaves the answer in a node-private directory; each test
then compares it with what Slurm itself tells the job (SLURM_TASKS_PER_NODE of the
batch step, the time limit, scontrol's OverSubscribe).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from support import TESTS

from lab import VENV
from lab.vcluster import Cluster
from shifter_sshd.errors import ShifterError
from shifter_sshd.slurm import query as slurm
from shifter_sshd.slurm.hostlist import expand_cpus_per_node, expand_nodelist

pytestmark = pytest.mark.cluster  # make test runs these on every Slurm version

USER = "sstest1"
PYTHON = os.path.join(VENV, "bin", "python")
PRIVATE = "/run/shifter-sshd-slurmtest"  # a tmpfs of its own on every node
RECORD = (
    "import dataclasses, json, os, subprocess, sys, time\n"
    "from shifter_sshd.slurm import query as slurm\n"
    "start = time.monotonic()\n"
    "try:\n"
    "    found = dataclasses.asdict(slurm.query(os.environ, 5.0))\n"
    "except Exception as err:\n"
    "    found = {'error': str(err)}\n"
    "found.update(now=int(time.time()), seconds=time.monotonic() - start,\n"
    "             cpus=os.environ.get('SLURM_JOB_CPUS_PER_NODE'), path=os.environ.get('PATH'))\n"
    # What this Slurm version said, for tests/fixtures/slurm (test_slurm_versions.py).
    "fields = ','.join(f + ':|' for f in slurm.FIELDS)\n"
    "raw = subprocess.run([slurm.SQUEUE, '-h', '-j', os.environ['SLURM_JOB_ID'], '-O', fields],\n"
    "                     capture_output=True, text=True, env={'SLURM_CONF': os.environ.get(\n"
    "                     'SLURM_CONF', ''), 'SLURM_TIME_FORMAT': '%s'}).stdout\n"
    "found['recorded'] = {'squeue': raw, 'env': {k: v for k, v in os.environ.items()\n"
    "                     if k.startswith(('SLURM_', 'SPANK_'))}}\n"
    "print(json.dumps(found))\n"
)
FIXTURES = TESTS / "fixtures" / "slurm"
RECORD_FIXTURES = "SHIFTER_SSHD_RECORD_SLURM_FIXTURES"  # =1: write what each version said
# slurmd gives the Prolog no PATH: absolute paths only, as in the real one.
PROLOG = f"""#!/bin/sh
{PYTHON} -c "$(/bin/cat {{record}})" > {PRIVATE}/details.$SLURM_JOB_ID 2>&1
exit 0
"""
SHOW_TASKS = "#!/bin/sh\necho $SLURM_TASKS_PER_NODE\n"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not os.access(PYTHON, os.X_OK):
        pytest.fail(f"{PYTHON} is missing: run make setup")
    directory = tempfile.mkdtemp(prefix="shifter-sshd-slurmtest-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    try:
        record = os.path.join(directory, "record.py")
        with open(record, "w") as f:
            f.write(RECORD)
        prolog = os.path.join(directory, "prolog.sh")
        with open(prolog, "w") as f:
            f.write(PROLOG.format(record=record))
        os.chmod(prolog, 0o755)
        with Cluster(nodes=3, prolog=prolog, private_dirs=[PRIVATE]) as up:
            up.client(["scontrol", "create", "PartitionName=whole", "Nodes=ALL",
                       "OverSubscribe=EXCLUSIVE", "MaxTime=INFINITE"])  # fmt: skip
            yield up
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_job(cluster: Cluster, args: list[str]) -> tuple[dict[str, object], list[int], int]:
    """Run a job; what the prolog's query found on each node must agree; return it,
    Slurm's own tasks per node for the batch step, and the job id."""
    job = cluster.sbatch(USER, SHOW_TASKS, args)
    assert cluster.wait(job) == "COMPLETED", cluster.output(job)
    nodes = expand_nodelist(cluster.job(job)["NodeList"])
    found = []
    for node in nodes:
        text = cluster.run(node, ["cat", f"{PRIVATE}/details.{job}"]).stdout
        found.append(json.loads(text))
    first = found[0]
    assert "error" not in first, first
    assert first["path"] is None  # really run the way slurmd runs a Prolog
    assert first["seconds"] < 2, first
    keys = ("tasks_per_node", "end_time", "exclusive", "source")
    assert all({k: f[k] for k in keys} == {k: first[k] for k in keys} for f in found), found
    slurm_tasks = expand_cpus_per_node(cluster.output(job).strip(), len(nodes))
    if os.environ.get(RECORD_FIXTURES) == "1":
        _record_fixture(cluster, args, first)
    return first, slurm_tasks, job


def _record_fixture(cluster: Cluster, args: list[str], found: dict[str, object]) -> None:
    """Keep this version's own words (squeue's line, the Prolog environment) and what the
    prolog made of them, for the offline test that parses every version's."""
    directory = FIXTURES / cluster.slurm
    directory.mkdir(parents=True, exist_ok=True)
    recorded = dict(found["recorded"])  # type: ignore[call-overload]
    env = {k: v for k, v in recorded["env"].items() if not k.endswith(("_CONF", "_COMMENT"))}
    expected = {k: found[k] for k in ("tasks_per_node", "end_time", "exclusive")}
    fixture = {"args": args, "squeue": recorded["squeue"], "env": env, "expected": expected}
    name = "_".join(a.strip("-").replace("=", "-") for a in args) or "default"
    (directory / f"{name}.json").write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")


def test_exclusive_job_with_tasks_per_node_and_time_limit(cluster: Cluster) -> None:
    found, slurm_tasks, job = run_job(
        cluster, ["-N3", "--exclusive", "--ntasks-per-node=2", "--time=7"]
    )
    assert found["tasks_per_node"] == [2, 2, 2] == slurm_tasks
    assert found["exclusive"] is True
    assert found["source"] == "squeue"
    assert isinstance(found["end_time"], int) and isinstance(found["now"], int)
    assert abs(found["end_time"] - (found["now"] + 7 * 60)) <= 5
    assert cluster.job(job)["OverSubscribe"] == "NO"


@pytest.mark.parametrize(
    ("args", "oversubscribe"),
    [
        (["-N3", "-n5"], "OK"),
        (["-N1", "--oversubscribe"], "YES"),
        (["-N1", "--exclusive=user"], "USER"),
    ],
)
def test_job_that_shares_its_nodes_is_not_exclusive(
    cluster: Cluster, args: list[str], oversubscribe: str
) -> None:
    found, slurm_tasks, job = run_job(cluster, args)
    assert found["exclusive"] is False
    shown = cluster.job(job)
    if cluster.slurm == "26.05":  # OverSubscribe now says only that; Exclusive is new
        exclusive = "USER" if oversubscribe == "USER" else "NO"
        over = "YES" if oversubscribe == "YES" else "NO"
        assert (shown["OverSubscribe"], shown["Exclusive"]) == (over, exclusive)
    else:
        assert shown["OverSubscribe"] == oversubscribe
    assert found["tasks_per_node"] == slurm_tasks
    assert found["end_time"] is None  # infinite limit: squeue says Unknown (certificates
    # then get sshCertMaxLifetime)


def test_exclusive_partition_makes_every_job_exclusive(cluster: Cluster) -> None:
    found, slurm_tasks, job = run_job(cluster, ["-N3", "-p", "whole"])
    assert found["exclusive"] is True
    assert cluster.job(job)["OverSubscribe"] == "NO"
    assert found["tasks_per_node"] == slurm_tasks  # no -n: one task per CPU


@pytest.mark.parametrize("args", [["-N3", "-n5"], ["-N3", "-n4", "--exclusive"], ["-N3"]])
def test_uneven_tasks_follow_slurm_node_order(cluster: Cluster, args: list[str]) -> None:
    found, slurm_tasks, _job = run_job(cluster, args)
    tasks = found["tasks_per_node"]
    assert tasks == slurm_tasks
    if "-n5" in args:
        assert isinstance(tasks, list) and sum(tasks) == 5
        assert tasks == sorted(tasks, reverse=True)  # block layout: first nodes first


def _query_on_node(cluster: Cluster, conf: str, timeout: float) -> tuple[str, float]:
    code = (
        "import json, os, time\nfrom shifter_sshd.slurm import query as slurm\n"
        "t = time.monotonic()\n"
        "try:\n"
        f"    slurm.query(os.environ, {timeout})\n"
        "    said = ''\n"
        "except Exception as err:\n"
        "    said = str(err)\n"
        "print(json.dumps([said, time.monotonic() - t]))\n"
    )
    env = {"SLURM_CONF": conf, "SLURM_JOB_ID": "1", "SLURM_NODELIST": "node[1-3]",
           "SLURM_JOB_CPUS_PER_NODE": "2(x3)"}  # fmt: skip
    done = cluster.run("node1", [PYTHON, "-c", code], env=env, timeout=30)
    said, seconds = json.loads(done.stdout)
    return said, seconds


def test_unreachable_controller_fails_within_the_timeout(cluster: Cluster) -> None:
    conf = os.path.join(cluster.root, "unreachable.conf")
    with open(cluster.conf) as f:
        text = f.read()
    # An address of the cluster's subnet where nothing answers: connects hang.
    subnet = cluster.layout.subnet
    moved = text.replace(f"SlurmctldHost=ctl({subnet}.2)", f"SlurmctldHost=ctl({subnet}.250)")
    assert moved != text
    with open(conf, "w") as f:
        f.write(moved)
    said, seconds = _query_on_node(cluster, conf, 2.0)
    assert 1.9 < seconds < 3.0
    assert said == "shifter-sshd: slurm: squeue gave no answer within 2 s: /usr/bin/squeue"


def test_slurms_own_error_is_quoted(cluster: Cluster) -> None:
    conf = os.path.join(cluster.root, "broken.conf")
    with open(conf, "w") as f:
        f.write("NoSuchKey=1\n")
    said, seconds = _query_on_node(cluster, conf, 5.0)
    assert seconds < 2
    assert said.startswith("shifter-sshd: slurm: squeue failed (exit 1): squeue: fatal: Unable")


def test_unknown_job_is_slurms_word(cluster: Cluster) -> None:
    said, _seconds = _query_on_node(cluster, cluster.conf, 5.0)
    assert said == ("shifter-sshd: slurm: squeue failed (exit 1): slurm_load_jobs error: "
                    "Invalid job id specified")  # fmt: skip


# --- parsing, without the cluster -------------------------------------------------------


def test_parse_squeue_takes_the_jobs_own_line() -> None:
    output = "17|4|0|1|NO|1700000000|2|\n7|6|2|1|OK|1700003600|3|\n"
    record = slurm.parse_squeue(output, 7)
    assert record == {"job_id": 7, "tasks": 6, "tasks_per_node": 2, "cpus_per_task": 1,
                      "end_time": 1700003600, "node_count": 3, "shared": "ok"}  # fmt: skip
    assert slurm.parse_squeue(output, 17)["shared"] == "none"
    assert "end_time" not in slurm.parse_squeue("9|1|0|1|OK|N/A|1|\n", 9)  # not started
    with pytest.raises(ShifterError, match="job not in squeue's answer: 8"):
        slurm.parse_squeue(output, 8)


@pytest.mark.parametrize(
    ("env", "exclusive", "end"),
    [
        ({}, True, 100),  # 22.05: the query's word
        ({"SLURM_JOB_END_TIME": "200", "SLURM_JOB_OVERSUBSCRIBE": "OK"}, False, 200),  # 23.02
        ({"SLURM_JOB_OVERSUBSCRIBE": "NO"}, True, 100),
        ({"SLURM_JOB_EXCLUSIVE": "NODE", "SLURM_JOB_OVERSUBSCRIBE": "NO"}, True, 100),  # 26.05
        ({"SLURM_JOB_EXCLUSIVE": "NO", "SLURM_JOB_OVERSUBSCRIBE": "NO"}, False, 100),
    ],
)
def test_the_prolog_environment_wins(env: dict[str, str], exclusive: bool, end: int) -> None:
    record = {"job_id": 5, "shared": "none", "end_time": 100, "tasks": 2, "node_count": 2}
    base = {"SLURM_JOB_ID": "5", "SLURM_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "2(x2)"}
    merged = slurm._with_environment(record, {**base, **env})
    details = slurm.details_from_record(merged, {**base, **env}, "squeue")
    assert (details.exclusive, details.end_time) == (exclusive, end)
    assert details.tasks_per_node == [2, 2]  # tasks == nodes: one per CPU, as Slurm does


def test_distribute_is_slurm_block_layout() -> None:
    assert slurm.distribute([2, 2, 1], 5) == [2, 2, 1]
    assert slurm.distribute([2, 2, 2], 4) == [2, 1, 1]
    assert slurm.distribute([64, 64], 2) == [64, 64]  # no -n: one task per CPU
    assert slurm.distribute([64, 64], 6, per_node=3) == [3, 3]
    assert slurm.distribute([4, 4], 4, per_task=2) == [2, 2]
    assert slurm.distribute([1, 1], 5) == [3, 2]  # more tasks than CPUs: round-robin


# --- node lists: ClusterShell's expansion against Slurm's own ---------------------------

AGREE = [
    "node[1-3]", "node[01-10]", "a[1-2],b3,c[5,7-8]", "rack[1-2]-node[1-2]",
    "n[1-2]-[3-4]", "x[9-11]", "nid[0009-0011]", "n[9,010]", "b1,a1", "n[1-2],n1",
    "nid[00001-00003],login1", "n1-[1-2]", "node1",
    # Slurm keeps a bracket's order where ClusterShell alone would sort (and put n10
    # before n001); Slurm writes a job's list in node-table order, so these can reach
    # a prolog when slurm.conf defines nodes out of order or with mixed padding.
    "n[3,1,2]", "n[001-002,10]", "n[3,1]-[5,4]",
]  # fmt: skip


def _slurm_hostnames(cluster: Cluster, node_list: str) -> list[str]:
    return cluster.client(["scontrol", "show", "hostnames", node_list]).stdout.split()


@pytest.mark.parametrize("node_list", AGREE)
def test_expand_nodelist_matches_scontrol(cluster: Cluster, node_list: str) -> None:
    assert expand_nodelist(node_list) == _slurm_hostnames(cluster, node_list)
