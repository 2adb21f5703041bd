"""The sample corpus (real installed packages, plus a planted fake site dir) and the curate stage end to end:
megatron-core reads back what it wrote, the manifest counts it, MLflow records it, a rerun skips, a bad source fails."""
import itertools
import os
import json
from pathlib import Path

import pytest

from training.config import CurateConfig
from training.data import sample_corpus as sc
from training import tokenizer as T
from training.manifest import manifest_path, read_manifest
from training.stages import curate
from training.storage import sha256_file

README = "# Alpha\n\nAlpha does things. " + "It is long enough to keep. " * 20


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)


@pytest.fixture
def fake_site(tmp_path):
    """A site-packages dir with two distributions: one with RECORD (and planted bad files), one with only
    top_level.txt and old-style metadata, plus our own distribution, which must be ignored."""
    site = tmp_path / "site-packages"
    _write(site / "alpha-1.0.dist-info/METADATA",
           f"Metadata-Version: 2.1\nName: alpha\nVersion: 1.0\nAuthor-email: a@example.com\n\n{README}")
    record = ["alpha/__init__.py", "alpha/core.py", "alpha/big.py", "alpha/blob.c", "alpha/latin.py",
              "alpha/data.bin", "alpha/gone.py", "../../bin/alpha-cli", "alpha-1.0.dist-info/METADATA"]
    _write(site / "alpha-1.0.dist-info/RECORD", "".join(f"{r},,\n" for r in record))
    _write(site / "alpha/__init__.py", "")
    _write(site / "alpha/core.py", "def core():\n    return 42\n")
    _write(site / "alpha/big.py", "x = 1\n" * 1000)                     # 6000 bytes: over the cap below
    _write(site / "alpha/blob.c", b"int main() {}\x00\x01\x02")          # NUL bytes: binary
    _write(site / "alpha/latin.py", "# caf\xe9\n".encode("latin-1"))      # not UTF-8
    _write(site / "alpha/data.bin", b"\x00" * 10)                         # not a code suffix: not listed
    _write(site / "Beta-2.0.dist-info/METADATA",
           "Metadata-Version: 1.1\nName: Beta\nVersion: 2.0\nDescription: Beta line one\n        line two\n")
    _write(site / "Beta-2.0.dist-info/top_level.txt", "beta\n")
    _write(site / "beta/mod.py", "import os\n")
    _write(site / "beta/web/app.js", "console.log('hi');\n")
    _write(site / "seekflow-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: seekflow\nVersion: 0.1.0\n\nours")
    return site


def test_fake_site_metadata_and_code_with_rejects(fake_site):
    packages = sc.installed_packages([fake_site])
    assert [(p.name, p.version) for p in packages] == [("alpha", "1.0"), ("Beta", "2.0")]   # seekflow excluded

    docs = list(sc.package_metadata(packages))
    assert docs == [sc.Document("alpha==1.0", README), sc.Document("Beta==2.0", "Beta line one\nline two")]

    items = list(sc.package_code(packages, max_file_bytes=1000))
    # Round-robin over distributions, each sorted by path; only code suffixes, nothing outside site-packages.
    assert [i.id for i in items] == ["alpha/alpha/__init__.py", "Beta/beta/mod.py", "alpha/alpha/big.py",
                                     "Beta/beta/web/app.js", "alpha/alpha/blob.c", "alpha/alpha/core.py",
                                     "alpha/alpha/gone.py", "alpha/alpha/latin.py"]
    reasons = {i.id: i.reason for i in items if isinstance(i, sc.Reject)}
    assert reasons == {"alpha/alpha/big.py": "too_large", "alpha/alpha/blob.c": "binary",
                       "alpha/alpha/gone.py": "unreadable", "alpha/alpha/latin.py": "invalid_utf8"}
    assert all(r.sample for r in items if isinstance(r, sc.Reject))
    texts = {i.id: i.text for i in items if isinstance(i, sc.Document)}
    assert texts["alpha/alpha/core.py"] == "def core():\n    return 42\n"
    assert texts["Beta/beta/web/app.js"] == "console.log('hi');\n"
    assert list(sc.package_code(packages, max_file_bytes=1000)) == items   # deterministic


def test_fingerprint_tracks_name_and_version(fake_site):
    before = sc.fingerprint(sc.installed_packages([fake_site]))
    assert before == sc.fingerprint(sc.installed_packages([fake_site]))
    meta = fake_site / "Beta-2.0.dist-info/METADATA"
    meta.write_text(meta.read_text().replace("Version: 2.0", "Version: 2.1"))
    assert sc.fingerprint(sc.installed_packages([fake_site])) != before


def test_real_packages_give_documents_of_both_kinds_deterministically():
    packages = sc.installed_packages()
    names = [sc.canonical_name(p.name) for p in packages]
    assert names == sorted(names) and "seekflow" not in names and {"torch", "mlflow", "tokenizers"} <= set(names)

    def head(kind, n):
        return [(i.id, getattr(i, "text", None)) for i in
                itertools.islice(sc.read_source(kind, packages, max_file_bytes=200_000), n)]

    meta = head("package_metadata", 40)
    assert meta == head("package_metadata", 40)
    assert sum(len(text) > 1000 for _, text in meta) > 10          # real long-form READMEs
    code = head("package_code", 60)
    assert code == head("package_code", 60)
    assert len({doc_id.split("/")[0] for doc_id, _ in code}) > 30   # many projects, not one
    assert any("def " in (text or "") or "import " in (text or "") for _, text in code)


