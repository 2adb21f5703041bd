"""Pruning after a save (training/retention.py): the newest `keep_last` complete checkpoints stay, and so do the one
`latest` names and the newest complete one, whatever torn directories lie around; steps compare as numbers."""
from __future__ import annotations

from training import checkpoint, integrity, retention, storage


def _save(root, name, complete=True):
    target = root / name
    target.mkdir(parents=True)
    (target / "__0_0.distcp").write_bytes(b"x" * 10)
    if complete:
        integrity.seal(target)
    return target


def _left(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_steps_are_numbers_not_names():
    names = ["iter_0000010", "iter_100", "iter_9999999", "iter_10000000", "iter_x", "latest", "iter_"]
    assert retention.steps(names) == {10: ["iter_0000010"], 100: ["iter_100"], 9999999: ["iter_9999999"],
                                      10000000: ["iter_10000000"]}
    # lexicographically iter_10000000 < iter_9999999 and iter_0000010 < iter_100 < iter_9999999: by number, the
    # newest two are 9999999 and 10000000
    assert retention.retained(retention.steps(names), retention.steps(names), None, 2) == {9999999, 10000000}


def test_retained_keeps_latest_and_the_newest_complete():
    saved = [2, 4, 6, 8, 10]
    assert retention.retained(saved, {2, 4, 6}, latest=4, keep_last=1) == {4, 6}   # 6: the newest complete
    assert retention.retained(saved, {2, 4}, latest=4, keep_last=1) == {4}          # 6, 8, 10 are torn
    assert retention.retained(saved, {2, 4, 6}, latest=8, keep_last=2) == {4, 6, 8}  # even a torn `latest`
    assert retention.retained(saved, set(), latest=None, keep_last=2) == set()


def test_torn_newer_directories_never_push_out_what_latest_names(tmp_path, capsys):
    # What a crash leaves: saves 6 and 8 died before their complete.json; `latest` still names 4.
    _save(tmp_path, "iter_0000002")
    _save(tmp_path, "iter_0000004")
    _save(tmp_path, "iter_0000006", complete=False)
    _save(tmp_path, "iter_0000008", complete=False)
    (tmp_path / "latest").write_text("4")
    retention.prune(tmp_path, keep_last=1, remote=None)   # by position this deleted 2, 4 and 6: `latest` lost
    assert _left(tmp_path) == ["iter_0000004"]
    assert checkpoint.latest_step(tmp_path) == 4


def test_keep_last_counts_complete_saves_in_numeric_order(tmp_path):
    for name in ("iter_0000010", "iter_100", "iter_0000050"):
        _save(tmp_path, name)
    _save(tmp_path, "iter_0000200", complete=False)
    (tmp_path / "latest").write_text("100")
    retention.prune(tmp_path, keep_last=2, remote=None)
    assert _left(tmp_path) == ["iter_0000050", "iter_100"]


class _FakeBucket:
    """storage's remote calls over a dict of object keys (the local mirror stays real)."""

    def __init__(self, keys, monkeypatch):
        self.keys = set(keys)
        real_read = storage.read_text
        monkeypatch.setattr(storage, "children", lambda uri: sorted(
            {k[len(uri) + 1:].split("/")[0] for k in self.keys if k.startswith(uri + "/")}))
        monkeypatch.setattr(storage, "exists", lambda uri: any(k == uri or k.startswith(uri + "/") for k in self.keys))
        monkeypatch.setattr(storage, "read_text", lambda uri: (
            ("4" if uri in self.keys else None) if uri.startswith("s3://") else real_read(uri)))
        monkeypatch.setattr(storage, "delete", lambda uri: self.keys.difference_update(
            {k for k in self.keys if k == uri or k.startswith(uri + "/")}))


def test_remote_pruning_keeps_what_the_remote_latest_names(tmp_path, monkeypatch):
    remote = "s3://bucket/run/pretrain/checkpoints"
    complete = [f"{remote}/iter_{s:07d}/{f}" for s in (2, 4) for f in ("__0_0.distcp", "complete.json")]
    torn = [f"{remote}/iter_{s:07d}/__0_0.distcp" for s in (6, 8)]    # uploads of saves that never completed
    bucket = _FakeBucket([f"{remote}/latest", *complete, *torn], monkeypatch)
    retention.prune(tmp_path, keep_last=1, remote=remote)   # the remote latest reads "4"
    assert storage.children(remote) == ["iter_0000004", "latest"], sorted(bucket.keys)
