"""Reward model, DPO (sigmoid, IPO, RPO) and PPO end to end on a tiny SFT model: each writes a
model directory whose lineage grows by its method, changes the weights, and logs its metrics."""

import csv
import json

import pytest
import torch

from stagewise import engine, shared_prompt
from stagewise.errors import StagewiseError
from stagewise.model import ModelConfig, Transformer, weights_sha256
from stagewise.model_dir import load_language_model, load_reward_model, save_model_dir
from stagewise.reward_model import RewardModel
from stagewise.stages import common, dpo, ppo, reward
from stagewise.tokenizer import train_tokenizer

QUIET = dict(log=lambda *a: None)


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_reward(smoke_sft, smoke_config, tmp_path_factory):
    # 96 of the smoke world's pairs, seen 15 times over, every block training: enough for the fit
    # to show in the loss.
    config = smoke_config(reward.RewardConfig, "reward", "optim.lr=3e-3", "max_steps=90", "log_every=5",
                          "freeze_layers=0")
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
    assert losses[0] > 0.6 and max(losses[-3:]) < 0.5, losses  # from about log(2) at a zero head, down


def test_grm_term_keeps_the_reward_model_a_language_model(smoke_sft, smoke_config, tmp_path):
    # Bradley-Terry alone is free to wreck the decoder as a language model; GRM's term is not.
    lm, tokenizer, _ = load_language_model(smoke_sft)
    pairs = common.world_data(smoke_config(reward.RewardConfig, "reward").world)["preferences"][:64]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    packed = shared_prompt.pack(common.preference_triples(tokenizer, pairs, lm.cfg.max_seq_len), lm.cfg.max_seq_len)
    nll = {}
    for coef in (0.0, 1.0):
        config = smoke_config(reward.RewardConfig, "reward", "optim.lr=3e-3", "max_steps=30", f"lm_coef={coef}")
        out = reward.train(config, smoke_sft, tmp_path / f"reward-{coef}", data_files=[tmp_path / "pairs.jsonl"],
                           **QUIET)
        model, _, _ = load_reward_model(out)
        with torch.no_grad():
            hidden = shared_prompt.hidden_states(model.model, packed)
            nll[coef] = reward.chosen_nll(reward.language_model_head(model, lm, "cpu"), hidden, packed).item()
        assert any("lm_loss" in m for m in metrics(out)) == bool(coef)
    with torch.no_grad():
        before = reward.chosen_nll(lm.lm_head, shared_prompt.hidden_states(lm.model, packed), packed).item()
    assert nll[1.0] < before < nll[0.0], (nll, before)


def test_frozen_blocks_stay_the_sft_models_and_the_rest_trains(smoke_sft, smoke_config, tmp_path):
    config = smoke_config(reward.RewardConfig, "reward", "optim.lr=3e-3", "max_steps=10", "freeze_layers=1")
    out = reward.train(config, smoke_sft, tmp_path / "reward", **QUIET)
    sft = load_language_model(smoke_sft)[0].model.state_dict()
    trained = load_reward_model(out)[0].model.state_dict()
    frozen = [name for name in sft if name.startswith(("embed_tokens.", "layers.0."))]
    assert frozen and all(torch.equal(trained[name], sft[name]) for name in frozen)
    assert all(not torch.equal(trained[name], sft[name]) for name in sft if name.startswith("layers.1."))


def test_freezing_more_blocks_than_the_model_has_is_refused_before_anything_is_written(smoke_sft, smoke_reward,
                                                                                       smoke_config, tmp_path):
    with pytest.raises(StagewiseError, match="freeze_layers 3 is outside 0..2"):
        reward.train(smoke_config(reward.RewardConfig, "reward", "freeze_layers=3"), smoke_sft, tmp_path / "r", **QUIET)
    with pytest.raises(StagewiseError, match="critic_freeze_layers 3 is outside 0..2"):
        ppo.train(smoke_config(ppo.PPOConfig, "ppo", "critic_freeze_layers=3"), smoke_sft, smoke_reward,
                  tmp_path / "p", **QUIET)
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_grm_head_is_the_language_models_own(tie):
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, intermediate_size=32,
                                 max_seq_len=16, tie_embeddings=tie))
    rm = RewardModel.from_language_model(lm)
    head = reward.language_model_head(rm, lm, "cpu")
    hidden = torch.randn(3, 16)
    torch.testing.assert_close(head(hidden), lm.lm_head(hidden))
    # Tied, it trains with the reward model's embedding; untied, it is a frozen copy outside it.
    trainable = {id(p) for p in rm.parameters()}
    head_params = [rm.model.embed_tokens.weight] if tie else list(head.parameters())
    assert all((id(p) in trainable) == tie and p.requires_grad == tie for p in head_params)


