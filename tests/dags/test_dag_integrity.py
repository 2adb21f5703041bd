"""Every DAG file: imports cleanly within Airflow's parse timeout, pulls in no torch/megatron/mlflow, has tags, docs
and the expected tasks; placeholder DAGs fail loudly when run, never succeed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.processes import REPO

EXPECTED = {
    "seekflow_pipeline": ["validate_config", "curate_shards", "curate", "pretrain", "evaluate", "register", "promote",
                          "curate_code_shards", "curate_code", "code_cpt", "evaluate_code_cpt", "register_code_cpt",
                          "promote_code_cpt", "long_context", "evaluate_long_context", "register_long_context",
                          "promote_long_context", "sft", "evaluate_sft", "register_sft", "promote_sft"],
    "seekflow_curate": ["validate_config", "curate_shards", "curate"],
    "seekflow_pretrain": ["validate_config", "pretrain"],
    "seekflow_code_cpt": ["validate_config", "code_cpt"],
    "seekflow_long_context": ["validate_config", "long_context"],
    "seekflow_post_train": ["validate_config", "choose_recipe",
                            "sft", "evaluate_sft", "register_sft", "promote_sft",   # recipe sft
                            *(name for step in ("sft_cold_start", "grpo_reasoning", "sft_rejection", "grpo_all")
                              for name in (step, f"evaluate_{step}", f"register_{step}")),
                            "promote_grpo_all"],                                     # recipe r1
    "seekflow_distill": ["validate_config", "distill", "evaluate_distill", "register_distill", "promote_distill"],
    "seekflow_compress": ["validate_config", "compress", "evaluate_compress", "register_compress",
                          "promote_compress"],
    "seekflow_grpo": ["validate_config", "grpo"],
    "seekflow_evaluate": ["validate_config", "evaluate"],
    "seekflow_promote": ["validate_config", "promote"],
}
# Stage kinds whose DAG is named for the step of the pipeline they belong to (DESIGN: post_train runs sft, then GRPO).
DAG_OF = {"sft": "post_train"}
PLACEHOLDERS = [dag_id for dag_id, tasks in EXPECTED.items() if tasks[0].endswith("_not_implemented")]
DAG_FILES = sorted(p.name for p in (REPO / "dags").glob("*.py"))
# Airflow's `core.dagbag_import_timeout` default: past it the DAG processor kills the parse and the DAG disappears.
# Not a speed target (these machines are too noisy for one); the heavy-import check below is what keeps parsing cheap.
PARSE_LIMIT_S = 30.0

# As Airflow's DAG processor does: one process imports Airflow (`airflow.sdk` and the DagBag, timed apart), then
# parses each file in a child forked from it, so every file starts from the same modules and its own imports (heavy
# ones included) are its alone. The limit applies to the file's own parse time.
_PARSE = """
import json, os, sys, time
t0 = time.perf_counter()
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
airflow_import_s = time.perf_counter() - t0
for path in sys.argv[1:]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        t1 = time.perf_counter()
        bag = DagBag(dag_folder=path, safe_mode=False)
        parse_s = time.perf_counter() - t1
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "mlflow"))
        report = {"file": os.path.basename(path), "airflow_import_s": airflow_import_s, "parse_s": parse_s,
                  "errors": bag.import_errors, "dags": sorted(bag.dags), "heavy": heavy}
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(report))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as got:
        line = got.read()
    _, status = os.waitpid(pid, 0)
    print("REPORT", line if status == 0 else json.dumps({"file": os.path.basename(path), "crashed": status}),
          flush=True)
