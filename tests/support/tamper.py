"""What someone with write access to the object store or to MLflow's artifacts can do to a saved checkpoint, for the
tests that show such a checkpoint is refused before anything unpickles a byte of it (training/integrity.py)."""
from __future__ import annotations

import pathlib
import pickle
from pathlib import Path


class _Touch:
    """Unpickling this runs code: it creates the file `path` (pathlib.Path.touch)."""

    def __init__(self, path: Path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def malicious_pickle(marker: Path, size: int | None = None) -> bytes:
    """A pickle that creates `marker` when loaded, padded to exactly `size` bytes when given: pickle stops reading at
    its STOP opcode, so the padding is never read, and a same-size file passes any size check."""
    data = pickle.dumps(_Touch(marker), protocol=4)
    if size is not None:
        assert len(data) <= size, (len(data), size)
        data += b"\0" * (size - len(data))
    return data


def plant_metadata(directory: Path, marker: Path, same_size: bool = True) -> Path:
    """Replace dist_checkpointing's `.metadata` (read with pickle.load) by `malicious_pickle`; returns its path."""
    target = Path(directory) / ".metadata"
    target.write_bytes(malicious_pickle(marker, target.stat().st_size if same_size else None))
    return target


def flip_byte(path: Path, offset: int | None = None) -> Path:
    """Invert one byte of `path` (the middle one by default): same size, other content."""
    data = bytearray(Path(path).read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    return Path(path)


def largest(directory: Path, pattern: str = "*.distcp") -> Path:
    return max(Path(directory).glob(pattern), key=lambda p: p.stat().st_size)
