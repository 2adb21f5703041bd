"""Repositories → one DeepSeek-Coder sample each (Guo et al. 2024, "DeepSeek-Coder: When the Large Language Model Meets
Programming", §2): read every file, screen it (§2.1 rules plus binary/size/control-token checks), order the survivors
by their imports (§2.2, Algorithm 1) and concatenate them with the repo/file special tokens (layout: `code.py`).

Input: a local directory whose entries are repositories, each a sub-directory or a `.tar`, `.tar.gz`, `.tgz`
tarball. Entries sorted by name give each its `order`; shard `rank` of `world_size` reads `order % world_size == rank`,
so any split covers every entry once. Nothing raises for bad data: per-file skips are counted (and a capped list of
names kept) in the document's metadata; a whole-repository reject (`corrupt_archive`, `empty_repository`,
`not_a_repository`, ...) comes through as a placeholder document marked `metadata["reject"] = reason`, like every
reader of the curate chain, so the n-th document of a source is always its n-th repository.

A truncated or corrupt tarball rejects the *whole* repository: a repository missing some files is a different
repository (imports dangle, the order changes, and repo-level dedup would see a near-copy), and a rerun on a
repaired archive then produces one clean sample instead of two inconsistent ones.
"""
from __future__ import annotations

import os
import posixpath
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from training.data.curate import code, code_quality
from training.data.sample_corpus import SAMPLE_CHARS

TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Version-control internals and caches are not the repository's code: skipped as one entry per directory.
IGNORED_DIRECTORIES = frozenset({".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache", ".tox"})


@dataclass(frozen=True)
class RepositoryParams:
    # The Stack (Kocetkov et al. 2022), DeepSeek-Coder's peer corpus, drops files over 1 MB; §2 gives no size cap.
    max_file_bytes: int = 1 << 20
    # A repository is held in memory to be ordered: past this it is rejected rather than risking the shard's memory.
    max_repository_bytes: int = 256 << 20
    max_listed_skips: int = 100          # skipped file names kept in metadata (their counts are always complete)
    quality: code_quality.CodeQualityParams = field(default_factory=code_quality.CodeQualityParams)


@dataclass(frozen=True)
class RepositoryRef:
    name: str        # directory name, or tarball name without its suffix
    path: Path
    order: int       # position among the input directory's entries sorted by name


@dataclass
class RepositoryResult:
    ref: RepositoryRef
    sample: str | None = None
    files: list[dict] = field(default_factory=list)          # [{"path", "language", "subgraph"}] in sample order
    skipped: Counter = field(default_factory=Counter)         # reason → number of files
    skipped_files: list[dict] = field(default_factory=list)   # [{"path", "reason"}], capped
    reject_reason: str | None = None                          # set when the whole repository yields nothing
    error: str | None = None
    bytes_read: int = 0


class _RepositoryTooLarge(Exception):
    pass


def _repository_name(entry: Path) -> str | None:
    if entry.is_dir() and not entry.is_symlink():
        return entry.name
    lower = entry.name.lower()
    suffix = next((s for s in TARBALL_SUFFIXES if lower.endswith(s)), None)
    return entry.name[:-len(suffix)] if suffix and entry.is_file() else None


def list_repositories(data_dir: str | Path) -> list[RepositoryRef]:
    """Every entry of `data_dir`, sorted by name; entries that are not repositories are kept (their name is then the
    full entry name) so that the shard owning them reports them as `not_a_repository`."""
    if str(data_dir).startswith(("s3://", "gs://", "http://", "https://")):
        raise ValueError(f"repository input {data_dir} is remote: the stage must stage it to a local directory first")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"repository input directory {root} does not exist or is not a directory")
    return [RepositoryRef(_repository_name(entry) or entry.name, entry, order)
            for order, entry in enumerate(sorted(root.iterdir(), key=lambda e: e.name))]


def shard_repositories(refs: list[RepositoryRef], rank: int, world_size: int) -> list[RepositoryRef]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard rank {rank} is not in [0, world_size={world_size})")
    return [ref for ref in refs if ref.order % world_size == rank]


# ---------------------------------------------------------------- raw files: (path, bytes or None, skip reason)
def _precheck(path: str, size: int, params: RepositoryParams) -> str | None:
    """Reasons decided without reading the bytes."""
    if code_quality.language_of(path) is None:
        return "unknown_extension"
    if size > params.max_file_bytes:
        return "too_large"
    return None


