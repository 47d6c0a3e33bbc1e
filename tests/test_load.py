"""The container sshd under load: 64 ssh sessions at once, none refused."""

from __future__ import annotations

import subprocess

from conftest import BUSYBOX
from sshjob import _start
from support import Node

from lab.users import LabUser

SESSIONS = 64


def test_64_concurrent_sessions(
    node: Node, test_users: list[LabUser], bundle: str, secret_file: str
) -> None:
    job = _start(node, test_users[0], BUSYBOX, "601", bundle, secret_file)
    try:
        argv = job.host_ssh("true").args
        assert isinstance(argv, list)
        sessions = [
            subprocess.Popen(
                [*argv[:-1], f"sleep 2; echo session-{i}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(SESSIONS)
        ]
        results = [(s.wait(timeout=120), *s.communicate()) for s in sessions]
        failed = [(code, err) for code, _out, err in results if code != 0]
        assert failed == []
        outputs = {out.strip() for _code, out, _err in results}
        assert outputs == {f"session-{i}" for i in range(SESSIONS)}
    finally:
        assert node.epilog(job.job_id).returncode == 0
    assert node.leftovers() == []
