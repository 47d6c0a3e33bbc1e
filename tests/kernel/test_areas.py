"""udiMount and loopMount: root's, writable by root only, never through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shifter_sshd.errors import ShifterError
from shifter_sshd.kernel import areas


def test_a_missing_area_is_made_root_owned(tmp_path: Path) -> None:
    fd = areas.open_area(str(tmp_path / "udiMount"))
    try:
        info = os.fstat(fd)
        assert info.st_uid == 0 and info.st_mode & 0o777 == 0o755
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["group-writable", "the user's", "a symlink"])
def test_an_area_someone_else_could_change_is_refused(tmp_path: Path, how: str) -> None:
    area = tmp_path / "area"
    if how == "a symlink":
        (tmp_path / "real").mkdir()
        area.symlink_to(tmp_path / "real")
    else:
        area.mkdir()
        if how == "group-writable":
            area.chmod(0o775)
        else:
            os.chown(area, 2901, 2901)
    with pytest.raises(ShifterError) as refused:
        areas.open_area(str(area))
    assert refused.value.kind == "node" and str(area) in str(refused.value)


def test_job_dirs() -> None:
    class Places:
        udi_mount = "/var/udiMount"
        loop_mount = "/var/udiLoopMount"

    assert areas.job_dirs(Places(), "42") == ("/var/udiMount/42", "/var/udiLoopMount/42")