def _directory_files(root: Path, params: RepositoryParams) -> Iterator[tuple[str, bytes | None, str | None]]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel = (lambda name: name) if rel_dir == "." else (lambda name: f"{rel_dir}/{name}")
        for name in sorted(dirnames):
            if name in IGNORED_DIRECTORIES or os.path.islink(os.path.join(dirpath, name)):
                dirnames.remove(name)   # os.walk does not descend into what is removed here
                yield rel(name) + "/", None, "ignored_directory" if name in IGNORED_DIRECTORIES else "symlink"
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                yield rel(name), None, "symlink" if os.path.islink(full) else "not_regular_file"
                continue
            reason = _precheck(rel(name), os.path.getsize(full), params)
            if reason:
                yield rel(name), None, reason
                continue
            try:
                yield rel(name), Path(full).read_bytes(), None
            except OSError:   # permissions, a file removed while walking
                yield rel(name), None, "unreadable"


def _tarball_files(path: Path, params: RepositoryParams) -> Iterator[tuple[str, bytes | None, str | None]]:
    with tarfile.open(path, "r:*") as archive:
        members = archive.getmembers()
        # tarfile stops quietly at a header cut short: require the end-of-archive block the format ends with.
        archive.fileobj.seek(archive.offset)
        if len(archive.fileobj.read(tarfile.BLOCKSIZE)) < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"no end-of-archive block after offset {archive.offset}: archive is truncated")
        names = [posixpath.normpath(m.name.lstrip("/")) for m in members]
        # GitHub-style tarballs wrap everything in one `repo-sha/` directory: paths are made relative to it.
        tops = {n.split("/", 1)[0] for n in names}
        strip = len(tops) == 1 and all("/" in n or m.isdir() for n, m in zip(names, members))
        for member, name in sorted(zip(members, names), key=lambda item: item[1]):
            name = name.split("/", 1)[1] if strip and "/" in name else name
            if member.isdir():
                continue
            if name.startswith("../") or name == "..":
                yield member.name, None, "unsafe_path"
            elif not member.isfile():
                yield name, None, "symlink" if member.issym() or member.islnk() else "not_regular_file"
            elif reason := _precheck(name, member.size, params):
                yield name, None, reason
            else:
                yield name, archive.extractfile(member).read(), None


# ---------------------------------------------------------------- one repository
def _screen(path: str, data: bytes, params: RepositoryParams) -> tuple[str | None, str | None]:
    """(text, None) for a usable file, (None, reason) otherwise."""
    if b"\x00" in data:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    reason = code_quality.quality_reject_reason(path, code_quality.language_of(path), text, params.quality)
    if reason is None and (code_quality.find_control_token_text(text) or code_quality.find_control_token_text(path)):
        reason = "control_token_text"   # it would encode as a real control token (and break the sample's layout)
    return (None, reason) if reason else (text, None)


def read_repository(ref: RepositoryRef, params: RepositoryParams = RepositoryParams()) -> RepositoryResult:
    """Read, screen, order and concatenate one repository. Never raises: failures become `reject_reason`."""
    result = RepositoryResult(ref)
    try:
        _read_into(result, params)
    except (tarfile.TarError, EOFError, zlib.error) as error:
        result.reject_reason, result.error = "corrupt_archive", f"{ref.path}: {type(error).__name__}: {error}"
    except _RepositoryTooLarge as error:
        result.reject_reason, result.error = "repository_too_large", f"{ref.path}: {error}"
    except OSError as error:
        result.reject_reason, result.error = "unreadable_repository", f"{ref.path}: {error}"
    except Exception as error:   # a bug or an input no rule foresaw: reported with the repository, never a dead shard
        result.reject_reason, result.error = "read_error", f"{ref.path}: {type(error).__name__}: {error}"
    if result.reject_reason:
        result.sample, result.files = None, []
    return result


