"""/etc inside the container: the image's, plus the job user, root and the tty group.

The container resolves users from plain files only (``nsswitch.conf``: files), so
the bundled libc never loads the image's or the host's NSS modules. Entries we add
replace any image entry with the same name or id: the image cannot claim the job
user's uid for another name, nor move the tty group off gid 5.
"""

from __future__ import annotations

import os

from .. import log
from .. import users as users_mod
from ..config.udiroot import Config
from ..errors import node_error, user_error
from ..kernel import privileged as priv
from ..kernel.rootpath import Root
from ..users import User
from .rootfs import TTY_GID, Tree

NSSWITCH = """\
# written by shifter-sshd: the container resolves users from these files only
passwd: files
group: files
shadow: files
hosts: files dns
networks: files
protocols: files
services: files
ethers: files
rpc: files
netgroup: files
"""
FALLBACK_SHELL = "/bin/sh"


def login_shell(root: Root, user: User) -> str:
    """The user's shell if the image has it, else /bin/sh (sshd refuses a missing shell)."""
    for shell in (user.shell, FALLBACK_SHELL):
        if shell.startswith("/") and root.is_file(shell):
            return shell
    log.warning(f"etc: image has neither {user.shell} nor /bin/sh; ssh logins will fail")
    return FALLBACK_SHELL


def populate(tree: Tree, config: Config, user: User, shell: str) -> None:
    """Write /etc's files into the /etc overlay, by descriptor (``privileged``)."""
    if config.etc_path:
        _copy_site_files(tree, config.etc_path)
    with tree.container() as container:
        for name, text in files(config, user, shell, container).items():
            write(tree, name, text)


def files(config: Config, user: User, shell: str, image: Root) -> dict[str, str]:
    """/etc's files for the user in ``image``: the job's prolog and the unprivileged
    ``shifter --image`` write the same ones (the image's entries minus clashes, then
    the user's, their groups and usersToImport; the host's hosts and resolv.conf)."""
    passwd, groups = _entries(config, user, shell)
    found = {
        "passwd": _merge(image.read("/etc/passwd"), passwd, (0, 2)),
        "group": _merge(image.read("/etc/group"), groups, (0, 2)),
        "nsswitch.conf": NSSWITCH,
    }
    for name in ("hosts", "resolv.conf"):
        try:
            with open(f"/etc/{name}", encoding="utf-8") as handle:
                found[name] = handle.read()
        except FileNotFoundError:
            log.debug(f"etc: host has no /etc/{name}")
    return found


def write(tree: Tree, name: str, text: str | bytes, mode: int = 0o644) -> None:
    """One file in the container's /etc; what the image left there is the user's problem."""
    data = text.encode() if isinstance(text, str) else text
    try:
        priv.write_file(tree.etc, name, data, mode)
    except IsADirectoryError:
        raise user_error("image", "a directory stands where a file goes", f"/etc/{name}") from None
    except OSError as err:
        raise user_error("image", f"cannot write ({err.strerror})", f"/etc/{name}") from None


def _entries(config: Config, user: User, shell: str) -> tuple[list[str], list[str]]:
    passwd = ["root:x:0:0:root:/root:/bin/sh", user.passwd_line(shell)]
    groups = {0: "root:x:0:", TTY_GID: f"tty:x:{TTY_GID}:"}
    for group in user.groups:
        if group.gid not in (0, TTY_GID):
            groups[group.gid] = f"{group.name}:x:{group.gid}:{user.name}"
    for name in config.users_to_import:
        found = users_mod.lookup_name(name)
        if found is None:
            log.warning(f"etc: usersToImport: no such user on this node: {name}")
            continue
        line, group = found
        passwd.append(line)
        groups.setdefault(group.gid, f"{group.name}:x:{group.gid}:")
    return passwd, list(groups.values())


def _merge(image_text: str | None, ours: list[str], key_fields: tuple[int, int]) -> str:
    """The image's lines minus any clashing with ours by name or id, then ours."""
    names, ids = set(), set()
    for line in ours:
        fields = line.split(":")
        names.add(fields[key_fields[0]])
        ids.add(fields[key_fields[1]])
    kept = []
    for line in (image_text or "").splitlines():
        fields = line.split(":")
        if len(fields) < 3 or line.startswith(("+", "-")):
            continue  # comments, NIS compat lines: nothing the files backend can use
        if fields[key_fields[0]] in names or fields[key_fields[1]] in ids:
            continue
        kept.append(line)
    return "\n".join(kept + ours) + "\n"


def _copy_site_files(tree: Tree, etc_path: str) -> None:
    """Copy the site's etcPath files (regular files only, one level) into /etc."""
    try:
        entries = list(os.scandir(etc_path))
    except OSError as err:
        raise node_error("etcPath", f"cannot read ({err.strerror})", etc_path) from None
    for entry in entries:
        if not entry.is_file(follow_symlinks=True):
            log.debug(f"etc: etcPath: skipping non-file {entry.path}")
            continue
        with open(entry.path, "rb") as handle:
            write(tree, entry.name, handle.read(), mode=entry.stat().st_mode & 0o755)
