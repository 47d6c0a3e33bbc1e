"""mpirun launch-to-finish across 3 nodes: inside the containers against the host.

Run as root: ``python -m benchmarks.bench_mpirun [rounds]``. On the virtual
cluster one exclusive job runs, in turn, ``mpirun -np 6`` of a trivial MPI program
inside the containers (through the container sshds) and the same on the nodes
themselves, through host sshds started for the benchmark as the user with the same
keys and algorithms (the host's Open MPI 4.1 is the image's). Prints the medians
and the ratio container/host. The host run gets ``routed=direct``: without it the
host's ORTE, seeing the nodes' shared kernel, fails to route to its daemons.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys

from lab.site import OPENMPI, make_site

SCRIPT = r"""#!/bin/bash
set -e
R=/var/udiMount/$SLURM_JOB_ID
E=$R/opt/udiImage/etc
H=$PWD/host-$SLURM_JOB_ID
mkdir -p $H
# Host sshds on port 2222: the job's own host keys and CA, the same algorithms.
cat > $H/make-sshd-config <<EOF
sed -e "s|^Port .*|Port 2222|" -e "s|/opt/udiImage/etc|\$1|g" \
    -e "s|^ModuliFile .*|ModuliFile /etc/ssh/moduli|" -e "/^SetEnv/d" -e "/^Subsystem/d" \
    \$1/sshd_config > \$2
EOF
srun -N3 --ntasks-per-node=1 bash -c "
  sh $H/make-sshd-config /var/udiMount/\$SLURM_JOB_ID/opt/udiImage/etc $H/sshd_config.\$(hostname)
  exec /usr/sbin/sshd -D -f $H/sshd_config.\$(hostname) -E $H/sshd.\$(hostname).log" &
SSHDS=$!
sed -e "s|Port 1204|Port 2222|" -e "s|/var/shifter/ssh|$R/var/shifter/ssh|g" \
    -e "s|/opt/udiImage/etc/ssh_known_hosts|$H/known_hosts|g" \
    -e "/^Include/d" -e "/^Match all/d" $E/ssh_config > $H/ssh_config
sed -e "s|]:1204|]:2222|g" $E/ssh_known_hosts > $H/known_hosts
mpicc.openmpi -O2 -o $H/mpi_hello /work-mpi/mpi_hello.c
sleep 1
# The host run sees no Slurm (the container's mpirun does not use it either).
HOST_ENV="env -i PATH=/usr/bin:/bin HOME=$HOME OMPI_MCA_plm=rsh OMPI_MCA_routed=direct"
for round in $(seq ROUNDS); do
  t0=$(date +%s%N)
  shifter mpirun -np 6 /usr/local/bin/mpi_hello > /dev/null
  t1=$(date +%s%N)
  $HOST_ENV OMPI_MCA_plm_rsh_agent="ssh -F $H/ssh_config" \
    mpirun -np 6 --host node1:2,node2:2,node3:2 $H/mpi_hello > /dev/null
  t2=$(date +%s%N)
  echo "round $round container $(( (t1 - t0) / 1000 )) host $(( (t2 - t1) / 1000 ))"
done
kill $SSHDS
"""


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    site = make_site(with_mpich=False)
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lab", "mpi_hello.c")
    try:
        with site.cluster(nodes=3) as cluster:
            os.makedirs(f"{cluster.out_dir}/src", exist_ok=True)
            subprocess.run(["cp", source, f"{cluster.out_dir}/src/"], check=True)
            script = SCRIPT.replace("ROUNDS", str(rounds + 1)).replace(
                "/work-mpi", f"{cluster.out_dir}/src")  # fmt: skip
            args = ["-N3", "--exclusive", "--ntasks-per-node=2", f"--image={OPENMPI}"]
            job = cluster.sbatch("sstest1", script, args)
            state = cluster.wait(job, timeout=600)
            output = cluster.output(job)
            rows = re.findall(r"^round (\d+) container (\d+) host (\d+)$", output, re.M)
            if state != "COMPLETED" or not rows:
                raise SystemExit(f"job {state}:\n{output}")
            # round 1 warms up; the figures are microseconds
            pairs = [(int(c) / 1e6, int(h) / 1e6) for r, c, h in rows if r != "1"]
            inside = statistics.median(p[0] for p in pairs)
            host = statistics.median(p[1] for p in pairs)
            ratio = statistics.median(p[0] / p[1] for p in pairs)
            print(f"mpirun -np 6 over 3 nodes, {len(pairs)} pairs, medians: container "
                  f"{inside * 1000:.0f} ms, host {host * 1000:.0f} ms, "
                  f"ratio {ratio:.2f}")  # fmt: skip
    finally:
        site.close()


if __name__ == "__main__":
    main()