# ------------------------------------------------------------------------------------------------ the curate stage --
def _config(run_root, mlflow_db, **overrides):
    doc = {"run_root": str(run_root), "tracking": {"uri": f"sqlite:///{mlflow_db}", "experiment": "test-curate"},
           "sources": [{"kind": "package_metadata", "weight": 0.6, "max_documents": 50},
                       {"kind": "package_code", "weight": 0.4, "max_documents": 50, "max_file_bytes": 50_000}]}
    doc.update(overrides)
    return CurateConfig.model_validate(doc)


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture(scope="module")
def curated(tmp_path_factory, mlflow_db):
    cfg = _config(tmp_path_factory.mktemp("run"), mlflow_db)
    return cfg, curate.run(cfg)


def test_datasets_read_back_with_megatron(curated):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg, manifest = curated
    tok, eod = T.load_tokenizer(), T.eod_id()
    control = T.control_token_ids() - {eod}
    assert [d["name"] for d in manifest["outputs"]["datasets"]] == ["package_metadata", "package_code"]
    for entry, source in zip(manifest["outputs"]["datasets"], cfg.sources):
        assert entry["prefix"].endswith(f"/curate/data/{source.kind}_text_document")
        assert entry["weight"] == source.weight and 0 < entry["documents"] < source.max_documents
        assert entry["bin_sha256"] == sha256_file(Path(entry["prefix"] + ".bin"))
        dataset = IndexedDataset(entry["prefix"])
        assert len(dataset) == entry["documents"]
        assert int(dataset.sequence_lengths.sum()) == entry["tokens"]
        for i in range(len(dataset)):
            ids = dataset[i].tolist()
            assert ids[-1] == eod and not control & set(ids[:-1])   # one EOD, at the end; no other control token
    assert manifest["outputs"]["tokenizer"] == {"name": "deepseek-v3", "vocab_size": tok.get_vocab_size(),
                                                "eod_id": eod, "vocab_merges": None}


def test_funnel_accounts_for_every_item_read(curated):
    cfg, manifest = curated
    assert read_manifest(manifest_path(cfg.run_root, "curate")) == manifest
    assert set(manifest["inputs"]) == {"package_metadata", "package_code", "tokenizer"}
    for source in cfg.sources:
        funnel = manifest["outputs"]["funnel"][source.label]
        assert funnel[0] == {"step": f"read {source.label}", "documents": source.max_documents, "tokens": None,
                             "dropped": {}}
        for before, after in zip(funnel, funnel[1:]):   # each step keeps what it did not drop
            assert after["documents"] == before["documents"] - sum(after["dropped"].values()), after["step"]
        m = manifest["metrics"][source.label]
        assert funnel[-1]["documents"] == m["documents"] and funnel[-1]["tokens"] == m["tokens"]
    steps = [s["step"] for s in manifest["outputs"]["funnel"]["package_metadata"]]
    assert steps[:5] == ["read package_metadata", "bad input", "exact dedup", "Decontaminate",
                         "Language ID (packaged lid.176)"]
    assert {"Gopher Repetition", "Gopher Quality", "tokenize + pack"} <= set(steps)
    assert "code quality" in [s["step"] for s in manifest["outputs"]["funnel"]["package_code"]]
    code = manifest["metrics"]["package_code"]
    assert code["too_short"] > 0   # real packages have near-empty __init__.py files
    out = manifest_path(cfg.run_root, "curate").parent
    rejects = [json.loads(r) for r in (out / "rejects/package_code/bad_input.jsonl").read_text().splitlines()]
    assert rejects and {r["reason"] for r in rejects} <= set(code["bad_input_reasons"]) | {"too_short"}
    total = sum(d["tokens"] for d in manifest["outputs"]["datasets"])
    documents = sum(d["documents"] for d in manifest["outputs"]["datasets"])
    assert manifest["result"] == {"manifest": str(manifest_path(cfg.run_root, "curate")), "documents": documents,
                                  "tokens": total}


def test_mlflow_run_has_metrics_funnel_and_manifest(curated, mlflow_db):
    import mlflow

    cfg, manifest = curated
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    experiment = client.get_experiment_by_name("test-curate")
    run = client.search_runs([experiment.experiment_id], filter_string="tags.`seekflow.stage` = 'curate'")[0]
    code = manifest["metrics"]["package_code"]
    assert run.data.metrics["package_code.documents"] == code["documents"]
    assert run.data.metrics["package_metadata.tokens"] == manifest["metrics"]["package_metadata"]["tokens"]
    assert run.data.metrics["package_code.near_duplicates"] == code["near_duplicates"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "rejects", "funnel.png", "funnel.json"} <= artifacts


def test_rerun_with_same_config_skips(curated, capsys):
    cfg, manifest = curated
    bin_path = manifest["outputs"]["datasets"][0]["prefix"] + ".bin"
    mtime = os.stat(bin_path).st_mtime_ns
    assert curate.run(cfg) == manifest
    assert "already done" in capsys.readouterr().out
    assert os.stat(bin_path).st_mtime_ns == mtime
