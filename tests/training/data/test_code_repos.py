"""Repository-level code samples (DeepSeek-Coder §2): dependency order, the special-token layout, bad input, sharding,
and a real installed package read as a repository. Every repository is built in tmp_path."""
from __future__ import annotations

import importlib.util
import io
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from training import tokenizer as T
from training.data.curate import code, code_quality, repos

MIXED = {   # file → the repo files it imports (hand-written: what each import statement means)
    "main.py": ("from pkg import core\n\ncore.run()\n", {"pkg/core.py"}),
    "pkg/__init__.py": ("from .core import run\nfrom . import helpers\n", {"pkg/core.py", "pkg/helpers.py"}),
    "pkg/core.py": ("import os\nimport pkg.models\nfrom .util.strings import shout\n\ndef run():\n"
                    "    return shout(pkg.models.Model().name)\n", {"pkg/models.py", "pkg/util/strings.py"}),
    "pkg/models.py": ("class Model:\n    name = 'model'\n", set()),
    "pkg/helpers.py": ("from pkg.util import strings\nfrom pkg.util import VERSION\n",
                       {"pkg/util/strings.py", "pkg/util/__init__.py"}),
    "pkg/util/__init__.py": ('"""Utilities."""\nVERSION = "1.0"\n', set()),
    "pkg/util/strings.py": ("from ..models import Model\n\ndef shout(text):\n    return text.upper()\n",
                            {"pkg/models.py"}),
    "src/main.c": ('#include <stdio.h>\n#include "util.h"\nint main(void) { return util_value(); }\n',
                   {"src/util.h"}),
    "src/util.h": ("int util_value(void);\n", set()),
    "src/util.c": ('#include "util.h"\nint util_value(void) { return 42; }\n', {"src/util.h"}),
    "src/api.cpp": ('#include "api.h"\nint api_call() { return 1; }\n', {"include/api.h"}),
    "include/api.h": ("int api_call();\n", set()),
    "web/app.ts": ("import { greet } from './greet';\nimport lodash from 'lodash';\nexport const app = greet('x');\n",
                   {"web/greet.ts"}),
    "web/greet.ts": ("export function greet(name: string) { return `hello ${name}`; }\n", set()),
    "web/legacy.js": ("const greet = require('./greet.js');\nconst format = require('./lib/format');\n",
                      {"web/greet.ts", "web/lib/format.js"}),
    "web/lib/format.js": ("module.exports = function format(value) { return String(value); };\n", set()),
    "web/main.tsx": ("import {\n  app,\n} from './app';\nimport './lib';\n", {"web/app.ts", "web/lib/index.ts"}),
    "web/lib/index.ts": ("export const library = 'lib';\n", set()),
    "java/src/main/java/com/acme/App.java": (
        "package com.acme;\n\nimport com.acme.model.User;\nimport java.util.List;\n\n"
        "public class App { User user; }\n", {"java/src/main/java/com/acme/model/User.java"}),
    "java/src/main/java/com/acme/model/User.java": ("package com.acme.model;\n\npublic class User {}\n", set()),
    "go/go.mod": ("module example.com/tool\n\ngo 1.21\n", set()),
    "go/cmd/tool/main.go": ('package main\n\nimport (\n\t"fmt"\n\t"example.com/tool/internal/store"\n)\n\n'
                            "func main() { fmt.Println(store.Name) }\n", {"go/internal/store/store.go"}),
    "go/internal/store/store.go": ('package store\n\nconst Name = "store"\n', set()),
}


def write_repo(root: Path, files: dict[str, str | bytes]) -> Path:
    for path, content in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.write_bytes if isinstance(content, bytes) else target.write_text)(content)
    return root


