"""Training checkpoints in `train_state/`: written atomically, verified on load.

A checkpoint is one file, `step_00000100.pt`: a line holding the SHA-256 of the payload, then
the payload (`torch.save` of the state). It is written under a temporary name, flushed to disk
and renamed, so a kill at any moment leaves either the old set of checkpoints or the new one.
The last `keep` checkpoints are kept; on resume a truncated or corrupted one is reported and
the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from stagewise.errors import StagewiseError

_NAME = re.compile(r"step_(\d{8})\.pt")


def save(directory: Path, step: int, state: dict, keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = directory / f"step_{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    with os.fdopen(fd, "wb") as f:
        f.write(digest + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in checkpoints(directory)[keep:]:
        old.unlink()
    return path


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)), reverse=True)


def load(path: Path) -> dict:
    """The state in one checkpoint file; StagewiseError if it is truncated or corrupted."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StagewiseError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    digest, _, payload = raw.partition(b"\n")
    if len(digest) != 64 or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise StagewiseError(f"{path}: checkpoint is truncated or corrupted (checksum mismatch)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def load_latest(directory: Path, warn: Callable[[str], None] = print) -> dict | None:
    """The newest checkpoint that verifies, or None when there is none."""
    for path in checkpoints(directory):
        try:
            return load(path)
        except StagewiseError as e:
            warn(f"warning: {e}; trying the previous checkpoint")
    return None
