"""The package's shape, kept: subpackages by concern, short modules, no import circle,
and the mount, loop and chown calls of the job path in the privileged core only.

README.md ("A tour of the package") says what lives where and why.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from support import REPO

PACKAGE = REPO / "shifter_sshd"
MAX_LINES = 420
MAX_TOP_MODULES = 12
# Raw syscalls that mount, unmount, attach loop devices or change owners: kernel/ only.
# (setns is not among them: shifter joins the job's namespace as the user.)
CORE_CALLS = {"fsopen", "fsmount", "fsconfig_string", "fsconfig_flag", "fsconfig_create",
              "move_mount", "open_tree", "umount_fd", "mount_setattr", "attach_loop",
              "fchownat_empty"}  # fmt: skip
# Root chowns outside the job path: admin commands writing root's own trees.
ADMIN_CHOWNS = {
    "ssh/keys.py": "the site secret, made by `shifter-sshd secret init` as root 0600",
    "ssh/bundle.py": "the bundle's self-check root, a temporary directory of root's",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours ``name`` imports, at its top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base += f".{node.module}" if node.module else ""
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _room(module: str) -> str:
    """The subpackage a module lives in; a top-level module is a room of its own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_few_modules_at_the_top_and_rooms_with_docstrings_only() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    rooms = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert len(rooms) >= 6, rooms
    for room in rooms:
        body = ast.parse((PACKAGE / room / "__init__.py").read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{room}/__init__.py"
        assert isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)


def test_no_module_is_too_long() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert long == {}


def test_no_import_circle_between_modules_or_rooms() -> None:
    graph = _graph()
    assert _cycles(graph) == []
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        rooms[_room(module)] |= {_room(t) for t in targets if _room(t) != _room(module)}
    assert _cycles(dict(rooms)) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_kernel_imports_nothing_above_it() -> None:
    for module, targets in _graph().items():
        if _room(module) == "kernel":
            above = {t for t in targets if _room(t) != "kernel" and t.count(".") > 1}
            assert above == set(), module


def test_mounts_loops_and_chowns_only_in_the_core() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = str(path.relative_to(PACKAGE))
        if relative.startswith("kernel/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                continue
            if node.value.id == "sc" and node.attr in CORE_CALLS:
                offenders.append(f"{relative}: sc.{node.attr}")
            chown = node.value.id == "os" and node.attr in ("chown", "fchown", "lchown")
            if chown and relative not in ADMIN_CHOWNS:
                offenders.append(f"{relative}: os.{node.attr}")
    assert offenders == []
