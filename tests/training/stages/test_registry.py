"""The model registry: register and eval-gated promotion with aliases (candidate → staging → champion), against a
real `mlflow server` (sqlite store) whose artifacts land on a real S3-compatible server (SeaweedFS).

One tiny model is trained once for the module; versions are registered from copies of its release checkpoint through
the real register stage, and their `seekflow.eval.*` tags are set with MlflowClient so that the numbers the gate sees
are chosen by each test.
"""
from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.support.processes import free_port, run_training
from tests.support.micro import VOCAB
from training.config import ConfigError, PipelineConfig, PromoteConfig, resolve_stage_config
from training.config import GateRule
from training.promotion import PromoteError, decide
from training.registry import RegistryError
from training.stages import promote

GOOD = {"perplexity.stdlib_code": 40.0, "perplexity.stdlib_docstrings": 60.0, "humaneval.pass_at_1": 0.1,
        "fim.exact_match": 0.2, "passkey.accuracy": 0.5, "arith.accuracy": 0.3}


# ------------------------------------------------------------------------------------------------------ config --
def test_default_gates_cover_what_evaluate_produces():
    cfg = PromoteConfig()
    gates = {g.metric: g for g in cfg.gates}
    assert set(gates) == set(GOOD)
    assert not gates["perplexity.stdlib_code"].higher_is_better and gates["humaneval.pass_at_1"].higher_is_better
    assert (gates["arith.accuracy"].min, gates["arith.accuracy"].max) == (0.0, 1.0)
    assert cfg.allow_first_champion and not cfg.fail_on_refusal and cfg.version is None
    pipeline = PipelineConfig.model_validate({"run_root": "/tmp/r", "promote": {"fail_on_refusal": True}})
    stage = pipeline.stage("promote")
    assert isinstance(stage, PromoteConfig) and stage.run_root == "/tmp/r" and stage.fail_on_refusal


def test_gate_accepts_the_mlflow_metric_name():
    assert GateRule(metric="eval/humaneval/pass_at_1", higher_is_better=True).metric == "humaneval.pass_at_1"


@pytest.mark.parametrize("override,message", [
    ({"gates": [{"metric": "arith.accuracy", "higher_is_better": True, "max_regression": -0.1}]},
     "gates.0.max_regression"),
    ({"gates": [{"metric": "arith.accuracy", "higher_is_better": True, "min": 0.5, "max": 0.2}]}, "exceeds max"),
    ({"gates": [{"metric": "arith.accuracy", "higher_is_better": True}] * 2}, "each metric may appear once"),
    ({"gates": []}, "gates"),
    ({"gates": [{"metric": "accuracy", "higher_is_better": True}]}, "gates.0.metric"),
    ({"version": "models:/x/1"}, "version"),
])
def test_invalid_settings_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_stage_config("promote", "tiny", overrides=override)


# -------------------------------------------------------------------------------------------- the gate, alone --
GATES = [GateRule(metric="perplexity.stdlib_code", higher_is_better=False, max_regression=0.5, min=1.0),
         GateRule(metric="humaneval.pass_at_1", higher_is_better=True, max_regression=0.02, min=0.0, max=1.0)]


def _values(ppl, pass1):
    return {"perplexity.stdlib_code": ppl, "humaneval.pass_at_1": pass1}


