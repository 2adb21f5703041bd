"""Held-out text and code for evaluation: the Python standard library's own source files.

Why the standard library: the curate stage samples *installed distributions* from site-packages
(`training.data.sample_corpus`), and the stdlib is not one of them, so these files are not training data of a run
that used the sample corpus. It is real, well-written code with prose docstrings, present on every machine with no
download, and fixed for a given Python version, so a seed picks the same items everywhere (the version is recorded
with the results). Packages that vendor or backport parts of the stdlib (setuptools' distutils, importlib_metadata,
tomli) could leak those parts into training, so those directories are left out, as are the test suite and IDLE
(large, repetitive, unlike user code) and generated tables (encodings).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import random
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                           "encodings", "distutils", "importlib", "tomllib", "ensurepip", "__pycache__"})
MAX_FILE_BYTES = 200_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """Eligible stdlib .py files, sorted by relative path (the order seeds index into)."""
    root = stdlib_root()
    files = []
    for folder, dirs, names in os.walk(root):
        # Prune while walking: site-packages alone can hold tens of thousands of files.
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        for name in names:
            path = Path(folder, name)
            if name.endswith(".py") and path.stat().st_size <= MAX_FILE_BYTES:
                files.append(path)
    if not files:
        raise RuntimeError(f"no standard-library sources under {root}: is this Python installed without them?")
    return tuple(sorted(files, key=lambda p: str(p.relative_to(root))))


def relative_name(path: Path) -> str:
    return str(path.relative_to(stdlib_root()))


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def source_id() -> str:
    """What the held-out sets depend on: the Python version and the eligible file list."""
    names = "\n".join(relative_name(p) for p in stdlib_files())
    return f"python-{platform.python_version()}-stdlib-{hashlib.sha256(names.encode()).hexdigest()[:12]}"


def shuffled_files(seed: int, salt: str) -> list[Path]:
    """All eligible files in a seeded order; `salt` keeps the suites' orders independent of each other."""
    files = list(stdlib_files())
    random.Random(f"{salt}-{seed}").shuffle(files)
    return files


def docstrings(seed: int, max_documents: int, min_chars: int = 200) -> list[tuple[str, str]]:
    """(id, text) of module docstrings: English prose about code, unlike anything the model saw in training."""
    out = []
    for path in shuffled_files(seed, "docstrings"):
        source = read_source(path)
        if source is None:
            continue
        try:
            doc = ast.get_docstring(ast.parse(source))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc) >= min_chars:
            out.append((relative_name(path), doc))
            if len(out) == max_documents:
                break
    return out


def code_files(seed: int, max_documents: int) -> list[tuple[str, str]]:
    """(id, text) of whole source files."""
    out = []
    for path in shuffled_files(seed, "code"):
        source = read_source(path)
        if source and source.strip():
            out.append((relative_name(path), source))
            if len(out) == max_documents:
                break
    return out
