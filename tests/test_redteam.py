"""The hostile job owner and the curious neighbour, against the real prolog and epilog.

The job owner runs ``redteam/racer.c`` (as themselves) while prologs run: it swaps a
directory and a symlink with renameat2(RENAME_EXCHANGE) millions of times a second,
kills their own sshd (stopping them: test_liveness.py). Each race scenario runs 50 prologs.
Canaries on host paths (directory trees with owners, modes and contents, and a host
mount) must come out unchanged; every prolog and epilog must exit 0 (a non-zero exit
drains the node) and return in bounded time. Each test looks at the mount table only
for its own paths.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import BUSYBOX
from support import CLI, Node, in_root, run

from lab import VENV, images
from lab.users import LabUser

RACES = 50
PYTHON = "/usr/bin/python3"  # the system's: the users cannot run root's pyenv
HERE = Path(__file__).resolve().parent


def as_user(user: LabUser, argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", *argv]


class Racer:
    """The user's racer while the block runs; ``won``: how many of its calls succeeded."""

    def __init__(self, user: LabUser, argv: list[str]) -> None:
        self.process = subprocess.Popen(
            as_user(user, argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.won = -1

    def __enter__(self) -> Racer:
        time.sleep(0.05)
        assert self.process.poll() is None, "the racer did not start"
        return self

    def __exit__(self, *_exc: object) -> None:
        self.process.terminate()
        out, _err = self.process.communicate(timeout=30)
        self.won = int(out or b"-1")


# --- canaries -------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under ``directory`` (itself included): type, mode, owner, content."""
    found = {}
    for path in [directory, *sorted(directory.rglob("*"))]:
        info = path.lstat()
        content = path.read_bytes().hex() if stat.S_ISREG(info.st_mode) else ""
        if stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        found[str(path)] = f"{stat.filemode(info.st_mode)} {info.st_uid}:{info.st_gid} {content}"
    return found


def mounts_under(*prefixes: Path | str) -> list[str]:
    """Mount points at or below our own paths (never the whole table)."""
    raw = [os.fsencode(str(p)).rstrip(b"/") for p in prefixes]
    found = []
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        target = line.split(b" ")[4]
        if any(target == p or target.startswith(p + b"/") for p in raw):
            found.append(os.fsdecode(target))
    return found


def host_canary(base: Path) -> Path:
    """A root-owned host directory with a file: what an attacker aims symlinks at."""
    canary = base / "host-canary"
    (canary / "home").mkdir(parents=True)
    (canary / "data").write_text("host data\n")
    os.chmod(canary, 0o755)
    return canary


def user_dir(path: Path, user: LabUser, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.uid, user.gid)
    os.chmod(path, mode)
    return path


def hostile_image(node: Node, work: Path, name: str, mutate: Callable[[Path], None]) -> str:
    tree = images.busybox_tree(work / f"tree-{name}")
    mutate(tree)
    squashfs = work / f"{name}.sqsh"
    subprocess.run(["mksquashfs", str(tree), str(squashfs), "-quiet", "-no-progress", "-noappend"],
                   check=True)  # fmt: skip
    image = f"docker:redteam-{name}:{os.getpid()}"
    done = run([CLI, "--config", node.config, "image", "import", str(squashfs), image], {})
    assert done.returncode == 0, done.stderr
    return image


def cycle(node: Node, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One prolog and epilog; both must exit 0, and nothing of the job may stay."""
    started = time.monotonic()
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    job = env["SLURM_JOB_ID"]
    assert node.epilog(job).returncode == 0
    assert node.leftovers() == []
    assert time.monotonic() - started < 30
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- races on paths -------------------------------------------------------------------


def test_nested_volume_swapped_with_a_symlink(
    node: Node, test_users: list[LabUser], user_tmp: Path, racer: str
) -> None:
    """The reviewer's first exploit: --volume=r1:/data;r2:/data/q, q swapped for a link."""
    user = test_users[0]
    canary = host_canary(user_tmp)
    r1 = user_dir(user_tmp / "r1", user)
    user_dir(r1 / "q", user)
    os.symlink(canary, r1 / "ql")
    r2 = user_dir(user_tmp / "r2", user)
    before = snapshot(canary)
    env = node.job_env("601", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=f"{r1}:/data;{r2}:/data/q")  # fmt: skip
    with Racer(user, [racer, "swap", str(r1 / "q"), str(r1 / "ql")]) as race:
        for _ in range(RACES):
            done = cycle(node, env)
            assert "destination lies inside another volume (/data): /data/q" in done.stderr
    assert race.won > 0
    assert snapshot(canary) == before
    assert mounts_under(user_tmp) == []


def test_volume_source_swapped_with_a_link_to_a_root_only_directory(
    node: Node, test_users: list[LabUser], user_tmp: Path, racer: str
) -> None:
    user = test_users[0]
    secret = user_tmp / "secret"
    secret.mkdir(mode=0o700)  # root's
    (secret / "root-only").write_text("not for users\n")
    play = user_dir(user_tmp / "play", user)
    mine = user_dir(play / "src", user)
    (mine / "mine").write_text("user data\n")
    os.symlink(secret, play / "other")
    env = node.job_env("602", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=f"{play}/src:/data:ro")  # fmt: skip
    mounted = refused = 0
    with Racer(user, [racer, "swap", str(play / "src"), str(play / "other")]) as race:
        for _ in range(RACES):
            done = node.prolog(env)
            assert done.returncode == 0, done.stderr
            data = Path(node.root("602"), "data")
            if data.is_dir():
                assert os.listdir(data) == ["mine"]
                mounted += 1
            else:
                assert "source not readable by sstest1" in done.stderr
                refused += 1
            assert node.epilog("602").returncode == 0
            assert node.leftovers() == []
    assert mounted + refused == RACES
    assert race.won > 0
    assert (secret / "root-only").read_text() == "not for users\n"
    assert mounts_under(user_tmp) == []


def _writable_var(tree: Path, canary: Path) -> None:
    """An image that hands the user /etc and /var (mode 0777), with bait in them."""
    for name in ("etc", "var"):
        os.chmod(tree / name, 0o777)
    os.symlink(str(canary / "data"), tree / "etc" / "passwd.alt")
    (tree / "var" / "shifter").mkdir(mode=0o777)
    os.symlink(str(canary), tree / "var" / "shifter.alt")


def test_destination_in_a_directory_the_user_can_write(
    node: Node, test_users: list[LabUser], user_tmp: Path, racer: str
) -> None:
    """A site filesystem the user can write (their home, a scratch area) with a volume
    aimed inside it, while the user swaps the path with a link to a host directory."""
    user = test_users[0]
    canary = host_canary(user_tmp)
    site = user_dir(user_tmp / "site", user)
    user_dir(site / "q", user)
    os.symlink(canary, site / "ql")
    node.write_config(siteFs=f"{site}:/site")
    source = user_dir(user_tmp / "src", user)
    env = node.job_env("603", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=f"{source}:/site/q/d")  # fmt: skip
    before = snapshot(canary)
    with Racer(user, [racer, "swap", str(site / "q"), str(site / "ql")]) as race:
        for _ in range(RACES):
            done = cycle(node, env)
            assert "destination lies in a directory the user can write: /site/q/d" in done.stderr
    assert race.won > 0
    assert snapshot(canary) == before
    assert mounts_under(user_tmp) == []


def test_image_modes_do_not_hand_the_user_etc_or_var(
    node: Node, test_users: list[LabUser], user_tmp: Path, racer: str, bundle: str,
    secret_file: str,
) -> None:  # fmt: skip
    """An image whose /etc and /var are 0777 still gives the user neither: the overlays'
    roots are root's. So the files the prolog writes there (passwd, hostsfile, the ssh
    directory) cannot be swapped for links, however hard the user tries meanwhile."""
    user = test_users[0]
    canary = host_canary(user_tmp)
    image = hostile_image(node, user_tmp, "var", lambda t: _writable_var(t, canary))
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret_file,
                      sshdPort=str(free_port()), system="redteam")  # fmt: skip
    root = Path(node.root("604"))
    env = node.job_env("604", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=image)
    before = snapshot(canary)
    swaps = [(root / "etc/passwd", root / "etc/passwd.alt"),
             (root / "var/shifter", root / "var/shifter.alt")]  # fmt: skip
    for first, second in swaps:
        with Racer(user, [racer, "swap", str(first), str(second)]) as race:
            for _ in range(RACES // 2):
                cycle(node, env)
        assert race.won == 0, f"the user swapped {first} and {second}"
    assert snapshot(canary) == before
    assert mounts_under(user_tmp) == []


def test_epilog_follows_no_path_of_the_users(
    node: Node, test_users: list[LabUser], user_tmp: Path
) -> None:
    """After the prolog the user renames and symlinks inside their volume; the host's
    mount the links aim at survives the epilog, and odd (non-UTF-8) names change nothing."""
    user = test_users[0]
    canary = host_canary(user_tmp)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "redteam-canary",
                    str(canary / "home")], check=True)  # fmt: skip
    try:
        v1 = user_dir(user_tmp / "v1", user)
        user_dir(v1 / "p", user)
        env = node.job_env("606", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                           SPANK_SHIFTER_VOLUME=f"{v1}:/data")  # fmt: skip
        assert node.prolog(env).returncode == 0
        script = (f"import os; os.rename({str(v1 / 'p')!r}, {str(v1)!r} + '/\\udcff\\n'); "
                  f"os.symlink({str(canary)!r}, {str(v1 / 'p')!r}); "
                  f"os.mkdir({str(v1)!r} + '/\\udcfe')")  # fmt: skip
        moved = subprocess.run(
            as_user(user, ["/usr/bin/python3", "-c", script]), capture_output=True
        )
        assert moved.returncode == 0, moved.stderr
        done = node.epilog("606")
        assert done.returncode == 0, done.stderr
        assert node.leftovers() == []
        assert mounts_under(canary) == [str(canary / "home")]
    finally:
        subprocess.run(["umount", str(canary / "home")], check=True)


# --- what a user can do to a node: never drain it, never hang it ------------------------


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        ("/proc/self/ns/mnt:/x:ro", "source is a kernel interface (nsfs), not data"),
        ("/proc/1:/x:ro", "source is a kernel interface (proc), not data"),
        ("/sys/kernel:/x:ro", "source is a kernel interface (sysfs), not data"),
        ("/tmp://etc", "destination may not cover /etc: /etc"),
        ("/tmp://var", "destination may not cover /var/hostsfile: /var"),
        ("/tmp://opt/udiImage", "destination may not cover /opt/udiImage: /opt/udiImage"),
        ("/tmp://proc", "destination may not cover /proc: /proc"),
        ("/tmp:/./usr//", "destination may not cover /usr: /usr"),
        ("/tmp:/data/\x1b[2J", "control character in destination"),
        ("/tmp:/data;/tmp:/data", "destination lies inside another volume (/data): /data"),
        (";".join(f"/tmp:/v{i}" for i in range(65)), "more than 64 volumes (maxVolumes): 65"),
    ],
)
def test_bad_volumes_are_the_users_error(
    node: Node, test_users: list[LabUser], volume: str, message: str
) -> None:
    user = test_users[0]
    env = node.job_env("611", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=volume)  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    assert message in done.stderr
    assert "\x1b" not in done.stderr  # escaped in the log
    assert node.epilog("611").returncode == 0
    assert node.leftovers() == []