def _read_into(result: RepositoryResult, params: RepositoryParams) -> None:
    ref = result.ref
    if ref.path.is_dir() and not ref.path.is_symlink():
        raw_files = _directory_files(ref.path, params)
    elif ref.path.is_file() and ref.path.name.lower().endswith(TARBALL_SUFFIXES):
        raw_files = _tarball_files(ref.path, params)
    else:
        result.reject_reason, result.error = "not_a_repository", f"{ref.path}: neither a directory nor a tarball"
        return
    kept: dict[str, str] = {}
    skips: list[tuple[str, str]] = []
    for path, data, reason in raw_files:   # fully drained first: a corrupt archive rejects the whole repository
        if data is not None:
            result.bytes_read += len(data)
            if result.bytes_read > params.max_repository_bytes:
                raise _RepositoryTooLarge(f"over max_repository_bytes={params.max_repository_bytes}")
            text, reason = _screen(path, data, params)
            if text is not None:
                kept[path] = text
        if reason:
            skips.append((path, reason))
    for path, reason in skips:
        result.skipped[reason] += 1
        if len(result.skipped_files) < params.max_listed_skips:
            result.skipped_files.append({"path": path, "reason": reason})
    if not kept:
        result.reject_reason = "empty_repository"
        return
    if code_quality.find_control_token_text(ref.name):
        result.reject_reason, result.error = "control_token_text", f"{ref.path}: the repository name"
        return
    resolver = code.DependencyResolver(kept, ref.name, other_paths=[path for path, _ in skips])
    languages = {path: code_quality.language_of(path) for path in kept}
    subgraphs = code.dependency_order({path: resolver.dependencies(path, languages[path]) for path in kept})
    result.files = [{"path": path, "language": languages[path], "subgraph": index}
                    for index, subgraph in enumerate(subgraphs) for path in subgraph]
    result.sample = code.concatenate_repository(ref.name, [(f["path"], kept[f["path"]]) for f in result.files])


def _base_metadata(result: RepositoryResult, source: str) -> dict:
    return {"source": source, "order": result.ref.order, "repository": result.ref.name,
            "skipped": dict(sorted(result.skipped.items())), "skipped_files": result.skipped_files}


def repository_document(result: RepositoryResult, source: str) -> Document:
    """The repository's sample, or for a whole-repository reject a placeholder marked `metadata["reject"] = reason`
    (text: the error) that `SetAsideBadInput` sets aside, as every reader of the curate chain does.
    `metadata["layout"] = code.LAYOUT` marks the repo/file special tokens in a sample's text as intended."""
    metadata = _base_metadata(result, source)
    if result.reject_reason:
        metadata.update(reject=result.reject_reason, error=result.error)
        return Document(text=(result.error or "")[:SAMPLE_CHARS], id=f"{source}/{result.ref.name}", metadata=metadata)
    metadata.update(files=result.files, layout=code.LAYOUT)
    return Document(text=result.sample, id=f"{source}/{result.ref.name}", metadata=metadata)


def repository_documents(data_dir: str | Path, source, params: RepositoryParams | None = None, rank: int = 0,
                         world_size: int = 1) -> Iterator[Document]:
    """One document per entry of `data_dir` owned by shard `rank` (all entries by default), in order: the sample or a
    reject placeholder, so the n-th document is always the n-th repository. `source` is a label or a `CurateSource`
    (its `label`, and its `max_file_bytes` when `params` is not given)."""
    label = getattr(source, "label", source)
    if params is None:
        params = RepositoryParams(**({"max_file_bytes": source.max_file_bytes}
                                     if hasattr(source, "max_file_bytes") else {}))
    for ref in shard_repositories(list_repositories(data_dir), rank, world_size):
        yield repository_document(read_repository(ref, params), label)


class RepositoryReader(PipelineStep):
    """datatrove reader: one document per repository of `data_dir` owned by this rank (see the module docstring)."""

    name = "📦 Repositories"
    type = "📖 - READER"

    def __init__(self, data_dir: str | Path, source: str, params: RepositoryParams = RepositoryParams()):
        super().__init__()
        self.data_dir, self.source, self.params = data_dir, source, params

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        for document in repository_documents(self.data_dir, self.source, self.params, rank, world_size):
            meta = document.metadata
            for reason, count in meta["skipped"].items():
                self.stat_update(f"skipped_file_{reason}", value=count)
            if "reject" in meta:
                self.stat_update("bad_input", f"rejected_{meta['reject']}")
            else:
                self.stat_update("documents")
                self.stat_update("files", value=len(meta["files"]))
                self.update_doc_stats(document)
            yield document
