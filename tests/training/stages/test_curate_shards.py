"""Curation as shard i of N plus a merge: any N keeps the same documents, fill-in-the-middle documents included
(the code source turns half its documents into FIM, half of those SPM); shard jobs read their index from the
environment exactly as a Kubernetes Indexed Job sets it."""
import json

import pytest

from training.config import CurateConfig
from training.stages import curate


def _config(run_root, mlflow_db, shards, documents=(40, 60)):
    return CurateConfig.model_validate({
        "run_root": str(run_root), "shards": shards,
        "tracking": {"uri": f"sqlite:///{mlflow_db}", "experiment": "test-shards"},
        "sources": [{"kind": "package_metadata", "weight": 0.6, "max_documents": documents[0]},
                    {"kind": "package_code", "weight": 0.4, "max_documents": documents[1], "max_file_bytes": 50_000,
                     "fim": {"rate": 0.5, "spm_rate": 0.5, "seed": 7}}]})


def _kept(manifest):
    return [(d["name"], d["documents"], d["tokens"], d["bin_sha256"]) for d in manifest["outputs"]["datasets"]]


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, mlflow_db):
    return curate.run(_config(tmp_path_factory.mktemp("one"), mlflow_db, 1))


def test_three_shard_jobs_then_merge_keep_what_one_shard_keeps(one_shard, tmp_path, mlflow_db, monkeypatch,
                                                                capsys):
    cfg = _config(tmp_path, mlflow_db, 3)
    monkeypatch.setenv(curate.SHARDS_ENV, "3")
    for index in (2, 0, 1):                             # Indexed Job pods finish in any order
        monkeypatch.setenv(curate.INDEX_ENV, str(index))
        result = curate.run(cfg)
        assert result["result"] == {"shard": index, "shards": 3}
        marker = json.loads((tmp_path / f"curate/shards/{index:04d}-of-0003/shard.json").read_text())
        assert marker["config_hash"] == result["config_hash"]
    assert not (tmp_path / "curate/manifest.json").exists()   # shards never write the stage manifest
    assert sorted(p.name for p in (tmp_path / "curate/shards").iterdir()) == [
        "0000-of-0003", "0001-of-0003", "0002-of-0003"]

    monkeypatch.delenv(curate.SHARDS_ENV)
    monkeypatch.delenv(curate.INDEX_ENV)
    capsys.readouterr()
    three = curate.run(cfg)                              # the merge job: shards are done, so it only merges
    assert capsys.readouterr().out.count("already done, skipping") == 3
    assert _kept(three) == _kept(one_shard)              # same documents, same tokens, byte-identical .bin files
    assert three["metrics"]["tokens"] == one_shard["metrics"]["tokens"]
    assert three["metrics"]["shards"] == 3
    for kind in ("package_metadata", "package_code"):   # the same items read and set aside as bad input
        for key in ("read", "bad_input_reasons", "too_short", "near_duplicates", "documents", "tokens", "fim"):
            assert three["metrics"][kind][key] == one_shard["metrics"][kind][key], (kind, key)


def test_fim_documents_are_counted_and_packed(one_shard):
    """Every mode occurs, the counts add up to the kept documents, and the packed documents carry the sentinels."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from training import tokenizer as T
    from training.storage import local_dir

    code = next(d for d in one_shard["outputs"]["datasets"] if d["name"] == "package_code")
    counts = one_shard["metrics"]["package_code"]["fim"]
    assert code["fim"] == {"rate": 0.5, "spm_rate": 0.5, "seed": 7, "documents": counts}
    print(f"package_code FIM documents (rate 0.5, spm_rate 0.5): {counts}")
    assert sum(counts.values()) == code["documents"] and min(counts.values()) > 0, counts
    prose = one_shard["metrics"]["package_metadata"]
    assert prose["fim"] == {"psm": 0, "spm": 0, "none": prose["documents"]}   # no FIM on prose
    begin, hole, end = (T.token_id(t) for t in (T.FIM_BEGIN, T.FIM_HOLE, T.FIM_END))
    dataset = IndexedDataset(str(local_dir(code["prefix"], create=False)))
    docs = [dataset[i].tolist() for i in range(len(dataset))]
    assert all(doc[-1] == T.eod_id() for doc in docs)
    fim_docs = [doc for doc in docs if doc[0] == begin]
    assert len(fim_docs) == counts["psm"] + counts["spm"]
    assert all(doc.count(begin) == doc.count(hole) == doc.count(end) == 1 for doc in fim_docs)


def test_shard_environment_is_checked(tmp_path, mlflow_db, monkeypatch):
    cfg = _config(tmp_path, mlflow_db, 3)
    monkeypatch.setenv(curate.SHARDS_ENV, "4")
    monkeypatch.setenv(curate.INDEX_ENV, "0")
    with pytest.raises(curate.CurateError, match="SEEKFLOW_NUM_SHARDS=4 but the config says shards: 3"):
        curate.run(cfg)
    monkeypatch.setenv(curate.SHARDS_ENV, "3")
    monkeypatch.setenv(curate.INDEX_ENV, "3")
    with pytest.raises(curate.CurateError, match="JOB_COMPLETION_INDEX must be a shard index below 3"):
        curate.run(cfg)


def test_merge_refuses_a_missing_shard(tmp_path, mlflow_db, monkeypatch):
    cfg = _config(tmp_path, mlflow_db, 2, documents=(4, 4))
    monkeypatch.setenv(curate.SHARDS_ENV, "2")
    monkeypatch.setenv(curate.INDEX_ENV, "0")
    curate.run(cfg)
    from training.stages.curate import merge
    from training.config import config_hash

    with pytest.raises(curate.CurateError, match="shard 0001-of-0002 is missing"):
        merge(cfg, config_hash(cfg), json.loads((tmp_path / "curate/shards/0000-of-0002/shard.json").read_text())[
            "inputs"], started=0.0)
