"""What ``doctor`` and its Slurm checks report: one line per finding, a problem or a
warning. Its own module so that the two checkers share it without importing each
other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    check: str
    detail: str
    problem: bool  # False: a warning, the node still works


Found = list[Finding]


def problem(found: Found, check: str, detail: str) -> None:
    found.append(Finding(check, detail, True))


def warning(found: Found, check: str, detail: str) -> None:
    found.append(Finding(check, detail, False))
