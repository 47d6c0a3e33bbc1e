"""Pure logic: node lists, tasks per node, volume specs."""

from __future__ import annotations

import pytest

from shifter_sshd.container import hostsfile, volumes
from shifter_sshd.errors import ShifterError
from shifter_sshd.slurm import hostlist


def test_cpus_per_node() -> None:
    assert hostlist.expand_cpus_per_node("2(x3),1", 4) == [2, 2, 2, 1]
    assert hostlist.expand_cpus_per_node("", 2) == [1, 1]
    with pytest.raises(ShifterError, match="lists 1 nodes, not 2"):
        hostlist.expand_cpus_per_node("4", 2)


def test_hostsfile_lines() -> None:
    allocation = hostsfile.slots("node[1-2],gpu7", "2(x2),1", "node1")
    assert allocation == [("node1", 2), ("node2", 2), ("gpu7", 1)]
    assert hostsfile.render_hostsfile(allocation) == "node1\nnode1\nnode2\nnode2\ngpu7\n"
    assert hostsfile.slots("", "", "solo") == [("solo", 1)]


def test_volume_specs() -> None:
    parsed = volumes.parse_volumes("/a:/data:ro; /b:/scratch")
    assert [(v.source, v.dest, v.read_only) for v in parsed] == [
        ("/a", "/data", True),
        ("/b", "/scratch", False),
    ]
    with pytest.raises(ShifterError) as caught:
        volumes.parse_volumes("/a:/etc/x")
    assert caught.value.kind == "user"