"""


@pytest.fixture(scope="module")
def parse_reports():
    out = subprocess.run([sys.executable, "-c", _PARSE, *(str(REPO / "dags" / name) for name in DAG_FILES)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.removeprefix("REPORT ") for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    reports = {r["file"]: r for r in map(json.loads, lines)}   # (Airflow may print other lines)
    assert sorted(reports) == DAG_FILES, out.stdout[-3000:]
    print(f"\nDAG file parse times (each forked after Airflow's import, "
          f"{next(iter(reports.values())).get('airflow_import_s', 0):.2f}s):")
    for name, r in reports.items():
        print(f"  {name:<24} parse {r.get('parse_s', float('nan')):.2f}s")
    return reports


@pytest.mark.parametrize("name", DAG_FILES)
def test_dag_file_parses_fast_with_no_heavy_imports(parse_reports, name):
    report = parse_reports[name]
    assert "crashed" not in report, report
    assert report["errors"] == {}, report["errors"]
    assert len(report["dags"]) == 1, report["dags"]
    assert report["heavy"] == [], f"{name} imports {report['heavy']} at parse time"
    assert report["parse_s"] < PARSE_LIMIT_S, f"{name} took {report['parse_s']:.2f}s to parse"


def test_every_stage_has_a_dag_and_nothing_else_is_there(dagbag):
    assert set(dagbag) == set(EXPECTED)


# register reads the pretrain stage's manifest under the run root it shares with it: the pipeline runs it.
PIPELINE_ONLY = {"register"}


def test_every_registered_stage_kind_has_its_dag_file():
    from training.config import STAGES

    for kind in set(STAGES) - PIPELINE_ONLY:
        dag = DAG_OF.get(kind, kind)
        assert (REPO / "dags" / f"{dag}.py").is_file(), f"stage {kind} has no dags/{dag}.py"
        # its DAG ends with the stage's own task, or starts with it (then gates its release; post_train: the first
        # task of its default recipe)
        tasks = EXPECTED[f"seekflow_{dag}"]
        assert kind == tasks[-1] or kind in tasks[1:3]
    from training.config import PIPELINE_CHAIN

    # the chain's order (a kind joins the end-to-end pipeline once PIPELINE_CHAIN lists it)
    assert [t for t in EXPECTED["seekflow_pipeline"] if not t.endswith("_shards")][1:] == list(PIPELINE_CHAIN)


@pytest.mark.parametrize("dag_id", EXPECTED)
def test_dag_has_tags_docs_and_the_expected_tasks(dagbag, dag_id):
    dag = dagbag[dag_id]
    assert dag.task_ids == EXPECTED[dag_id] or sorted(dag.task_ids) == sorted(EXPECTED[dag_id])
    assert "seekflow" in dag.tags and len(dag.tags) >= 2
    assert dag.doc_md and dag.doc_md.lstrip().startswith(dag_id)   # the docstring opens with the DAG's id
    assert dag.description
    assert dag.schedule is None or str(dag.timetable.summary) == "None"   # triggered by people, not the clock
    if dag_id not in PLACEHOLDERS:
        from training.config import RECIPES

        # a DAG of recipes branches after validate_config: each recipe's chain hangs from choose_recipe
        recipes = "choose_recipe" in dag.task_ids
        for chain in [["validate_config", "choose_recipe", *c] for c in RECIPES.values()] if recipes else [
                EXPECTED[dag_id]]:
            for upstream, downstream in zip(chain, chain[1:]):
                assert upstream in dag.get_task(downstream).upstream_task_ids, (upstream, downstream)
        assert {"profile", "backend", "overrides"} <= set(dag.params)
    else:
        assert "not-implemented" in dag.tags
        assert "not implemented" in dag.doc_md


@pytest.mark.slow
@pytest.mark.parametrize("dag_id", PLACEHOLDERS)
def test_placeholder_dag_fails_with_not_implemented(dagbag, capfd, dag_id):
    dagrun = dagbag[dag_id].test()
    stage = dag_id.removeprefix("seekflow_")
    states = {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}
    assert states == {f"{stage}_not_implemented": "failed"}, states
    assert str(dagrun.state) == "failed"
    out, err = capfd.readouterr()
    assert f"not implemented yet: {stage} (see " in out + err