@pytest.mark.parametrize("overrides", [(), ("loss=ipo",), ("rpo_alpha=1.0",)])
def test_dpo_moves_the_policy_towards_the_chosen_answers(smoke_sft, smoke_config, tmp_path, overrides):
    config = smoke_config(dpo.DPOConfig, "dpo", *overrides)
    out = dpo.train(config, smoke_sft, tmp_path / "dpo", **QUIET)
    parent, tokenizer, _ = load_language_model(smoke_sft)
    model, _, lineage = load_language_model(out)
    assert [e["method"] for e in lineage] == ["pretrain", "sft", "dpo"]
    assert weights_sha256(model) != weights_sha256(parent)
    # The implicit reward margin, on average over the first 512 pairs of its data: chosen answers
    # gained log-probability against the SFT model relative to rejected ones. (One logged batch's
    # margin is too noisy a witness after 20 steps.)
    pairs = common.preference_triples(tokenizer, dpo.load_pairs(config, None)[:512], parent.cfg.max_seq_len)
    with torch.no_grad():
        policy_c, policy_r = dpo.pair_logprobs(model, pairs, average=False)
        ref_c, ref_r = dpo.pair_logprobs(parent, pairs, average=False)
    margin = ((policy_c - ref_c) - (policy_r - ref_r)).mean().item()
    assert margin > 0
    logged = [m for m in metrics(out) if "rewards/margins" in m]
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


def test_on_policy_pairs_the_best_and_the_worst_answer_of_each_prompt():
    from random import Random

    from stagewise.stages import on_policy
    from stagewise.world import annotator, tasks
    from stagewise.world.people import Person
    lola = Person("Lola", "Brest", "baker", 34)
    people = {"Lola": lola}
    prompt = tasks.facts(lola, "city", 0).prompt
    answers = [["Lola lives in Brest.", "Lola lives in Lyon.", "Lola lives in Brest.", "Brest.\nHave a nice day."],
               ["Lola lives in Brest."] * 4]  # all alike: nothing to compare
    got = on_policy.label([prompt, prompt], answers, people, Random(0))
    # The wrong answer is last whatever the noise (any right answer beats a wrong one by 0.6).
    assert got.pairs == [{"prompt": prompt, "chosen": "Lola lives in Brest.", "rejected": "Lola lives in Lyon."}]
    assert got.samples == 8
    example = tasks.solve(prompt, people)
    scores = [annotator.score_example(example, a) for group in answers for a in group]
    assert got.sample_score == pytest.approx(sum(scores) / 8)


def test_iterative_on_policy_dpo_samples_each_round_and_resumes_bit_for_bit(smoke_sft, smoke_config, tmp_path,
                                                                            monkeypatch):
    overrides = ("on_policy_rounds=2", "round_prompts=24", "round_samples=4", "round_max_new_tokens=16",
                 "max_steps=6", "checkpoint_every=3", "log_every=1")
    config = smoke_config(dpo.DPOConfig, "dpo", *overrides)
    whole = dpo.train(config, smoke_sft, tmp_path / "whole", **QUIET)
    rounds = [m for m in metrics(whole) if "samples/gold_score" in m]
    assert [m["round"] for m in rounds] == [1, 2] and all(m["samples/pairs"] > 0 for m in rounds)
    assert metrics(whole)[-1]["rounds"] == 2 and metrics(whole)[-1]["steps"] == 12

    saved = common.save_state

    def save_then_crash(*args, **kwargs):
        saved(*args, **kwargs)
        if kwargs["round"] == 1 and kwargs["round_step"] == 3:  # mid-way through the second round
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        dpo.train(config, smoke_sft, tmp_path / "killed", **QUIET)
    monkeypatch.setattr(common, "save_state", saved)
    resumed = dpo.train(config, smoke_sft, tmp_path / "killed", resume=True, **QUIET)
    a, _, _ = load_language_model(whole)
    b, _, _ = load_language_model(resumed)
    assert weights_sha256(a) == weights_sha256(b)


def test_dpo_on_given_pairs_stays_offline_whatever_the_rounds(smoke_sft, smoke_config, tmp_path):
    config = smoke_config(dpo.DPOConfig, "dpo", "on_policy_rounds=2", "max_steps=2", "log_every=1")
    pairs = common.world_data(config.world)["preferences"][:32]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = dpo.train(config, smoke_sft, tmp_path / "dpo", data_files=[tmp_path / "pairs.jsonl"], **QUIET)
    assert not [m for m in metrics(out) if "samples/gold_score" in m]
    assert metrics(out)[-1]["steps"] == 2 and "rounds" not in metrics(out)[-1]
    _, _, lineage = load_language_model(out)
    assert lineage[-1]["data_sha256"] == common.data_sha256(pairs)