def test_control_character_in_an_image_variable(
    node: Node, test_users: list[LabUser], user_tmp: Path
) -> None:
    """An image stored before import refused control characters: the job's error."""
    user = test_users[0]
    image = hostile_image(node, user_tmp, "env", lambda tree: None)
    record = run([CLI, "--config", node.config, "image", "lookup", image], {}).stdout.strip()
    meta_path = Path(node.image_path, "data", f"{record}.json")
    meta = json.loads(meta_path.read_text())
    meta["metadata"]["env"]["EVIL"] = "x\nPermitRootLogin yes"
    meta_path.write_text(json.dumps(meta))
    env = node.job_env("612", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=image)
    done = node.prolog(env)
    assert done.returncode == 0
    assert "image: control character in the value of EVIL: 'x\\nPermitRootLogin yes'" in (
        done.stderr
    )
    assert node.epilog("612").returncode == 0


def test_image_with_too_many_top_level_directories(
    node: Node, test_users: list[LabUser], user_tmp: Path
) -> None:
    def many(tree: Path) -> None:
        for index in range(300):
            (tree / f"d{index}").mkdir()

    user = test_users[0]
    image = hostile_image(node, user_tmp, "wide", many)
    done = cycle(node, node.job_env("617", user.name, user.uid, user.gid,
                                    SPANK_SHIFTER_IMAGE=image))  # fmt: skip
    assert "image: more than 256 top-level directories to bind (maxImageMounts): 303" in (
        done.stderr
    )


