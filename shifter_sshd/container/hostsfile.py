"""/var/hostsfile and friends: the allocation, as MPI launchers want to read it.

The node list and the CPU counts come from Slurm's compressed forms (slurm/hostlist.py).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import user_error
from ..slurm.hostlist import expand_cpus_per_node, expand_nodelist


def slots(node_list: str, cpus_per_node: str, node_name: str) -> list[tuple[str, int]]:
    """(node, tasks) for every node of the job, in Slurm's order."""
    nodes = expand_nodelist(node_list) or [node_name]
    return list(zip(nodes, expand_cpus_per_node(cpus_per_node, len(nodes)), strict=True))


def render_hostsfile(allocation: list[tuple[str, int]]) -> str:
    """Shifter's format: one line per task."""
    return "".join(f"{node}\n" * count for node, count in allocation)


def _openmpi(allocation: list[tuple[str, int]]) -> str:
    return "".join(f"{node} slots={tasks}\n" for node, tasks in allocation)


def _mpich(allocation: list[tuple[str, int]]) -> str:
    return "".join(f"{node}:{tasks}\n" for node, tasks in allocation)


def _nodes(allocation: list[tuple[str, int]]) -> str:
    return "".join(f"{node}\n" for node, _tasks in allocation)


HOSTSFILE, OPENMPI, MPICH, NODESFILE = (
    "/var/hostsfile", "/var/hostsfile.openmpi", "/var/hostsfile.mpich", "/var/nodesfile",
)  # fmt: skip
FILES: dict[str, Callable[[list[tuple[str, int]]], str]] = {
    HOSTSFILE: render_hostsfile,
    OPENMPI: _openmpi,
    MPICH: _mpich,
    NODESFILE: _nodes,
}
# The container environment points the launchers at them: a bare mpirun uses them.
ENVIRONMENT = {
    "OMPI_MCA_orte_default_hostfile": OPENMPI,
    "HYDRA_HOST_FILE": MPICH,
    "SHIFTER_HOSTSFILE": HOSTSFILE,
}


def write(var_fd: int, allocation: list[tuple[str, int]]) -> None:
    """One line per task (Shifter), ``host slots=N`` (Open MPI), ``host:N`` (MPICH),
    and one line per node; written by descriptor into the container's /var."""
    from ..kernel import privileged

    for path, render in FILES.items():
        name = path.removeprefix("/var/")
        try:
            privileged.write_file(var_fd, name, render(allocation).encode())
        except OSError as err:
            raise user_error("image", f"cannot write ({err.strerror})", path) from None
