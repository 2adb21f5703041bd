"""Repository-level code data as in DeepSeek-Coder (Guo et al. 2024, "DeepSeek-Coder: When the Large Language Model
Meets Programming", §2.2): import parsing, the dependency order of Algorithm 1, and the concatenation of one
repository into one training sample. The per-file rules of §2.1 (languages, quality, control-token text) are in
`training.data.curate.code_quality`.

Sample layout (exact; no separators between the pieces, EOD is appended later by the tokenizing step):

    <｜begin▁of▁repo▁name｜>{repo}<｜end▁of▁repo▁name｜>
    then per file, in dependency order:
    <｜begin▁of▁file▁name｜>{path}<｜end▁of▁file▁name｜><｜begin▁of▁file｜>{content}<｜end▁of▁file｜>

§2.2 marks each file with its path as a comment; DeepSeek-V3's tokenizer has repo/file special tokens, so we use
those instead. They are the only control tokens in a sample: a file whose path or content holds control-token text is
rejected (`code_quality.find_control_token_text`), so `split_repository_sample` recovers every name and content
unambiguously.
"""
from __future__ import annotations

import heapq
import posixpath
import re
from typing import Callable, Iterable, Mapping, Sequence

from training import tokenizer

# ---------------------------------------------------------------- dependency parsing
# Regex parsing, not real parsers: an import inside a string or comment counts, imports built at run time
# (importlib, dynamic require(variable)) and same-package references without imports (Java, Go, C#) do not.
_PY_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w.][\w. \t,]*)", re.M)
_PY_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]*(?:\(([^)]*)\)|([^\n#;]*))", re.M)
_C_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*[\"<]([^\">\n]+)[\">]", re.M)
_JS_IMPORT = re.compile(r"""(?:\b(?:import|export)\b[^'";]{0,2000}?\bfrom\s*|\bimport\s*"""
                        r"""|\b(?:require|import)\s*\(\s*)['"](\.{1,2}/[^'"\n]*)['"]""")
_JAVA_IMPORT = re.compile(r"^[ \t]*import[ \t]+(?:static[ \t]+)?([\w.]+?)(\.\*)?[ \t]*;", re.M)
_GO_IMPORT = re.compile(r"^import[ \t]*(?:\(([^)]*)\)|[\w.]*[ \t]*(\"[^\"\n]+\"))", re.M)
_GO_STRING = re.compile(r"\"([^\"\n]+)\"")
_GO_MODULE = re.compile(r"^module[ \t]+\"?([^\s\"]+)", re.M)
_JS_EXTENSIONS = (".ts", ".tsx", ".d.ts", ".js", ".jsx", ".mjs", ".cjs", ".mts", ".cts")


def _join(directory: str, relative: str) -> str | None:
    """`relative` resolved against a repo directory; None when it climbs out of the repository."""
    joined = posixpath.normpath(posixpath.join(directory, relative))
    return None if joined == ".." or joined.startswith("../") or joined.startswith("/") else joined


class DependencyResolver:
    """Maps each file's imports to the kept files of the same repository (only in-repo edges count). `other_paths`
    (files rejected by the filters) still count when an import is resolved, so `from . import data` whose `data.py`
    was rejected is not mistaken for an import from the package `__init__.py`; edges to them are then dropped."""

    def __init__(self, files: Mapping[str, str], repo_name: str = "", other_paths: Iterable[str] = ()):
        self.files = files
        self.paths = set(files).union(other_paths)
        self.repo_name = repo_name
        self.memo: dict[tuple[str, str | None], str | None] = {}
        self.by_suffix: dict[str, list[str]] = {}   # "b/C.java" → every path ending with it at a "/" boundary
        for path in sorted(self.paths):
            parts = path.split("/")
            for i in range(len(parts)):
                self.by_suffix.setdefault("/".join(parts[i:]), []).append(path)
        # Go: the directory of each go.mod and its module path, longest module first so nested modules win.
        self.go_modules = sorted(((m.group(1), posixpath.dirname(p)) for p, text in files.items()
                                  if p.rsplit("/", 1)[-1] == "go.mod" for m in [_GO_MODULE.search(text)] if m),
                                 key=lambda item: (-len(item[0]), item))
        self.parsers: dict[str, Callable[[str, str], set[str]]] = {
            "Python": self._python, "Cython": self._python, "C": self._c, "C++": self._c, "JavaScript": self._js,
            "TypeScript": self._js, "Java": self._java, "Go": self._go}

    def dependencies(self, path: str, language: str) -> set[str]:
        parse = self.parsers.get(language)
        return (parse(path, self.files[path]) & self.files.keys()) - {path} if parse else set()

    def _suffix(self, suffix: str) -> str | None:
        """The shortest (then alphabetically first) path ending with `suffix`: deterministic on any repo."""
        matches = self.by_suffix.get(suffix)
        return min(matches, key=lambda p: (p.count("/"), p)) if matches else None

    def _first(self, candidates) -> str | None:
        return next((c for c in candidates if c is not None and c in self.paths), None)

    # Python: `import a.b`, `from a.b import c` (c may be a submodule), `from ..a import b` (relative to the package).
    def _python_module(self, module: str, base: str | None) -> str | None:
        key = (module, base)
        if key not in self.memo:   # the same imports recur in most files of a package
            self.memo[key] = self._resolve_python_module(module, base)
        return self.memo[key]

    def _resolve_python_module(self, module: str, base: str | None) -> str | None:
        stem = module.replace(".", "/")
        names = [f"{stem}.py", f"{stem}.pyi", f"{stem}.pyx", f"{stem}/__init__.py"] if stem else ["__init__.py"]
        if base is not None:          # relative import: only the package directory counts
            return self._first(_join(base, n) for n in names)
        direct = self._first(names)   # repository root, e.g. a src-less project
        if direct is None and self.repo_name and stem.split("/")[0] == self.repo_name:
            direct = self._first(n.split("/", 1)[1] for n in names if "/" in n)   # the repository is the package
        return direct or next((s for s in map(self._suffix, names) if s), None)  # src/ layouts, nested projects

    def _python(self, path: str, text: str) -> set[str]:
        found = set()
        for match in _PY_IMPORT.finditer(text):
            for item in match.group(1).split(","):
                module = item.split()[0] if item.split() else ""
                found.add(self._python_module(module, None))
        for match in _PY_FROM.finditer(text):
            dots, module, names = match.group(1), match.group(2), match.group(3) or match.group(4) or ""
            base = None
            if dots:
                base = _join(posixpath.dirname(path), "/".join([".."] * (len(dots) - 1)) or ".")
                if base is None:
                    continue
            # `from pkg import mod` names a submodule: the dependency is pkg/mod.py. Only a name that is no submodule
            # (or `*`) depends on pkg/__init__.py itself, else every `from . import x` would cycle through __init__.
            needs_package = False
            for name in names.replace("\n", " ").split(","):
                words = name.split()
                submodule = None
                if words and words[0].isidentifier():
                    submodule = self._python_module(f"{module}.{words[0]}" if module else words[0], base)
                found.add(submodule)
                needs_package |= submodule is None and bool(words)
            if needs_package:
                found.add(self._python_module(module, base))
        return found - {None}

    def _c(self, path: str, text: str) -> set[str]:
        found = set()
        for match in _C_INCLUDE.finditer(text):
            header = match.group(1).strip()
            found.add(self._first([_join(posixpath.dirname(path), header), _join("", header),
                                   _join("include", header)]) or self._suffix(header))
        return found - {None}

    def _js(self, path: str, text: str) -> set[str]:
        found = set()
        for match in _JS_IMPORT.finditer(text):
            target = _join(posixpath.dirname(path), match.group(1))
            if target is None:
                continue
            stem = re.sub(r"\.(js|jsx|mjs|cjs)$", "", target)   # TS sources import './x.js' meaning './x.ts'
            found.add(self._first([target] + [stem + e for e in _JS_EXTENSIONS] +
                                  [f"{target}/index{e}" for e in _JS_EXTENSIONS]))
        return found - {None}

    def _java(self, path: str, text: str) -> set[str]:
        found = set()
        for match in _JAVA_IMPORT.finditer(text):
            parts = match.group(1).split(".")
            if match.group(2):   # `import a.b.*;`: every class of that package directory
                directory = "/".join(parts)
                found.update(p for p in self.paths if p.endswith(".java") and
                             f"/{posixpath.dirname(p)}/".endswith(f"/{directory}/"))
                continue
            for end in range(len(parts), 0, -1):   # a.b.C, or a.b.C.Inner / static a.b.C.member → a/b/C.java
                hit = self._suffix("/".join(parts[:end]) + ".java")
                if hit:
                    found.add(hit)
                    break
        return found

    def _go(self, path: str, text: str) -> set[str]:
        found = set()
        imports = []
        for match in _GO_IMPORT.finditer(text):
            imports += _GO_STRING.findall(match.group(1)) if match.group(1) is not None else [match.group(2)[1:-1]]
        for imported in imports:
            for module, module_dir in self.go_modules:
                if imported == module or imported.startswith(module + "/"):
                    directory = _join(module_dir, imported[len(module):].lstrip("/") or ".")
                    found.update(p for p in self.paths if directory is not None and posixpath.dirname(p) ==
                                 (directory if directory != "." else "") and p.endswith(".go")
                                 and not p.endswith("_test.go"))
                    break
        return found


# ---------------------------------------------------------------- ordering (§2.2, Algorithm 1)
def dependency_order(dependencies: Mapping[str, set[str]]) -> list[list[str]]:
    """Files ordered so that a dependency comes before the files that use it, one list per weakly connected subgraph
    (subgraphs in order of their smallest path). Edge B → A when A depends on B.

    DeepSeek-Coder §2.2, Algorithm 1, repeatedly takes the remaining file of *minimal* in-degree (not strictly zero,
    so cycles do not stop the sort) and lowers the in-degree of the files using it. Taken over the whole graph, that
    rule can put a file before its dependency when the dependency sits in a cycle (all remaining in-degrees ≥ 1, ties
    by name). We therefore apply it inside each strongly connected component (a cycle) and order the components
    topologically: identical to Algorithm 1 on acyclic graphs, and every edge outside a cycle is respected. Ties
    (and cycle breaks) go to the smallest path, so the order depends only on the graph, never on listing order."""
    files = sorted(dependencies)
    deps = {f: sorted(d for d in dependencies[f] if d != f and d in dependencies) for f in files}
    users: dict[str, list[str]] = {f: [] for f in files}
    for file in files:
        for dep in deps[file]:
            users[dep].append(file)
    in_degree = {f: len(deps[f]) for f in files}
    component = _strongly_connected(files, deps)
    members: dict[int, list[str]] = {}
    for file in files:
        members.setdefault(component[file], []).append(file)
    waiting = {c: sum(component[d] != c for f in fs for d in deps[f]) for c, fs in members.items()}
    ordered = []
    for subgraph in _weakly_connected(files, deps, users):
        ready = [(members[c][0], c) for c in {component[f] for f in subgraph} if waiting[c] == 0]
        heapq.heapify(ready)
        done: list[str] = []
        while ready:
            _, current = heapq.heappop(ready)
            for file in _minimal_in_degree_first(members[current], users, in_degree):
                done.append(file)
                for user in users[file]:
                    if component[user] != current:
                        waiting[component[user]] -= 1
                        if waiting[component[user]] == 0:
                            heapq.heappush(ready, (members[component[user]][0], component[user]))
        ordered.append(done)
    return ordered


def _minimal_in_degree_first(component: list[str], users, in_degree) -> list[str]:
    """Algorithm 1's loop on one component: take the file of least in-degree (then smallest path), decrement users."""
    inside = set(component)
    heap = [(in_degree[f], f) for f in component]
    heapq.heapify(heap)
    emitted: list[str] = []
    while heap:
        degree, file = heapq.heappop(heap)
        if file not in inside or degree != in_degree[file]:
            continue   # stale entry: already emitted, or its in-degree dropped since it was pushed
        inside.discard(file)
        emitted.append(file)
        for user in users[file]:
            in_degree[user] -= 1
            if user in inside:
                heapq.heappush(heap, (in_degree[user], user))
    return emitted


def _strongly_connected(files: list[str], deps: Mapping[str, list[str]]) -> dict[str, int]:
    """Tarjan's algorithm, iterative (a deep import chain must not hit Python's recursion limit): file → component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    component: dict[str, int] = {}
    for root in files:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(deps[root]))]
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(deps[successor])))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    number = len(set(component.values()))
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component[member] = number
                        if member == node:
                            break
    return component


def _weakly_connected(files: list[str], deps, users) -> list[list[str]]:
    seen: set[str] = set()
    subgraphs = []
    for start in files:   # sorted, so subgraphs come in order of their smallest path
        if start in seen:
            continue
        seen.add(start)
        stack, found = [start], []
        while stack:
            file = stack.pop()
            found.append(file)
            for other in (*deps[file], *users[file]):
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        subgraphs.append(sorted(found))
    return subgraphs


# ---------------------------------------------------------------- concatenation
LAYOUT = "deepseek_repo_v1"   # metadata["layout"] of repository samples: their control tokens are these, by design
LAYOUT_TOKENS = (tokenizer.REPO_NAME_BEGIN, tokenizer.REPO_NAME_END, tokenizer.FILE_NAME_BEGIN, tokenizer.FILE_NAME_END,
                 tokenizer.FILE_BEGIN, tokenizer.FILE_END)
_FILE_PATTERN = re.compile(re.escape(tokenizer.FILE_NAME_BEGIN) + "(.*?)" + re.escape(tokenizer.FILE_NAME_END) +
                           re.escape(tokenizer.FILE_BEGIN) + "(.*?)" + re.escape(tokenizer.FILE_END), re.S)
_REPO_PATTERN = re.compile(re.escape(tokenizer.REPO_NAME_BEGIN) + "(.*?)" + re.escape(tokenizer.REPO_NAME_END), re.S)


def concatenate_repository(repo_name: str, files: Sequence[tuple[str, str]]) -> str:
    """One training sample from (path, content) pairs already in dependency order (layout: module docstring)."""
    parts = [tokenizer.REPO_NAME_BEGIN, repo_name, tokenizer.REPO_NAME_END]
    for path, content in files:
        parts += [tokenizer.FILE_NAME_BEGIN, path, tokenizer.FILE_NAME_END, tokenizer.FILE_BEGIN, content,
                  tokenizer.FILE_END]
    return "".join(parts)


def split_repository_sample(sample: str) -> tuple[str, list[tuple[str, str]]]:
    """Inverse of `concatenate_repository`; ValueError when `sample` is not exactly that layout."""
    head = _REPO_PATTERN.match(sample)
    if head is None:
        raise ValueError(f"not a repository sample: it starts with {sample[:60]!r}")
    files, position = [], head.end()
    while position < len(sample):
        match = _FILE_PATTERN.match(sample, position)
        if match is None:
            raise ValueError(f"repository sample {head.group(1)!r}: no file record at character {position}")
        files.append((match.group(1), match.group(2)))
        position = match.end()
    return head.group(1), files