@pytest.mark.parametrize("candidate,champion,allow_first,decision,aliases,reason", [
    (_values(10, 0.1), None, True, "champion", ("staging", "champion"), "no champion yet"),
    (_values(10, 0.1), None, False, "staging", ("staging",), "allow_first_champion is false"),
    (_values(0.5, 0.1), None, True, "refused", (), "perplexity.stdlib_code = 0.5 below min 1"),
    (_values(10, 1.5), _values(10, 0.1), True, "refused", (), "humaneval.pass_at_1 = 1.5 above max 1"),
    (_values(10.5, 0.08), _values(10, 0.1), True, "champion", ("staging", "champion"), "not worse"),   # at the edge
    (_values(10.6, 0.1), _values(10, 0.1), True, "refused", (), "perplexity.stdlib_code 10.6 vs champion 10"),
    (_values(9, 0.07), _values(10, 0.1), True, "refused", (), "humaneval.pass_at_1 0.07 vs champion 0.1"),
    (_values(9, 0.5), {"perplexity.stdlib_code": 10}, True, "champion", ("staging", "champion"),
     "humaneval.pass_at_1 not compared"),
])
def test_decide(candidate, champion, allow_first, decision, aliases, reason):
    d = decide(GATES, candidate, champion, None if champion is None else "3", allow_first)
    assert (d.decision, d.aliases) == (decision, aliases)
    assert reason in d.reason
    assert set(d.compared) == {"perplexity.stdlib_code", "humaneval.pass_at_1"}
    row = d.compared["perplexity.stdlib_code"]
    assert row["candidate"] == candidate["perplexity.stdlib_code"] and row["max_regression"] == 0.5
    assert row["champion"] == (champion or {}).get("perplexity.stdlib_code")


# ------------------------------------------------------------------------------ bad input without any server --
def test_unreachable_tracking_server_fails_fast(tmp_path):
    cfg = _promote_cfg(tmp_path, f"http://127.0.0.1:{free_port()}", "seekflow-x", version="1")
    began = time.time()
    with pytest.raises(RegistryError, match="tracking server .* is unreachable"):
        promote.run(cfg)
    assert time.time() - began < 10
    assert not (tmp_path / "promote" / "manifest.json").exists()


def test_missing_sqlite_registry_is_refused_without_creating_it(tmp_path):
    cfg = _promote_cfg(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", "seekflow-x", version="1")
    with pytest.raises(RegistryError, match="no MLflow registry"):
        promote.run(cfg)
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------------------------- against a real server --
@pytest.fixture(scope="module")
def trained(one_process_run):
    """A run root with a finished pretrain (micro preset, 4 steps): manifest + release checkpoint. Read-only."""
    return one_process_run


@pytest.fixture()
def server(mlflow_s3_server):
    import mlflow

    yield mlflow_s3_server
    mlflow.set_tracking_uri(None)


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server["uri"], registry_uri=server["uri"])


def _register(trained, run_root, server, name, copy: str | None = None) -> str:
    """A new version of `name` through the real register stage (a copy of the release is a new checkpoint, so a
    new lineage); returns the version."""
    from training.stages import register

    (run_root / "pretrain").mkdir(parents=True, exist_ok=True)
    shutil.copy(trained / "pretrain" / "manifest.json", run_root / "pretrain" / "manifest.json")
    overrides = {"run_root": str(run_root), "tracking.uri": server["uri"], "model_name": name, "export_hf": False}
    if copy:
        target = run_root / "releases" / copy
        shutil.copytree(trained / "pretrain" / "release", target)
        overrides["checkpoint"] = str(target)
    manifest = register.run(resolve_stage_config("register", "tiny", overrides=overrides))
    return manifest["result"]["version"]


def _tag(client, name, version, **metrics):
    for metric, value in metrics.items():
        client.set_model_version_tag(name, version, f"seekflow.eval.{metric}", f"{value:.6g}")


def _promote_cfg(run_root, uri, name=None, **extra) -> PromoteConfig:
    overrides = {"run_root": str(run_root), "tracking.uri": uri, **({"model_name": name} if name else {}), **extra}
    return resolve_stage_config("promote", "tiny", overrides=overrides)


def _promote(run_root, server, name=None, **extra) -> dict:
    return promote.run(_promote_cfg(run_root, server["uri"], name, **extra))["result"]


def _aliases(client, name) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _snapshot(client) -> dict:
    """Everything a promotion could change: every model's aliases and every version's tags, plus the run count."""
    state = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        state[model.name] = (_aliases(client, model.name),
                             {str(v.version): client.get_model_version(model.name, v.version).tags for v in versions})
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {"models": state, "runs": len(client.search_runs(experiments, max_results=1000))}


