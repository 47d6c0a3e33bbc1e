"""Slurm's compressed lists: node names (``node[1-3]``) and CPU counts (``2(x3),1``).

Node lists are expanded with ClusterShell's NodeSet (31 ms to import), but only when
the list is compressed; a plain list is split by hand.
"""

from __future__ import annotations

import re

from ..errors import node_error, user_error

_CPUS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


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


def expand_cpus_per_node(text: str, nodes: int) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1]; Slurm's compressed SLURM_JOB_CPUS_PER_NODE."""
    counts: list[int] = []
    for part in filter(None, text.split(",")):
        match = _CPUS.match(part.strip())
        if not match:
            raise user_error("job environment", "malformed SLURM_JOB_CPUS_PER_NODE", text)
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not counts:
        return [1] * nodes
    if len(counts) != nodes:
        raise node_error(
            "job environment",
            f"SLURM_JOB_CPUS_PER_NODE lists {len(counts)} nodes, not {nodes}",
            text,
        )
    return counts