def test_rollouts_scored_in_length_order_give_the_figures_of_one_batch():
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, intermediate_size=32,
                                 max_seq_len=40)).eval()
    gen = torch.Generator().manual_seed(1)
    ids = lambda: torch.randint(1, 64, (int(torch.randint(1, 15, (1,), generator=gen)),), generator=gen).tolist()  # noqa: E731
    prompts, responses = [ids() for _ in range(11)], [ids() for _ in range(11)]
    with torch.no_grad():
        want_lp, want_mask = engine.sequence_logprobs(lm, prompts, responses)
        got_lp, got_mask = ppo.in_length_order(lambda p, r: engine.sequence_logprobs(lm, p, r), prompts, responses, 3)
        want_len = torch.tensor([len(r) for r in responses], dtype=torch.float)
        got_len = ppo.in_length_order(lambda p, r: torch.tensor([len(x) for x in r], dtype=torch.float),
                                      prompts, responses, 4)
    assert torch.equal(got_mask, want_mask) and torch.equal(got_len, want_len)
    torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=0)


def test_likelihood_term_on_an_untied_model_is_refused_before_anything_is_written(smoke_config, tmp_path):
    lm = Transformer(ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, intermediate_size=32,
                                 max_seq_len=64, tie_embeddings=False))
    tokenizer = train_tokenizer(["the cat sat on a mat", "le chat est sur la table"] * 50, 300)
    parent = save_model_dir(tmp_path / "untied", lm, tokenizer, [{"method": "pretrain"}, {"method": "sft"}])
    config = smoke_config(reward.RewardConfig, "reward", "likelihood=true")
    with pytest.raises(StagewiseError, match="untied.*likelihood=false"):
        reward.train(config, parent, tmp_path / "reward", **QUIET)
    assert not (tmp_path / "reward").exists()


def test_token_rewards_put_the_kl_on_every_token_and_the_score_on_the_last():
    kl = torch.tensor([[0.5, -0.2, 0.1, 0.0], [0.3, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    last = torch.tensor([2.0, -1.0])
    want = torch.tensor([[-0.05, 0.02, -0.01 + 2.0, 0.0], [-0.03, -0.04 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(ppo.token_rewards(kl, 0.1, mask, last), want)
    per_token = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.25, 0.0, 0.0]])
    rewards = ppo.token_rewards(kl, 0.1, mask, last, per_token)
    torch.testing.assert_close(rewards, want + per_token)
    # The return of each response is its score less the KL penalty, however the score is split.
    torch.testing.assert_close(rewards.sum(-1), last + per_token.sum(-1) - 0.1 * kl.sum(-1))


def test_ppo_with_several_samples_per_prompt_per_token_likelihood_and_a_decaying_lr(smoke_sft, smoke_reward,
                                                                                    smoke_config, tmp_path):
    config = smoke_config(ppo.PPOConfig, "ppo", "samples_per_prompt=4", "likelihood_per_token=true",
                          "optim.schedule=cosine", "optim.lr=1e-4", "optim.min_lr_ratio=0.1",
                          "final_norm_lr_scale=50")
    assert load_reward_model(smoke_reward)[0].likelihood_weight is not None  # so the per-token path runs
    out = ppo.train(config, smoke_sft, smoke_reward, tmp_path / "ppo", **QUIET)
    iterations = [m for m in metrics(out) if "iteration" in m]
    lrs = [m["lr"] for m in iterations]
    assert len(lrs) == config.iterations and lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-4 and lrs[-1] >= 1e-5
    # The final norm's weights train at 50 times the lr of the rest: they move much further.
    before, after = load_language_model(smoke_sft)[0].state_dict(), load_language_model(out)[0].state_dict()
    moved = {name: (after[name] - before[name]).abs().max().item() for name in before}
    assert moved["model.norm.weight"] > 10 * max(v for name, v in moved.items() if name != "model.norm.weight") > 0


def test_samples_per_prompt_that_do_not_divide_the_rollout_batch_are_refused(smoke_sft, smoke_reward, smoke_config,
                                                                              tmp_path):
    with pytest.raises(StagewiseError, match="must be a multiple of samples_per_prompt 3"):
        ppo.train(smoke_config(ppo.PPOConfig, "ppo", "samples_per_prompt=3"), smoke_sft, smoke_reward,
                  tmp_path / "p", **QUIET)
    assert not (tmp_path / "p").exists()