def test_user_killing_their_sshd_during_the_prolog(
    node: Node, test_users: list[LabUser], user_tmp: Path, racer: str, bundle: str,
    secret_file: str,
) -> None:  # fmt: skip
    user = test_users[0]
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret_file,
                      sshdPort=str(free_port()), system="redteam")  # fmt: skip
    env = node.job_env("614", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
    with Racer(user, [racer, "kill", "sshd"]) as race:
        for _ in range(10):
            done = cycle(node, env)
            assert "sshd: killed during start-up" in done.stderr or "container ready" in done.stderr
    assert race.won > 0


def test_port_held_by_another_user(
    node: Node, test_users: list[LabUser], bundle: str, secret_file: str
) -> None:
    user, other = test_users
    port = free_port()
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret_file,
                      sshdPort=str(port), system="redteam")  # fmt: skip
    script = (f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); "
              "s.listen(); print('up', flush=True); time.sleep(60)")  # fmt: skip
    squatter = subprocess.Popen(
        as_user(other, ["/usr/bin/python3", "-c", script]), stdout=subprocess.PIPE
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == b"up\n"
        env = node.job_env("615", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX)
        done = cycle(node, env)
        assert f"sshd: port {port} is held by another process: pid {squatter.pid}" in done.stderr
    finally:
        squatter.kill()
        squatter.wait()


def test_image_with_a_directory_where_the_sshd_log_goes(
    node: Node, test_users: list[LabUser], user_tmp: Path, bundle: str, secret_file: str
) -> None:
    user = test_users[0]
    log_dir = "var/shifter/ssh/sshd.log"
    image = hostile_image(node, user_tmp, "log", lambda t: (t / log_dir).mkdir(parents=True))
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret_file,
                      sshdPort=str(free_port()), system="redteam")  # fmt: skip
    env = node.job_env("616", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=image)
    done = cycle(node, env)
    assert "container ready" in done.stderr


