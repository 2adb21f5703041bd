"""Torn checkpoints are skipped: the `latest` marker naming an incomplete save, or a save with a truncated file, makes
the loader fall back (with a warning) to the newest complete older checkpoint, or to a fresh start."""
from __future__ import annotations

import json

import pytest

from tests.support.micro import pretrain, write_corpus
from training import checkpoint, integrity


def _fake_save(root, step, files=None, complete=True):
    target = checkpoint.step_dir(root, step)
    target.mkdir(parents=True)
    files = files or {"metadata.json": b"{}", "__0_0.distcp": b"x" * 100}
    for name, data in files.items():
        (target / name).write_bytes(data)
    if complete:
        integrity.seal(target, step=step)
    return target


def test_complete_checkpoint_is_chosen(tmp_path):
    _fake_save(tmp_path, 2)
    _fake_save(tmp_path, 4)
    (tmp_path / "latest").write_text("4")
    assert checkpoint.latest_step(tmp_path) == 4
    assert checkpoint.latest_step(tmp_path / "nothing") is None


def test_truncated_file_falls_back_to_older(tmp_path, capsys):
    _fake_save(tmp_path, 2)
    newest = _fake_save(tmp_path, 4)
    (tmp_path / "latest").write_text("4")
    with open(newest / "__0_0.distcp", "r+b") as f:
        f.truncate(37)
    assert checkpoint.latest_step(tmp_path) == 2
    err = capsys.readouterr().err
    assert "skipping torn checkpoint: iter_0000004/__0_0.distcp has 37 bytes, 100 when saved" in err
    assert "resuming from step 2" in err


def test_marker_naming_incomplete_or_missing_save(tmp_path, capsys):
    _fake_save(tmp_path, 2)
    _fake_save(tmp_path, 4, complete=False)   # the save died before complete.json
    _fake_save(tmp_path, 6)                   # newer than the marker: never trusted
    (tmp_path / "latest").write_text("4")
    assert checkpoint.latest_step(tmp_path) == 2
    assert "iter_0000004 has no complete.json" in capsys.readouterr().err
    (tmp_path / "latest").write_text("8")     # names a directory that is gone: the newest complete older one
    assert checkpoint.latest_step(tmp_path) == 6


def test_nothing_complete_starts_fresh(tmp_path, capsys):
    target = _fake_save(tmp_path, 2)
    (target / "metadata.json").unlink()
    (tmp_path / "latest").write_text("2")
    assert checkpoint.latest_step(tmp_path) is None
    err = capsys.readouterr().err
    assert "iter_0000002/metadata.json is missing" in err and "starting fresh" in err


@pytest.mark.slow
def test_pretrain_resumes_from_older_checkpoint_when_newest_is_truncated(tmp_path):
    write_corpus(tmp_path)
    first = pretrain(tmp_path, 4)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpts = tmp_path / "pretrain" / "checkpoints"
    assert json.loads((ckpts / "iter_0000004" / checkpoint.COMPLETE).read_text())["step"] == 4
    shard = max((ckpts / "iter_0000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:   # a hand-truncated shard
        f.truncate(shard.stat().st_size // 2)

    longer = pretrain(tmp_path, 6)
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert "skipping torn checkpoint: iter_0000004" in longer.stderr
    assert "resumed from step 2 (8 samples consumed)" in longer.stdout
    assert "step 3/6" in longer.stdout and "step 2/6" not in longer.stdout
