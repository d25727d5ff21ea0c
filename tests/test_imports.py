"""The import layers (#12): no import cycle among gpud's modules, and neither the client
library nor the TUI imports the daemon.

A cycle only works by the order modules happen to be imported in, and it is the sign of a
shared piece living in the module that imports its helpers back: move it to the bottom
(``gpud/http_common.py``, ``gpud/cli_common.py``, ``gpud/identity.py``). ``gpud_client``
must stay installable without the daemon (it is what users import), and the TUI talks to
the daemon only through it.

Every import counts: top-level, inside functions, and under ``if TYPE_CHECKING:`` (a
type-only import is still a dependency of one layer on another, and it becomes a real one
the day someone needs the name at run time).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the packages checked, and those each one must not import
PACKAGES = ("gpud", "gpud_client", "tui", "snapshots")
FORBIDDEN = {
    "gpud_client": ("gpud",),  # the client installs and imports without the daemon
    "tui": ("gpud",),  # the TUI is a client: it goes through gpud_client
    "snapshots": ("gpud",),  # a library the Podman executor uses, below it
}


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of these packages under ``root``: dotted name -> file."""
    found: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` one import statement inside ``module`` names."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            names.add(alias.name)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            # Relative: from the package the module is in (or is, for an __init__).
            base = module.split(".")
            if not is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        for alias in node.names:
            # `from pkg import sub` imports the submodule pkg.sub if there is one.
            sub = f"{target}.{alias.name}"
            names.add(sub if sub in known else target)
    out = set()
    for name in names:
        # `import a.b.c` where only a.b is ours-and-known: depend on the longest known one.
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """module -> the modules (of these packages) it imports, anywhere in its file."""
    mods = modules(root, packages)
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                deps |= _imported(node, name, is_package, known)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected group of modules, as a path that
    ends where it starts (["a", "b", "a"]); [] when the graph has none."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; gpud is far too small to recurse out
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_shortest_cycle(graph, g) for g in groups)


def _shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest cycle within ``group`` through its first module (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")  # not an SCC


def forbidden(
    graph: dict[str, set[str]], rules: dict[str, tuple[str, ...]]
) -> list[tuple[str, str]]:
    """(importer, imported) pairs that break a layer rule."""
    bad = []
    for mod, deps in sorted(graph.items()):
        top = mod.split(".")[0]
        for dep in sorted(deps):
            if dep.split(".")[0] in rules.get(top, ()):
                bad.append((mod, dep))
    return bad


def describe(found: list[list[str]]) -> str:
    return "\n".join("  " + " -> ".join(c) for c in found)


# -- the checks ----------------------------------------------------------------------


def test_no_import_cycles() -> None:
    found = cycles(import_graph(ROOT, PACKAGES))
    assert not found, (
        "import cycles (move the shared piece into a module below both):\n" + describe(found)
    )


def test_client_and_tui_do_not_import_the_daemon() -> None:
    bad = forbidden(import_graph(ROOT, PACKAGES), FORBIDDEN)
    assert not bad, "layer violations (gpud_client, tui and snapshots never import gpud):\n" + (
        "\n".join(f"  {a} imports {b}" for a, b in bad)
    )


def test_the_graph_sees_gpud() -> None:
    """The checks above pass vacuously if the walk finds nothing: make sure it sees the
    edges everyone knows are there (top-level, and a function-level one)."""
    graph = import_graph(ROOT, PACKAGES)
    assert "gpud.http_common" in graph["gpud.api"]
    assert "gpud_client.jobdir" in graph["gpud.executors.process"]
    assert "gpud.server" in graph["gpud.cli"]  # inside `gpud serve`, not at the top
    assert len(graph) > 60


# -- the checker itself, on a package made up for it -----------------------------------


def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_each_kind_of_cycle(tmp_path: Path) -> None:
    _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            # a top-level one: a <-> b
            "pkg/a.py": "from pkg.b import x\n",
            "pkg/b.py": "import pkg.a\nx = 1\n",
            # a function-level and relative one, through a subpackage: c -> sub.d -> c
            "pkg/c.py": "def f():\n    from .sub import d\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/d.py": "from .. import c\n",
            # a type-only one: e -> f -> e
            "pkg/e.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.f import F\n"
            ),
            "pkg/f.py": "from pkg import e\n",
            # no cycle: g -> h, and imports of things outside the package
            "pkg/g.py": "import os\nfrom pkg import h\n",
            "pkg/h.py": "import json\n",
        },
    )
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.g"] == {"pkg.h"}
    assert cycles(graph) == [
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.c", "pkg.sub.d", "pkg.c"],
        ["pkg.e", "pkg.f", "pkg.e"],
    ]
    assert "pkg.a -> pkg.b -> pkg.a" in describe(cycles(graph))


def test_checker_finds_a_long_cycle_and_no_false_one(tmp_path: Path) -> None:
    _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import pkg.b\n",
            "pkg/b.py": "import pkg.c\n",
            "pkg/c.py": "from pkg.a import thing\n",
            "pkg/d.py": "import pkg.a\n",  # into the cycle, not on it
        },
    )
    assert cycles(import_graph(tmp_path, ["pkg"])) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    (tmp_path / "pkg/c.py").write_text("thing = 1\n")
    assert cycles(import_graph(tmp_path, ["pkg"])) == []


def test_checker_finds_a_client_importing_the_daemon(tmp_path: Path) -> None:
    _package(
        tmp_path,
        {
            "srv/__init__.py": "",
            "srv/core.py": "import cli.models\n",  # the daemon may use the client
            "cli/__init__.py": "",
            "cli/models.py": "",
            "cli/api.py": "def f():\n    from srv import core\n",
        },
    )
    graph = import_graph(tmp_path, ["srv", "cli"])
    assert forbidden(graph, {"cli": ("srv",)}) == [("cli.api", "srv.core")]
