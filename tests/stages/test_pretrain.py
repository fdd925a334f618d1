"""Pre-training end to end on a tiny model: loss, weights, lineage, resume after SIGKILL,
torchrun data parallelism, and refusals of bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from stagewise.model import Transformer, weights_sha256
from stagewise.model_dir import is_model_dir, load_model_dir
from stagewise.stages import common, pretrain

SMOKE = ["--preset", "smoke"]


def smoke_config(*overrides):
    return common.resolve(pretrain.PretrainConfig, "pretrain", SimpleNamespace(preset="smoke", overrides=list(overrides)))


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "stagewise", *args], capture_output=True, text=True, **kwargs)


def test_pretrain_lowers_the_loss_changes_the_weights_and_records_lineage(tmp_path):
    cfg = smoke_config("max_steps=40", "log_every=5")
    out = pretrain.train(cfg, tmp_path / "base", log=lambda *a: None)
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[-1] < losses[0] - 1.0
    model, tokenizer, lineage = load_model_dir(out)
    torch.manual_seed(cfg.seed)
    fresh = Transformer(model.cfg)
    assert weights_sha256(model) != weights_sha256(fresh)
    (entry,) = lineage
    assert entry["method"] == "pretrain" and entry["stage"] == "pre-training" and entry["changes_weights"]
    assert entry["weights_sha256"] == weights_sha256(model)
    assert entry["config"]["max_steps"] == 40 and entry["parent"] is None
    assert {"heldout_loss", "fact_cloze", "tokens_seen"} <= set(entry["metrics"])
    assert len(entry["data_sha256"]) == 64
    assert not (out / "train_state").exists()
    assert tokenizer.encode("12") == [tokenizer.encode("1")[0], tokenizer.encode("2")[0]]  # digits split


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    args = ["pretrain", *SMOKE, "max_steps=300", "checkpoint_every=20", "eval_every=0", "log_every=50"]
    whole = cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stagewise", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "train_state").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_model_dir(killed), "the run finished before it could be killed"
    assert list((killed / "train_state").glob("step_*.pt"))

    refused = cli(*args, "--out", str(killed))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = cli(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    assert (killed / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    again = cli(*args, "--out", str(killed), "--resume")
    assert again.returncode == 0 and "already finished" in again.stdout


def test_resume_skips_a_corrupted_checkpoint(tmp_path):
    args = ["pretrain", *SMOKE, "max_steps=30", "checkpoint_every=10", "keep_train_state=true", "eval_every=0"]
    assert cli(*args, "--out", str(tmp_path / "whole")).returncode == 0
    work = tmp_path / "work"
    shutil.copytree(tmp_path / "whole" / "train_state", work / "train_state")
    newest = sorted((work / "train_state").glob("step_*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    resumed = cli(*args, "--out", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "truncated or corrupted" in resumed.stdout and "resumed at step 10" in resumed.stdout
    assert (work / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_two_processes_under_torchrun_follow_the_single_process_loss_curve(tmp_path):
    args = ["pretrain", *SMOKE, "max_steps=12", "log_every=1", "eval_every=0", "checkpoint_every=1000"]
    single = cli(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                "-m", "stagewise", *args, "--out", str(tmp_path / "two")]
    double = subprocess.run(torchrun, capture_output=True, text=True, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    # Every rank follows rank 0's view of the directory: finished, so none of them trains.
    again = subprocess.run([*torchrun, "--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-3000:]
    one = [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m]
    two = [m["loss"] for m in metrics(tmp_path / "two") if "loss" in m]
    assert len(one) == len(two) == 12
    assert one[0] == pytest.approx(two[0], abs=1e-5)
    assert two == pytest.approx(one, abs=2e-3)


def test_bad_data_is_refused_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    result = cli("pretrain", *SMOKE, "--data", str(bad), "--out", str(tmp_path / "m"))
    assert result.returncode == 2
    assert f"{bad}, line 2: missing field 'text'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_user_text_data_trains(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"Line {i}: the cat sat on the mat number {i % 7}."}) for i in range(400)]
    path.write_text("\n".join(lines) + "\n")
    cfg = smoke_config("max_steps=5", "eval_every=0")
    out = pretrain.train(cfg, tmp_path / "m", data_files=[path], log=lambda *a: None)
    (entry,) = load_model_dir(out)[2]
    assert "fact_cloze" not in entry["metrics"] and entry["metrics"]["heldout_loss"] > 0
