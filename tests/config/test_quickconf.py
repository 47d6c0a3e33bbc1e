"""The epilog's lean start: quickconf agrees with config/udiroot.py, the state file's flat
reader agrees with json, and the epilog imports nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from test_config import _render_cle6, _render_example, _render_parser_test

from shifter_sshd.config import quick as quickconf
from shifter_sshd.config import udiroot as config
from shifter_sshd.errors import ShifterError
from shifter_sshd.lifecycle import epilog
from shifter_sshd.lifecycle.state import (
    FIELDS,
    JobState,
    StateStore,
    _read_flat,
    from_dict,
    new_state,
)

VENV = os.environ.get("SHIFTER_SSHD_VENV", "/opt/shifter-sshd/venv")

TEXTS = [
    "",
    "udiMount=/var/u\nloopMount = /var/l/ \nstatePath=/run/s\nkillGrace=0.5\n",
    "  # udiMount=/no\nudiMount=/var//u2\n",
    "#killGrace=9\nkillGrace = 30\nsiteEnv=URL=http://x/#frag\n",
    "udiMount=/a\\\n/b\n",  # continuation: config/udiroot.py's business
    "udiMount=/a\nudiMount=/b\n",  # twice: refused
    "udiMount=relative\n",
    "killGrace=forever\n",
    "killGrace=7200\n",
    "loopMount=\n",
    "unknownKey=1\nudiMount=/var/u3\n",  # config/udiroot.py refuses it; teardown does not care
]


def _full(text: str, tmp_path: Path) -> tuple[str, str, str, float] | None:
    path = tmp_path / "udiRoot.conf"
    path.write_text(text)
    try:
        full = config.load(str(path))
    except ShifterError:
        return None
    return full.udi_mount, full.loop_mount, full.state_path, full.kill_grace


@pytest.mark.parametrize("text", TEXTS)
def test_quick_places_agree_with_the_config_parser(text: str, tmp_path: Path) -> None:
    quick = quickconf.places(text)
    full = _full(text, tmp_path)
    if quick is None:
        return  # the epilog then goes to config.load: same answer by construction
    if full is None:
        assert "unknownKey" in text  # the one deliberate difference (lifecycle/epilog.py says why)
        return
    assert (quick.udi_mount, quick.loop_mount, quick.state_path, quick.kill_grace) == full


def test_quick_places_fall_back_where_they_must() -> None:
    unusual = [t for t in TEXTS if quickconf.places(t) is None]
    assert unusual == [TEXTS[4], TEXTS[5], TEXTS[6], TEXTS[7], TEXTS[8], TEXTS[9]]


@pytest.mark.parametrize("render", [_render_example, _render_cle6, _render_parser_test],
                         ids=["example", "cle6", "parser-test"])  # fmt: skip
def test_quick_places_on_shifters_own_files(render: Callable[[], str], tmp_path: Path) -> None:
    text = render()
    full = _full(text, tmp_path)
    quick = quickconf.places(text)
    assert full is not None
    if quick is not None:
        assert (quick.udi_mount, quick.loop_mount, quick.state_path, quick.kill_grace) == full
    else:
        assert "\\" in text


def test_quick_defaults_are_the_config_defaults() -> None:
    defaults = config.Config()
    expected = {"udiMount": defaults.udi_mount, "loopMount": defaults.loop_mount,
                "statePath": defaults.state_path}  # fmt: skip
    assert expected == quickconf.PATH_DEFAULTS
    assert defaults.kill_grace == quickconf.KILL_GRACE_DEFAULT
    assert quickconf.DEFAULT_PATH == config.DEFAULT_PATH


def test_epilog_settings_fall_back_to_config_py(tmp_path: Path) -> None:
    path = tmp_path / "udiRoot.conf"
    path.write_text("udiMount=/var/a\\\n/b\nkillGrace=2\n")
    found = epilog._settings(str(path))
    assert (found.udi_mount, found.kill_grace) == ("/var/a /b", 2.0)
    path.write_text("udiMount=relative\n")
    with pytest.raises(ShifterError, match="udiMount must be an absolute path"):
        epilog._settings(str(path))


# --- the state file ---------------------------------------------------------------------


def test_state_file_is_one_field_per_line_and_reads_back(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    state = new_state("42", "/var/udiMount/42", "/var/udiLoopMount/42")
    state.user, state.uid, state.sshd_pid, state.complete = "alice", 1001, 77, True
    store.save(state)
    text = Path(store.path("42")).read_text()
    assert text.count("\n") == len(FIELDS) + 1 and json.loads(text) == state.as_dict()
    assert _read_flat(text) == json.loads(text)
    loaded = store.load("42")
    assert loaded is not None and loaded.as_dict() == state.as_dict()


@pytest.mark.parametrize("text", [
    '{"job_id":"1","root":"/r","scratch":"/s","uid":5}',  # an older version's one line
    '{\n"job_id":"1",\n"root":"/r\\u00e9",\n"scratch":"/s"\n}',  # an escape
    '{\n"job_id":"1",\n"root":"/r",\n"scratch":"/s",\n"created":1.5e9\n}',  # an exponent
    '{\n"job_id":"1",\n"root":"/r",\n"scratch":"/s",\n"extra":[1,2]\n}',  # nested, unknown
])  # fmt: skip
def test_state_files_in_other_layouts_go_to_json(text: str, tmp_path: Path) -> None:
    assert _read_flat(text) is None
    (tmp_path / "1.json").write_text(text)
    loaded = StateStore(str(tmp_path)).load("1")
    assert loaded is not None
    assert loaded.as_dict() == from_dict(json.loads(text), "x").as_dict()


def test_state_fields_of_the_wrong_type_take_their_defaults() -> None:
    state = from_dict({"job_id": "1", "root": "/r", "scratch": "/s", "uid": "x",
                       "sshd_pid": True, "created": 3}, "x")  # fmt: skip
    assert (state.uid, state.sshd_pid, state.created) == (JobState.uid, 0, 3)
    with pytest.raises(ShifterError, match="without a valid root"):
        from_dict({"job_id": "1", "root": 5, "scratch": "/s"}, "x")


# --- what the epilog imports ---------------------------------------------------------------


def test_epilog_imports_nothing_heavy() -> None:
    """dataclasses, re, json, signal, typing, enum: each costs the epilog 1-8 ms."""
    code = ("import sys, shifter_sshd.commands.entry, shifter_sshd.lifecycle.epilog\n"
            "import shifter_sshd.lifecycle.teardown\n"
            "print(' '.join(sorted(sys.modules)))")  # fmt: skip
    python = os.path.join(VENV, "bin", "python")
    done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True,
                          check=True, cwd="/")  # fmt: skip
    loaded = set(done.stdout.split())
    assert "shifter_sshd.lifecycle.teardown" in loaded
    heavy = {"dataclasses", "re", "json", "signal", "typing", "enum", "inspect", "glob",
             "shifter_sshd.config.udiroot", "shifter_sshd.container.rootfs",
             "shifter_sshd.ssh.sshd"}  # fmt: skip
    assert loaded & heavy == set()


def test_a_job_without_a_container_ends_without_teardowns_modules(tmp_path: Path) -> None:
    """Most jobs never asked for an image: their epilog looks for the job's files and
    directories and is done, without ctypes and the mount code."""
    config = tmp_path / "udiRoot.conf"
    config.write_text(f"udiMount={tmp_path}/u\nloopMount={tmp_path}/l\nstatePath={tmp_path}/s\n")
    code = ("import sys\nfrom shifter_sshd.lifecycle import epilog\n"
            f"rc = epilog.main({str(config)!r}, {{'SLURM_JOB_ID': '5'}})\n"
            "print(rc, 'shifter_sshd.lifecycle.teardown' in sys.modules, 'ctypes' in sys.modules)"
            )  # fmt: skip
    python = os.path.join(VENV, "bin", "python")
    done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True,
                          cwd="/")  # fmt: skip
    assert done.stdout.split() == ["0", "False", "False"], done.stderr
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "5.error").write_text("a user's mistake\n")  # the prolog left this
    done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True,
                          cwd="/")  # fmt: skip
    assert done.stdout.split()[:2] == ["0", "True"] and not (tmp_path / "s" / "5.error").exists()
