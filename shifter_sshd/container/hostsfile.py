"""/var/hostsfile and friends: the allocation, as MPI launchers want to read it.

Node lists are expanded with ClusterShell's NodeSet (31 ms to import), but only when
the list is compressed (``node[1-3]``); a plain list is split by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import user_error
from ..slurm.job import expand_cpus_per_node


def expand_nodelist(text: str) -> list[str]:
    """Slurm's order, which SLURM_JOB_CPUS_PER_NODE follows.

    ClusterShell's NodeSet sorts what it is given, Slurm does not (``n[3,1]`` is
    n3, n1), so every comma-separated part, outside brackets and inside them, is
    expanded on its own, in place, and only single ranges reach NodeSet.
    """
    if "[" not in text:
        return [n for n in text.split(",") if n]
    from ClusterShell.NodeSet import NodeSet, NodeSetParseError

    nodes: list[str] = []
    try:
        for term in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text):
            for single in _split_brackets(term):
                nodes += list(NodeSet(single))
    except NodeSetParseError as err:
        raise user_error("job environment", f"malformed node list ({err})", text) from None
    return nodes


def _split_brackets(term: str) -> list[str]:
    """``n[3,1-2]-[5,4]`` -> n[3]-[5], n[3]-[4], n[1-2]-[5], n[1-2]-[4] (Slurm's order)."""
    match = re.search(r"\[([^\]]*,[^\]]*)\]", term)
    if match is None:
        return [term]
    head, tail = term[: match.start()], term[match.end() :]
    return [
        single
        for part in match.group(1).split(",")
        for single in _split_brackets(f"{head}[{part}]{tail}")
    ]


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
