"""Sample data nobody here wrote: real text and code from the Python packages installed on this machine.

Two sources, both read from site-packages directories (by default the running interpreter's):
- `package_metadata`: the long description (usually the README) in each distribution's METADATA, one document per
  distribution, id `name==version`. Real prose with real mess: duplicates, e-mail addresses, URLs, markup.
- `package_code`: the source files each distribution installed (its RECORD, else the dirs in top_level.txt),
  one document per file, id `name/relative/path`. Distributions are interleaved round-robin so that a cap of a few
  thousand files samples many projects instead of the first few alphabetically.

Readers are generators that yield `Document`s and `Reject`s: a file that is too large, binary or not UTF-8 is
reported with a reason, never dropped silently (DESIGN.md rule 7). Order is deterministic: sorted by distribution
name, then path. `fingerprint()` identifies the inputs for the stage manifest.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import itertools
import os
import re
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

CODE_SUFFIXES = frozenset({".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".sh"})
OWN_DISTRIBUTIONS = frozenset({"seekflow"})   # our own code is not sample data nobody here wrote
SAMPLE_CHARS = 200                            # how much of a rejected item the rejects file keeps


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class Reject:
    id: str
    reason: str
    sample: str | None = None

    def record(self) -> dict:
        return asdict(self)


Item = Union[Document, Reject]


@dataclass(frozen=True)
class Package:
    """One installed distribution and the site directory its RECORD paths are relative to."""

    name: str
    version: str
    dist: importlib.metadata.Distribution
    root: Path


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()   # PEP 503


def default_site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(p) for p in dict.fromkeys((paths["purelib"], paths["platlib"]))]


def installed_packages(site_dirs: Iterable[str | os.PathLike] | None = None) -> list[Package]:
    """Distributions in `site_dirs` (default: this interpreter's site-packages), sorted by name.

    Scanning explicit directories (not sys.path) keeps the corpus independent of the working directory. When a name
    appears twice, the first directory wins, as for imports.
    """
    found: dict[str, Package] = {}
    for site in site_dirs if site_dirs is not None else default_site_dirs():
        site = Path(site)
        # Parse each METADATA once; sort so that even a stale duplicate dist-info resolves the same way every time.
        # The stdlib's PathDistribution directly, not distributions(): once some library imports the
        # `importlib_metadata` backport, its finder answers distributions() and parses METADATA bodies differently
        # (continuation lines), which would make the corpus depend on what was imported before.
        dists = [importlib.metadata.PathDistribution(path)
                 for path in sorted(site.glob("*.dist-info")) + sorted(site.glob("*.egg-info")) if path.is_dir()]
        listed = [(canonical_name(meta["Name"] or ""), meta["Version"] or "", meta["Name"] or "", dist)
                  for dist in dists if (meta := dist.metadata) is not None]
        listed.sort(key=lambda row: row[:3])
        for key, version, name, dist in listed:
            if not name or key in OWN_DISTRIBUTIONS or key in found:
                continue
            found[key] = Package(name=name, version=version, dist=dist, root=site)
    return [found[key] for key in sorted(found)]


def fingerprint(packages: Iterable[Package]) -> str:
    """sha256 over the sorted `name==version` list: changes when a package is added, removed or upgraded."""
    names = sorted(f"{p.name}=={p.version}" for p in packages)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- metadata text --
def package_metadata(packages: Iterable[Package]) -> Iterator[Item]:
    """One document per distribution: its long description (possibly empty; curation decides what is too short)."""
    for pkg in packages:
        yield Document(id=f"{pkg.name}=={pkg.version}", text=long_description(pkg.dist.metadata))


def long_description(metadata) -> str:
    """The METADATA body (Metadata-Version >= 2.1), else the older `Description` header with its 8-space or
    `       |` continuation prefix removed."""
    body = metadata.get_payload()
    if isinstance(body, str) and body.strip():
        return body
    header = metadata.get("Description") or ""
    return re.sub(r"\n(?: {8}| {7}\|)", "\n", str(header))


# ------------------------------------------------------------------------------------------------------ code files --
def package_code(packages: Iterable[Package], max_file_bytes: int) -> Iterator[Item]:
    """One document per source file, distributions interleaved round-robin (one file from each in turn)."""
    for doc_id, path in package_code_files(packages):
        yield read_source_file(doc_id, path, max_file_bytes)


def package_code_files(packages: Iterable[Package]) -> Iterator[tuple[str, Path]]:
    """(id, path) of every source file in `package_code`'s order, without reading the files."""
    return _round_robin([_source_files(pkg) for pkg in packages])


def read_source_file(doc_id: str, path: Path, max_file_bytes: int) -> Item:
    """The file as a Document, or a Reject saying why not (the size is checked before reading)."""
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            return Reject(doc_id, "too_large", f"{size} bytes > max_file_bytes {max_file_bytes}")
        data = path.read_bytes()
    except OSError as err:   # listed in RECORD but missing or unreadable
        return Reject(doc_id, "unreadable", str(err)[:SAMPLE_CHARS])
    if b"\0" in data:
        return Reject(doc_id, "binary", repr(data[:64]))
    try:
        return Document(doc_id, data.decode("utf-8"))
    except UnicodeDecodeError as err:
        context = data[max(err.start - 40, 0):err.start + 8]
        return Reject(doc_id, "invalid_utf8", f"{err.reason} at byte {err.start}: {context!r}")


def _source_files(pkg: Package) -> list[tuple[str, Path]]:
    """(id, path) of a distribution's source files, sorted by path."""
    rels = _record_paths(pkg)
    if rels is None:
        rels = _top_level_paths(pkg)
    return [(f"{pkg.name}/{rel}", pkg.root / rel) for rel in sorted(set(rels))]


def _record_paths(pkg: Package) -> list[str] | None:
    """Code paths listed in the distribution's RECORD (None when it has none). Parsed directly: `dist.files`
    builds a path object per entry and is 10x slower over a few hundred distributions."""
    record = pkg.dist.read_text("RECORD")
    if record is None:
        return None
    paths = (row[0] for row in csv.reader(record.splitlines()) if row)
    # Entries like ../../bin/tool live outside site-packages: not part of the package's source tree.
    return [p for p in paths if os.path.splitext(p)[1] in CODE_SUFFIXES and not p.startswith(("..", "/"))]


def _top_level_paths(pkg: Package) -> list[str]:
    names = (pkg.dist.read_text("top_level.txt") or "").split()
    rels = []
    for name in names:
        top = pkg.root / name
        if top.is_dir():
            rels += [p.relative_to(pkg.root).as_posix() for p in top.rglob("*")
                     if p.suffix in CODE_SUFFIXES and p.is_file()]
        elif (single := top.with_suffix(".py")).is_file():   # a single-module distribution
            rels.append(single.relative_to(pkg.root).as_posix())
    return rels


def _round_robin(lists: list[list]) -> Iterator:
    for row in itertools.zip_longest(*lists):
        yield from (item for item in row if item is not None)


# --------------------------------------------------------------------------------------------------------- sources --
def read_source(kind: str, packages: list[Package], *, max_file_bytes: int) -> Iterator[Item]:
    """The items of one configured source kind (see `SampleCorpusSource.kind`)."""
    if kind == "package_metadata":
        return package_metadata(packages)
    if kind == "package_code":
        return package_code(packages, max_file_bytes)
    raise ValueError(f"unknown sample corpus kind {kind!r}")
