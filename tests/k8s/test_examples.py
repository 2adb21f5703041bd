"""The example manifests in k8s/jobs/ are exactly what `render` produces, so they never drift from the backend."""
from __future__ import annotations

import importlib.util

import pytest
import yaml

from tests.support.k8s import REPO, validate_manifest

REGENERATE = "regenerate them: .venv/bin/python k8s/jobs/render_examples.py"


def examples_module():
    spec = importlib.util.spec_from_file_location("render_examples", REPO / "k8s/jobs/render_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLES = examples_module()


@pytest.mark.parametrize("file", sorted(EXAMPLES.EXAMPLES))
def test_checked_in_example_equals_render(file):
    path = REPO / "k8s/jobs" / file
    assert path.is_file(), f"k8s/jobs/{file} is missing; {REGENERATE}"
    text = path.read_text()
    # Render with the stage config the example carries, so a change in training's config defaults alone does not
    # count as drift of the renderer (that is the next test's business).
    config = EXAMPLES.embedded_config(yaml.safe_load(text))
    expected = EXAMPLES.render_examples({f: config for f in EXAMPLES.EXAMPLES})[file]
    assert text == expected, f"k8s/jobs/{file} differs from what render() produces; {REGENERATE}"
    validate_manifest(yaml.safe_load(text))


@pytest.mark.parametrize("file", sorted(EXAMPLES.EXAMPLES))
def test_example_carries_the_current_validated_stage_config(file):
    config = EXAMPLES.embedded_config(yaml.safe_load((REPO / "k8s/jobs" / file).read_text()))
    assert config == EXAMPLES.stage_configs()[file], f"k8s/jobs/{file}'s stage config is stale; {REGENERATE}"
