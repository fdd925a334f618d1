"""Reward model, DPO (sigmoid, IPO, RPO) and PPO end to end on a tiny SFT model: each writes a
model directory whose lineage grows by its method, changes the weights, and logs its metrics."""

import csv
import json

import pytest

from stagewise.model import weights_sha256
from stagewise.model_dir import load_language_model, load_reward_model
from stagewise.reward_model import RewardModel
from stagewise.stages import common, dpo, ppo, reward

QUIET = dict(log=lambda *a: None)


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_reward(smoke_sft, smoke_config, tmp_path_factory):
    # 96 of the smoke world's pairs, seen 15 times over: enough for the fit to show in the loss.
    config = smoke_config(reward.RewardConfig, "reward", "optim.lr=3e-3", "max_steps=90", "log_every=5")
    tmp = tmp_path_factory.mktemp("models")
    pairs = common.world_data(config.world)["preferences"][:96]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return reward.train(config, smoke_sft, tmp / "reward", data_files=[tmp / "pairs.jsonl"], **QUIET)


def test_reward_model_has_its_own_lineage_and_held_out_accuracy(smoke_sft, smoke_reward):
    model, _, lineage = load_reward_model(smoke_reward)
    assert isinstance(model, RewardModel)
    assert [e["method"] for e in lineage] == ["pretrain", "sft", "reward_model"]
    final = metrics(smoke_reward)[-1]
    assert 0.0 <= final["pairwise_accuracy"] <= 1.0 and final["heldout_pairs"] > 0
    losses = [m["loss"] for m in metrics(smoke_reward) if "loss" in m]
    assert losses[0] > 0.65 and max(losses[-3:]) < 0.5, losses  # from log(2) at a zero head, down


@pytest.mark.parametrize("overrides", [(), ("loss=ipo",), ("rpo_alpha=1.0",)])
def test_dpo_moves_the_policy_towards_the_chosen_answers(smoke_sft, smoke_config, tmp_path, overrides):
    out = dpo.train(smoke_config(dpo.DPOConfig, "dpo", *overrides), smoke_sft, tmp_path / "dpo", **QUIET)
    parent, _, _ = load_language_model(smoke_sft)
    model, _, lineage = load_language_model(out)
    assert [e["method"] for e in lineage] == ["pretrain", "sft", "dpo"]
    assert weights_sha256(model) != weights_sha256(parent)
    logged = [m for m in metrics(out) if "rewards/margins" in m]
    assert logged[-1]["rewards/margins"] > 0  # the policy's chosen-over-rejected margin opened up
    assert ("nll_loss" in logged[-1]) == ("rpo_alpha=1.0" in overrides)


def test_ppo_logs_what_trl_logs_and_plots_overoptimisation(smoke_sft, smoke_reward, smoke_config, tmp_path):
    out = ppo.train(smoke_config(ppo.PPOConfig, "ppo"), smoke_sft, smoke_reward, tmp_path / "ppo", **QUIET)
    parent, _, _ = load_language_model(smoke_sft)
    model, _, lineage = load_language_model(out)
    assert [e["method"] for e in lineage] == ["pretrain", "sft", "ppo"]
    assert weights_sha256(model) != weights_sha256(parent)
    iterations = [m for m in metrics(out) if "iteration" in m]
    assert len(iterations) == 4
    for key in ("objective/kl", "objective/rlhf_reward", "objective/entropy", "policy/clipfrac", "policy/approxkl",
                "val/vf_loss", "gold/score"):
        assert all(key in m for m in iterations), key
    with (out / "overoptimisation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"sqrt_kl", "proxy_score", "gold_score"} <= set(rows[0])
    assert (out / "overoptimisation.png").read_bytes()[:4] == b"\x89PNG"