def write_tarball(target: Path, files: dict[str, str | bytes], top: str = "", reverse: bool = False) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz" if target.name.endswith("gz") else "w") as archive:
        for path in sorted(files, reverse=reverse):
            data = files[path].encode() if isinstance(files[path], str) else files[path]
            info = tarfile.TarInfo(f"{top}{path}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return target


def respects_edges(order: list[str], edges: dict[str, set[str]], skip_cycles: bool = False) -> list[str]:
    """The edges (file, dependency) whose dependency comes after the file; with skip_cycles, edges inside a cycle
    (the dependency also reaches the file) are allowed either way."""
    position = {path: i for i, path in enumerate(order)}

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(edges.get(node, ()))
        return False

    return [f"{file} -> {dep}" for file, deps in edges.items() for dep in deps
            if position[dep] > position[file] and not (skip_cycles and reaches(dep, file))]


def test_resolver_finds_every_import_edge_and_no_other():
    files = {path: text for path, (text, _) in MIXED.items()}
    resolver = code.DependencyResolver(files, "mixed")
    for path, (_, expected) in MIXED.items():
        assert resolver.dependencies(path, code_quality.language_of(path)) == expected, path


def test_order_respects_every_edge_and_ignores_listing_order(tmp_path):
    files = {path: text for path, (text, _) in MIXED.items()}
    result = repos.read_repository(repos.RepositoryRef("mixed", write_repo(tmp_path / "a" / "mixed", files), 0))
    assert result.reject_reason is None and result.skipped == {}
    order = [f["path"] for f in result.files]
    assert sorted(order) == sorted(MIXED)
    assert respects_edges(order, {path: deps for path, (_, deps) in MIXED.items()}) == []
    assert {f["path"]: f["language"] for f in result.files}["web/main.tsx"] == "TypeScript"

    # The same repository as a tarball (members in reverse order, wrapped in a GitHub-style top directory), twice.
    tarball = write_tarball(tmp_path / "b" / "mixed.tar.gz", files, top="mixed-0123abc/", reverse=True)
    for _ in range(2):
        again = repos.read_repository(repos.RepositoryRef("mixed", tarball, 0))
        assert again.sample == result.sample

    # Algorithm 1 on a shuffled graph: the answer depends only on the graph.
    graph = {path: deps for path, (_, deps) in MIXED.items()}
    expected = code.dependency_order(graph)
    items = list(graph.items())
    for seed in range(5):
        random.Random(seed).shuffle(items)
        assert code.dependency_order({k: set(sorted(v, reverse=seed % 2 == 1)) for k, v in items}) == expected


def test_cycle_is_broken_by_least_in_degree_then_path():
    # a ↔ b and a ↔ c: a has in-degree 2, b and c 1. Algorithm 1 starts with the least in-degree (b before c by
    # path), not with the alphabetically first file; z depends on the cycle and must come after all of it.
    graph = {"a.py": {"b.py", "c.py"}, "b.py": {"a.py"}, "c.py": {"a.py"}, "z.py": {"a.py"}, "lone.py": set()}
    assert code.dependency_order(graph) == [["b.py", "a.py", "c.py", "z.py"], ["lone.py"]]
    # Plain Algorithm 1 over the whole graph would emit y.py (in-degree 1, name first) before its dependency x.py,
    # which sits in the cycle x ↔ w; ordering cycles as units keeps every edge outside a cycle.
    graph = {"y.py": {"x.py"}, "x.py": {"w.py"}, "w.py": {"x.py"}}
    assert code.dependency_order(graph) == [["w.py", "x.py", "y.py"]]


def test_layout_uses_special_tokens_and_round_trips():
    files = [("pkg/a.py", "print('a')\n"), ("README.md", "# Title\n\n<think> is fine here? no\n")]
    sample = code.concatenate_repository("demo", files)
    assert sample.startswith(f"{T.REPO_NAME_BEGIN}demo{T.REPO_NAME_END}{T.FILE_NAME_BEGIN}pkg/a.py{T.FILE_NAME_END}"
                             f"{T.FILE_BEGIN}print('a')\n{T.FILE_END}")
    assert code.split_repository_sample(sample) == ("demo", files)
    ids = T.load_tokenizer().encode(sample, add_special_tokens=False).ids
    markers = {T.token_id(t) for t in code.LAYOUT_TOKENS}
    assert [i for i in ids if i in T.control_token_ids() and i not in markers] == [T.token_id(T.THINK_BEGIN)]
    assert ids.count(T.token_id(T.FILE_BEGIN)) == 2 and ids.count(T.token_id(T.REPO_NAME_BEGIN)) == 1
    with pytest.raises(ValueError, match="no file record at character"):
        code.split_repository_sample(sample + "trailing text")


def test_reader_document_round_trips_the_repository(tmp_path):
    files = {path: text for path, (text, _) in MIXED.items()}
    write_repo(tmp_path / "in" / "mixed", files)
    [doc] = list(repos.RepositoryReader(tmp_path / "in", "code").run())
    name, recovered = code.split_repository_sample(doc.text)
    assert name == "mixed" and dict(recovered) == files
    assert [path for path, _ in recovered] == [f["path"] for f in doc.metadata["files"]]
    assert doc.metadata["source"] == "code" and doc.metadata["order"] == 0 and doc.metadata["layout"] == code.LAYOUT


def test_bad_input_is_counted_and_the_reader_keeps_going(tmp_path):
    root = tmp_path / "in"
    minified = "var a=1;" * 400
    write_repo(root / "a_good", {"ok.py": "def ok():\n    return True\n"})
    write_repo(root / "b_mixed", {
        "keep.py": "import gen\n\ndef keep():\n    return 1\n",
        "blob.py": b"def f():\x00\x01\x02 pass\n",
        "latin.py": "# caf\xe9\nx = 1\n".encode("latin-1"),
        "huge.py": "value = 1\n" * 600,                                  # 6000 bytes > max_file_bytes below
        "bundle.js": minified, "app.min.js": "var a = 1;\nvar b = 2;\n",
        "gen.py": "# This file is auto-generated. Do not edit.\nX = 1\n",
        "tokens.py": f"EOS = '{T.EOD}'\n",
        "notes.txt": "plain notes\n", "empty/__init__.py": "",
        "table.json": "[" + ",".join(["1"] * 2600) + "]",               # 5201 chars: a data file
        "digits.py": "x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n",
        "page.html": "<html><body><div><span>x</span></div></body></html>",
        ".git/config": "[core]\n"})
    write_repo(root / "c_empty", {"only.bin": b"\x00" * 10})
    (root / "d_empty_dir").mkdir()
    good_tar = {"lib.py": "def lib():\n    return 'x' * 100\n" * 40, "main.py": "import lib\n"}
    write_tarball(root / "e_ok.tar.gz", good_tar, top="e_ok/")
    for name in ("f_cut.tar.gz", "g_cut.tar"):   # valid archives, then their bytes cut
        big = {f"m{i}.py": "".join(f"v{i}_{j} = {j * i}\n" for j in range(300)) for i in range(6)}
        data = write_tarball(root / name, big).read_bytes()
        (root / name).write_bytes(data[:len(data) // 2])
    h_plain = write_tarball(root / "h_no_end.tar", good_tar)   # cut exactly after the last member's data
    with tarfile.open(h_plain) as archive:
        last = archive.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512
    h_plain.write_bytes(h_plain.read_bytes()[:end])
    (root / "i_readme.txt").write_text("not a repository\n")

    params = repos.RepositoryParams(max_file_bytes=5500)
    reader = repos.RepositoryReader(root, "code", params)
    docs = list(reader.run())
    assert [d.id for d in docs] == [f"code/{n}" for n in ("a_good", "b_mixed", "c_empty", "d_empty_dir", "e_ok",
                                                          "f_cut", "g_cut", "h_no_end", "i_readme.txt")]
    assert [d.metadata["order"] for d in docs] == list(range(9))
    rejects = {d.id.split("/")[1]: d.metadata.get("reject") for d in docs}
    assert rejects == {"a_good": None, "b_mixed": None, "c_empty": "empty_repository", "d_empty_dir":
                       "empty_repository", "e_ok": None, "f_cut": "corrupt_archive", "g_cut": "corrupt_archive",
                       "h_no_end": "corrupt_archive", "i_readme.txt": "not_a_repository"}
    assert "f_cut.tar.gz" in docs[5].text and "no end-of-archive block" in docs[7].text

    mixed = docs[1].metadata
    assert [f["path"] for f in mixed["files"]] == ["keep.py"]        # gen.py was rejected: no edge to it
    assert mixed["skipped"] == {"alphabetic_fraction": 1, "auto_generated": 1, "binary": 1, "control_token_text": 1,
                                "data_file_size": 1, "empty_file": 1, "html_visible_text": 1, "ignored_directory": 1,
                                "invalid_utf8": 1, "minified": 2, "too_large": 1, "unknown_extension": 1}
    assert {s["path"]: s["reason"] for s in mixed["skipped_files"]}["tokens.py"] == "control_token_text"
    assert {s["path"]: s["reason"] for s in mixed["skipped_files"]}["bundle.js"] == "minified"
    assert docs[2].metadata["skipped"] == {"unknown_extension": 1}
    assert [f["path"] for f in docs[4].metadata["files"]] == ["lib.py", "main.py"]   # top directory stripped

    stats = reader.stats.stats
    assert stats["documents"].total == 3 and stats["bad_input"].total == 6
    assert stats["rejected_corrupt_archive"].total == 3 and stats["skipped_file_minified"].total == 2


def test_shards_cover_every_repository_once(tmp_path):
    root = tmp_path / "in"
    for i in range(7):
        write_repo(root / f"repo{i}", {"main.py": f"def main():\n    return {i}\n"})
    write_tarball(root / "repo7.tgz", {"x.py": "def x():\n    return 'x'\n"})
    everything = [d.id for d in repos.RepositoryReader(root, "s").run()]
    assert len(everything) == 8
    for world_size in (1, 3, 8, 11):
        shards = [[d.id for d in repos.RepositoryReader(root, "s").run(rank=r, world_size=world_size)]
                  for r in range(world_size)]
        assert sorted(sum(shards, [])) == sorted(everything)
        assert all(d % world_size == r for r, shard in enumerate(shards)
                   for d in (everything.index(i) for i in shard))
    with pytest.raises(ValueError, match="rank 3"):
        repos.shard_repositories([], 3, 3)
    with pytest.raises(FileNotFoundError, match="missing"):
        list(repos.repository_documents(tmp_path / "missing", "s"))


def test_an_installed_package_reads_as_an_ordered_repository(tmp_path):
    package = Path(importlib.util.find_spec("click").origin).parent   # pure Python, imports among its modules
    shutil.copytree(package, tmp_path / "in" / "click")
    [doc] = list(repos.repository_documents(tmp_path / "in", "packages"))
    assert "reject" not in doc.metadata
    order = [f["path"] for f in doc.metadata["files"]]
    assert {"core.py", "__init__.py", "types.py"} <= set(order) and len(order) >= 10
    files = dict(code.split_repository_sample(doc.text)[1])
    assert files["core.py"] == (package / "core.py").read_text()
    resolver = code.DependencyResolver(files, "click")
    edges = {path: resolver.dependencies(path, "Python") for path in files}
    assert sum(map(len, edges.values())) >= 20                     # click's modules really import each other
    assert "core.py" in edges["__init__.py"] and order.index("core.py") < order.index("__init__.py")
    assert respects_edges(order, edges, skip_cycles=True) == []
