"""What each Slurm version says, recorded from the real thing (tests/fixtures/slurm/<version>,
written by ``SHIFTER_SSHD_RECORD_SLURM_FIXTURES=1`` runs of tests/slurm/test_slurm.py on each
version's lab cluster): the one parser reads every version's words to the same facts
the live prolog found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import TESTS

from lab.slurmroots import VERSIONS
from shifter_sshd.slurm import query as slurm

FIXTURES = TESTS / "fixtures" / "slurm"
CASES = sorted(FIXTURES.glob("*/*.json"))


def test_every_version_was_recorded() -> None:
    recorded = {path.parent.name for path in CASES}
    assert recorded == set(VERSIONS), f"record the missing ones: {set(VERSIONS) - recorded}"


@pytest.mark.parametrize("case", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_each_versions_words_parse_to_what_the_prolog_found(case: Path) -> None:
    fixture = json.loads(case.read_text())
    env = fixture["env"]
    record = slurm.parse_squeue(fixture["squeue"], int(env["SLURM_JOB_ID"]))
    details = slurm.details_from_record(slurm._with_environment(record, env), env, "squeue")
    found = {"tasks_per_node": details.tasks_per_node, "end_time": details.end_time,
             "exclusive": details.exclusive}  # fmt: skip
    assert found == fixture["expected"], fixture["args"]
