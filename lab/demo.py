"""``make demo``: a 3-node Slurm cluster, an Open MPI image, one job, then nothing left.

The job is what a user would submit: it enters the container with ``shifter``,
logs into the other nodes' containers with plain ``ssh``, and runs ``mpirun`` with
two ranks per node; every rank prints the os-release of the root it runs in.
"""

from __future__ import annotations

import sys
import time

from .site import OPENMPI, make_site

JOB = """#!/bin/sh
# The image is Debian 12 like this machine: the root filesystem tells them apart.
echo "== on the host, $(hostname): / is $(stat -f -c %T /), $(ls /var/hostsfile 2>&1)"
shifter /bin/bash -c '
echo "== in the container on $(hostname): / is $(stat -f -c %T /), uid $(id -u)"
echo "   $(grep PRETTY_NAME /etc/os-release)"
echo "== /var/hostsfile:"; cat /var/hostsfile | tr "\\n" " "; echo
echo "== ssh node2 / node3 from inside the container:"
ssh node2 "echo \\"  \\$(hostname): \\$(grep PRETTY_NAME /etc/os-release)\\""
ssh node3 "echo \\"  \\$(hostname): \\$(grep PRETTY_NAME /etc/os-release)\\""
echo "== mpirun -np 6 (2 ranks per node):"
mpirun -np 6 /usr/local/bin/mpi_hello | sort
'
"""


def say(text: str) -> None:
    print(f"\n### {text}", flush=True)


def main() -> int:
    started = time.monotonic()
    say("building the site: OpenSSH bundle, site secret, SPANK plugin, images")
    site = make_site(with_mpich=False)
    try:
        with site.cluster(nodes=3) as cluster:
            version = cluster.client(["sinfo", "--version"]).stdout.strip()
            say(f"3-node Slurm cluster up in {cluster.up_seconds:.1f} s: {cluster.nodes}, "
                f"{version} ($SHIFTER_SSHD_LAB_SLURM picks 22.05, 24.11 or 26.05)")  # fmt: skip
            args = ["-N3", "--exclusive", "--ntasks-per-node=2", f"--image={OPENMPI}"]
            say(f"as sstest1: sbatch {' '.join(args)} job.sh")
            print(JOB)
            job = cluster.sbatch("sstest1", JOB, args)
            state = cluster.wait(job, timeout=180)
            say(f"job {job}: {state}; its output:")
            print(cluster.output(job))
            say(f"nodes after the job: {cluster.sinfo_states()}")
            ok = state == "COMPLETED"
        say(f"cluster torn down; demo took {time.monotonic() - started:.1f} s")
    finally:
        site.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