# --- the neighbour: another user on the same node ------------------------------------


def test_another_user_can_neither_read_nor_enter(
    node: Node, test_users: list[LabUser], user_tmp: Path
) -> None:
    user, other = test_users
    private = user_dir(user_tmp / "private", user, 0o700)
    (private / "secret").write_text("the owner's\n")
    os.chown(private / "secret", user.uid, user.gid)
    env = node.job_env("621", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=f"{private}:/data")  # fmt: skip
    assert node.prolog(env).returncode == 0
    try:
        root = node.root("621")
        owner = in_root(root, user.uid, [user.gid], "cat /data/secret")
        assert owner.stdout == "the owner's\n", owner.stderr
        for path in (f"{root}/data/secret", f"{root}/etc/passwd",
                     f"{node.state_path}/621.container"):  # fmt: skip
            peek = subprocess.run(as_user(other, ["cat", path]), capture_output=True, text=True)
            assert peek.returncode != 0 and "Permission denied" in peek.stderr, path
        # A description of their own making, naming the owner's root, gets them nowhere.
        forged_state = user_dir(user_tmp / "forged", other)
        description = json.loads(Path(node.state_path, "621.container").read_text())
        description["uid"] = other.uid
        (forged_state / "621.container").write_text(json.dumps(description))
        (forged_state / "udiRoot.conf").write_text(f"statePath={forged_state}\n")
        shifter = os.path.join(VENV, "bin", "shifter")
        for force_ssh in ("0", "1"):
            entered = subprocess.run(
                as_user(other, ["env", f"SHIFTER_SSHD_CONFIG={forged_state}/udiRoot.conf",
                                "SLURM_JOB_ID=621", f"SHIFTER_SSHD_FORCE_SSH={force_ssh}",
                                shifter, "cat", "/data/secret"]),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert entered.returncode != 0
            assert "the owner's" not in entered.stdout
    finally:
        assert node.epilog("621").returncode == 0
    assert node.leftovers() == []
