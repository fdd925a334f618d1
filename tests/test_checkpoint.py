"""Checkpoints: atomic files, verified on load, the previous one used when the newest is damaged."""

import pytest
import torch

from stagewise import checkpoint
from stagewise.errors import StagewiseError


def test_save_load_keeps_the_last_two(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))})
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000030.pt", "step_00000020.pt"]
    state = checkpoint.load_latest(tmp_path)
    assert state["step"] == 30 and torch.equal(state["w"], torch.full((3,), 30.0))
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_refused_and_the_previous_one_loads(tmp_path, damage):
    checkpoint.save(tmp_path, 1, {"step": 1})
    newest = checkpoint.save(tmp_path, 2, {"step": 2, "w": torch.zeros(100)})
    raw = bytearray(newest.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-50] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with pytest.raises(StagewiseError, match="step_00000002.pt: checkpoint is truncated or corrupted"):
        checkpoint.load(newest)
    warnings = []
    assert checkpoint.load_latest(tmp_path, warn=warnings.append)["step"] == 1
    assert "truncated or corrupted" in warnings[0]


def test_no_checkpoint(tmp_path):
    assert checkpoint.load_latest(tmp_path / "none") is None
