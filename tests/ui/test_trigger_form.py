"""The Airflow UI in a real browser: the pipeline's trigger form (generated from the config schemas) refuses
out-of-bounds values with the form's error, and a filled-in form starts a run whose stages get the form's values
and succeed, as far as `curate` (then the run is stopped: `dag.test()` in tests/dags covers the rest of the
pipeline, and each stage's tasks run the same way under the scheduler as `curate` does).

Debian's chromium driven by playwright, against `airflow standalone` and a real MLflow server. A failure leaves a
screenshot and the page's HTML in the test's tmp dir.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.parse

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DAG_ID = "seekflow_pipeline"
SOURCES = [{"kind": "package_metadata", "max_documents": 40}, {"kind": "package_code", "max_documents": 40}]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(840)]


def _unavailable(message):
    """CI must run this test (.ci/run installs chromium, the dev extra playwright); elsewhere it may be skipped."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def page():
    """A fresh chromium page (checked before the servers start, so a missing browser costs nothing)."""
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run installs it when missing)")
    try:
        from playwright import sync_api
    except ImportError:
        _unavailable("playwright missing: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        page = context.new_page()
        page.set_default_timeout(90_000)   # the api-server can stall for 30-40 s on a loaded 2-core machine
        try:
            yield page
        finally:
            browser.close()


@contextlib.contextmanager
def evidence(page, tmp_path, name):
    """On failure: a screenshot and the HTML of the page, named after the step, in the test's tmp dir."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
            (tmp_path / f"{name}.html").write_text(page.content())
        print(f"screenshot: {tmp_path / f'{name}.png'}")
        raise


def log_in(page, airflow):
    page.goto(f"{airflow.url}/dags/{DAG_ID}")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(airflow.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/dags/{DAG_ID}**")


def open_trigger_form(page, airflow):
    page.goto(f"{airflow.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    field(page, "steps").wait_for()
    return dialog


def field(page, key):
    """A form field by its Param key (the config's dotted path): the UI names inputs `element_<key>` (JSON editors
    sit in a box with that id)."""
    return page.locator(f'input[name="element_{key}"]')


def open_section(dialog, name):
    dialog.get_by_role("button", name=name, exact=True).click()


def type_number(page, key, value):
    box = field(page, key)
    box.fill(str(value))
    box.press("Tab")   # leaving the field is when the form normalises it


def replace_json(page, editor, value):
    """Replace a JSON editor's (Monaco) text the way a person would: select all, paste. (Typing goes through the
    editor's auto-closing brackets and quotes.)"""
    page.evaluate("text => navigator.clipboard.writeText(text)", json.dumps(value))
    editor.locator(".view-lines").click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Control+V")


def submit(page, dialog):
    """Press the form's Trigger button; return the API's answer (status, body) and the conf the form sent."""
    with page.expect_response(lambda r: r.url.endswith(f"/dags/{DAG_ID}/dagRuns") and r.request.method == "POST"
                              ) as answer:
        dialog.get_by_role("button", name="Trigger").click()
    response = answer.value
    return response.status, response.json(), json.loads(response.request.post_data)["conf"]


def form_error(dialog) -> str:
    alert = dialog.get_by_text("Invalid input for param").first
    alert.wait_for()
    return alert.inner_text()


def dag_runs(airflow) -> list[dict]:
    status, body = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns")
    assert status == 200, body
    return body["dag_runs"]


def test_out_of_bounds_values_show_the_forms_error_and_start_nothing(page, airflow_standalone, tmp_path):
    airflow = airflow_standalone
    runs_before = dag_runs(airflow)
    with evidence(page, tmp_path, "out_of_bounds"):
        log_in(page, airflow)

        # A number below the schema's minimum never leaves the browser: the field snaps back to the bound.
        dialog = open_trigger_form(page, airflow)
        type_number(page, "steps", 0)
        assert field(page, "steps").input_value() == "1"

        # steps = 0 through the form's configuration JSON reaches the server, which refuses it by the Param schema.
        open_section(dialog, "Advanced Options")
        _, details = airflow.api("GET", f"/dags/{DAG_ID}/details")
        conf = {key: param["value"] for key, param in details["params"].items()}
        replace_json(page, dialog.locator(".monaco-editor").last, {**conf, "steps": 0})
        dialog.get_by_text("Configuration JSON").click()   # leave the editor: the form takes the JSON
        status, body, _ = submit(page, dialog)
        assert status == 400, body
        message = form_error(dialog)
        assert message.startswith("Invalid input for param steps: 0 is less than the minimum of 1"), message

        # An exclusive bound (lr > 0) is the server's to enforce: typed in its field, it shows the form's error.
        dialog = open_trigger_form(page, airflow)
        open_section(dialog, "pretrain: optimizer")
        type_number(page, "pretrain.optimizer.lr", 0)
        status, body, _ = submit(page, dialog)
        assert status == 400, body
        message = form_error(dialog)
        assert message.startswith(
            "Invalid input for param pretrain.optimizer.lr: 0 is less than or equal to the minimum of 0"), message

    assert dag_runs(airflow) == runs_before   # nothing was started


def test_filled_form_starts_a_run_that_curates_with_the_forms_values(page, airflow_standalone, tmp_path):
    airflow = airflow_standalone
    with evidence(page, tmp_path, "trigger"):
        log_in(page, airflow)
        dialog = open_trigger_form(page, airflow)
        field(page, "steps").fill("10")
        open_section(dialog, "curate")
        replace_json(page, page.locator('[id="element_curate.sources"] .monaco-editor'), SOURCES)
        open_section(dialog, "pretrain: train")
        type_number(page, "pretrain.train.log_interval", 5)
        type_number(page, "pretrain.train.save_interval", 5)
        open_section(dialog, "pretrain: optimizer")
        type_number(page, "pretrain.optimizer.warmup_steps", 2)   # warm-up must stay below the 10 steps
        status, run, conf = submit(page, dialog)
        assert status == 200, run
    assert conf["profile"] == "tiny" and conf["steps"] == 10 and conf["curate.sources"] == SOURCES, conf
    assert conf["pretrain.optimizer.warmup_steps"] == 2 and conf["pretrain.train.save_interval"] == 5, conf

    run_path = f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"
    deadline, tasks, state = time.time() + 420, {}, None
    while time.time() < deadline:   # until the curate stages have succeeded and pretrain has started
        _, body = airflow.api("GET", run_path)
        state = body.get("state") if isinstance(body, dict) else None
        _, body = airflow.api("GET", f"{run_path}/taskInstances")
        if isinstance(body, dict):   # no answer even after waiting: keep the last known states, poll again
            tasks = {ti["task_id"]: ti["state"] for ti in body.get("task_instances", [])}
        if state == "failed" or "failed" in tasks.values() or tasks.get("pretrain") in ("running", "success"):
            break
        time.sleep(3)
    stopped, _ = airflow.api("PATCH", run_path, {"state": "failed"})   # the tasks after curate are not under test
    assert stopped == 200, stopped
    if state == "failed" or "failed" in tasks.values() or tasks.get("pretrain") not in ("running", "success"):
        logs = {t: airflow.api.log_entries(run["dag_run_id"], t, 1) for t, s in tasks.items() if s == "failed"}
        lines = {t: [line for _, entry in entries for line in entry][-30:] for t, entries in logs.items()}
        pytest.fail(f"run {state}: {tasks}\n{json.dumps(lines, indent=1)}\n{airflow.log_tail(60)}")
    assert {t: tasks[t] for t in ("validate_config", "curate_shards", "curate")} == {
        t: "success" for t in ("validate_config", "curate_shards", "curate")}, tasks

    # The form's values reached the config: validate_config's XCom carries them as overrides.
    validated = airflow.api.xcom(run["dag_run_id"], "validate_config")
    overrides = validated["overrides"]
    assert overrides["pretrain.train.steps"] == 10 and overrides["pretrain.optimizer.warmup_steps"] == 2
    assert overrides["curate.sources"] == SOURCES and "pretrain.optimizer.lr" not in overrides
