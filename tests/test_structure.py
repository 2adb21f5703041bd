"""The shape of the code, read from the source with `ast` (no project module is imported): no import cycles among
training/ and operators/, the shared leaves import none of the packages that share them, and every module stays
small enough to read in one sitting."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "operators")
MAX_LINES = 400
# Leaves that data, eval and rl all use: they must import none of them (shared/DESIGN.md, target layout).
LEAVES = {"training.tokenizer": ("training.data", "training.eval", "training.rl"),
          "training.benchmarks_data": ("training.data", "training.eval", "training.rl")}


def modules_under(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its __init__.py)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """Dotted names every import statement of the module asks for, at module level and inside functions alike:
    `import a.b` gives a.b; `from a.b import c` gives a.b.c (resolved by the caller to a.b when c is no module)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the module's package (a package's __init__ is its own package)
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]
    return names


def _resolve(name: str, known: set[str]) -> str | None:
    """The project module an imported name loads: the name itself when it is a module, else its longest prefix that
    is one (`from training.x import y`, y a function: training.x); None for anything outside the project."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path = REPO, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    files = modules_under(root, packages)
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {_resolve(name, known) for name in _imported_names(tree, module, path.name == "__init__.py")}
        graph[module] = targets - {None, module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, each as a path back to its start
    (["a", "b", "a"]), starting at the component's smallest module; found with Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:   # the graph is a few hundred modules: recursion depth is no concern
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) > 1 or start in graph.get(start, ()):
            cycles.append(_path_back(graph, start, component))
    return sorted(cycles)


def _path_back(graph: dict[str, set[str]], start: str, component: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside the component (breadth first, so it is the clearest to read)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt in component and nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a cycle but no path leads back to it")


# ------------------------------------------------------------------------------------- the checker checks itself --
def test_the_cycle_finder_names_each_cycle_and_passes_a_tree():
    graph = {"training.a": {"training.b"}, "training.b": {"training.c", "training.d"},
             "training.c": {"training.a"}, "training.d": set(), "training.e": {"training.e"},
             "training.f": {"training.g"}, "training.g": {"training.f"}}
    assert find_cycles(graph) == [["training.a", "training.b", "training.c", "training.a"],
                                  ["training.e", "training.e"], ["training.f", "training.g", "training.f"]]
    assert find_cycles({"training.a": {"training.b", "training.c"}, "training.b": {"training.c"},
                        "training.c": set()}) == []


def test_imports_resolve_to_modules_from_the_source_including_function_level_ones(tmp_path):
    files = {
        "training/__init__.py": "",
        "training/x/__init__.py": "from training.x import y\n",
        "training/x/y.py": "def f():\n    from training.x import z\n    return z\n",
        "training/x/z.py": "from training.x.y import f\nfrom . import helper\nimport training.x.w as w\n",
        "training/x/w.py": "import json\nfrom ..x.helper import CONSTANT\n",
        "training/x/helper.py": "from training import nothing_here\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, packages=("training",))
    assert graph == {"training": set(), "training.x": {"training.x.y"}, "training.x.y": {"training.x.z"},
                     "training.x.z": {"training.x.y", "training.x.helper", "training.x.w"},
                     "training.x.w": {"training.x.helper"}, "training.x.helper": {"training"}}
    assert find_cycles(graph) == [["training.x.y", "training.x.z", "training.x.y"]]


# ----------------------------------------------------------------------------------------------- the project --
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_training_and_operators_have_no_import_cycles(graph):
    assert len(graph) > 50   # the project's modules were really read
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_shared_leaves_import_none_of_their_users(graph):
    for leaf, users in LEAVES.items():
        reached, todo = set(), [leaf]
        while todo:   # everything the leaf loads, directly or through other modules
            for nxt in graph[todo.pop()] - reached:
                reached.add(nxt)
                todo.append(nxt)
        bad = sorted(m for m in reached if m.startswith(users))
        assert not bad, f"{leaf} imports {bad}"


def test_no_module_is_over_400_lines():
    long = {str(path.relative_to(REPO)): n for path in modules_under(REPO).values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in sorted(long.items()))