def _bucket_keys(server, prefix="mlflow/") -> list[str]:
    pages = server["client"].get_paginator("list_objects_v2").paginate(Bucket=server["bucket"], Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.mark.slow
def test_register_puts_the_checkpoint_on_s3_and_is_idempotent(trained, tmp_path, server):
    client = _client(server)
    first = _register(trained, tmp_path, server, "seekflow-reg")
    version = client.get_model_version("seekflow-reg", first)
    assert first == "1" and _aliases(client, "seekflow-reg") == {"candidate": "1"}
    assert version.tags["seekflow.lineage_key"] and version.source.startswith("mlflow-artifacts:/")
    assert len(version.tags["seekflow.release_sha256"]) == 64   # what every download must match
    keys = _bucket_keys(server)
    run_prefix = f"mlflow/{client.get_run(version.run_id).info.experiment_id}/{version.run_id}/artifacts/checkpoint/"
    assert {run_prefix + f for f in ("metadata.json", "seekflow_model.json", "common.pt", "complete.json")} <= set(
        keys), keys[:20]

    again = _register(trained, tmp_path / "rerun", server, "seekflow-reg")   # same lineage, another run root
    assert again == first
    assert len(client.search_model_versions("name = 'seekflow-reg'")) == 1


@pytest.mark.slow
def test_promotion_gates_champion_and_loads_by_alias(trained, tmp_path, server):
    name, client = "seekflow-promo", _client(server)
    v1 = _register(trained, tmp_path, server, name)
    _tag(client, name, v1, **GOOD)

    # First champion: within the absolute bounds, no champion yet.
    first = _promote(tmp_path, server)          # model and version from the register manifest under run_root
    assert (first["model_name"], first["version"], first["decision"], first["alias"]) == (name, v1, "champion",
                                                                                          "champion")
    assert first["previous_champion"] is None and "no champion yet" in first["reason"]
    assert _aliases(client, name) == {"candidate": v1, "staging": v1, "champion": v1}
    tags = client.get_model_version(name, v1).tags
    assert tags["seekflow.promotion.decision"] == "champion" and tags["seekflow.promotion.previous_champion"] == ""
    compared = json.loads(tags["seekflow.promotion.compared"])
    assert compared["humaneval.pass_at_1"] == {"candidate": 0.1, "champion": None, "max_regression": 0.02,
                                               "higher_is_better": True, "ok": True}
    run = client.get_run(tags["seekflow.promotion.run_id"])
    assert run.data.tags["seekflow.stage"] == "promote" and run.data.tags["seekflow.promotion.decision"] == "champion"
    assert run.data.metrics["candidate/perplexity.stdlib_code"] == 40.0
    decision_key = (f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/promotion/decision.json")
    assert decision_key in _bucket_keys(server)      # the stage's artifacts went through the server into the bucket
    manifest = json.loads((tmp_path / "promote" / "manifest.json").read_text())
    assert manifest["result"] == first and manifest["outputs"]["mlflow_run_id"] == run.info.run_id

    # Re-running for the same version changes nothing, not even a new MLflow run.
    before = _snapshot(client)
    assert _promote(tmp_path, server) == first
    assert _snapshot(client) == before

    # An equal-or-better candidate (perplexity a little worse, within max_regression) becomes champion.
    v2 = _register(trained, tmp_path, server, name, copy="v2")
    _tag(client, name, v2, **{**GOOD, "perplexity.stdlib_code": 40.4, "humaneval.pass_at_1": 0.2})
    second = _promote(tmp_path, server)
    assert (second["version"], second["decision"], second["previous_champion"]) == (v2, "champion", v1)
    assert second["compared"]["perplexity.stdlib_code"] == {"candidate": 40.4, "champion": 40.0,
                                                            "max_regression": 0.5, "higher_is_better": False,
                                                            "ok": True}
    assert _aliases(client, name) == {"candidate": v2, "staging": v2, "champion": v2}
    assert client.get_model_version(name, v2).tags["seekflow.promotion.previous_champion"] == v1

    # A worse candidate is refused: no new alias, the champion (and staging) stay where they were.
    v3 = _register(trained, tmp_path, server, name, copy="v3")
    _tag(client, name, v3, **{**GOOD, "humaneval.pass_at_1": 0.1, "arith.accuracy": 0.1})
    third = _promote(tmp_path, server, version="candidate")
    assert (third["version"], third["decision"], third["alias"], third["champion"]) == (v3, "refused", "candidate",
                                                                                        v2)
    assert "worse than champion v2" in third["reason"] and "humaneval.pass_at_1 0.1 vs champion 0.2" in third["reason"]
    assert "arith.accuracy 0.1 vs champion 0.3" in third["reason"]
    assert not third["compared"]["arith.accuracy"]["ok"] and third["compared"]["fim.exact_match"]["ok"]
    assert _aliases(client, name) == {"candidate": v3, "staging": v2, "champion": v2}
    v3_tags = client.get_model_version(name, v3).tags
    assert v3_tags["seekflow.promotion.decision"] == "refused" and v3_tags["seekflow.promotion.previous_champion"] == v2

    # With fail_on_refusal the CLI exits non-zero with the reason, and the registry stays as it was.
    before = _snapshot(client)
    out = run_training("promote", "--preset", "tiny", "--set", f"run_root={tmp_path}", "--set",
                       f"tracking.uri={server['uri']}", "--set", "fail_on_refusal=true", "--set", f"version={v3}")
    assert out.returncode != 0 and "PromotionRefused" in out.stderr and "worse than champion v2" in out.stderr
    assert _snapshot(client) == before

    # A candidate outside the absolute bounds gets no alias at all.
    v4 = _register(trained, tmp_path, server, name, copy="v4")
    _tag(client, name, v4, **{**GOOD, "fim.exact_match": 1.7})
    fourth = _promote(tmp_path, server)
    assert (fourth["decision"], fourth["alias"]) == ("refused", "candidate")
    assert "fim.exact_match = 1.7 above max 1" in fourth["reason"]
    assert _aliases(client, name) == {"candidate": v4, "staging": v2, "champion": v2}

    # The champion loads by alias: resolve, download from S3 through the server, check the release directory.
    import mlflow

    from training.registry import download_release, resolve_version
    from training.model.release import check_release, read_model_config

    mlflow.set_tracking_uri(server["uri"])
    champion = resolve_version(client, f"models:/{name}@champion")
    assert champion.version == v2
    release = check_release(download_release(champion, tmp_path / "downloads"))
    assert read_model_config(release).vocab_size == VOCAB


@pytest.mark.slow
def test_bad_input_changes_nothing_in_the_registry(trained, tmp_path, server):
    client = _client(server)
    version = _register(trained, tmp_path, server, "seekflow-bad")
    _tag(client, "seekflow-bad", version, **{k: v for k, v in GOOD.items() if k != "passkey.accuracy"})
    if not client.search_registered_models("name = 'seekflow-empty'"):
        client.create_registered_model("seekflow-empty")
    before = _snapshot(client)
    cases = [   # the registry refuses the reference; the gate, a version it cannot gate
        (dict(name="seekflow-bad", version="7"), RegistryError, "seekflow-bad has no version 7 \\(versions: 1\\)"),
        (dict(name="seekflow-bad", version="champion"), RegistryError,
         "no alias 'champion' \\(aliases: candidate=v1\\)"),
        (dict(name="seekflow-bad", version=version), PromoteError, "seekflow.eval.passkey.accuracy is missing"),
        (dict(name="seekflow-empty"), RegistryError, "'seekflow-empty' has no versions"),
        (dict(name="seekflow-nope", version="1"), RegistryError, "no registered model 'seekflow-nope'"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            _promote(tmp_path, server, **args)
        assert _snapshot(client) == before, args
        assert not (tmp_path / "promote" / "manifest.json").exists()

    _tag(client, "seekflow-bad", version, **{"passkey.accuracy": float("nan")})
    before = _snapshot(client)
    with pytest.raises(PromoteError, match="passkey.accuracy = 'nan' is not a finite number"):
        _promote(tmp_path, server, name="seekflow-bad", version=version)
    assert _snapshot(client) == before
