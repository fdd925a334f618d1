"""The reward model: its head, its likelihood term, its directory and transformers' reading of it."""

import random

import pytest
import torch

from stagewise.batching import pad_right
from stagewise.engine import sequence_logprobs
from stagewise.errors import StagewiseError
from stagewise.model import ModelConfig, Transformer
from stagewise.model_dir import load_reward_model, save_model_dir
from stagewise.reward_model import RewardModel
from stagewise.tokenizer import train_tokenizer

CFG = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, max_seq_len=40)


def batch(seed: int = 0):
    """Prompts and responses of varied lengths, right-padded as PPO and best-of-n score them."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randint(1, 12))] for _ in range(5)]
    responses = [[rng.randrange(1, 300) for _ in range(rng.randint(1, 10))] for _ in range(5)]
    idx = pad_right([p + r for p, r in zip(prompts, responses)], 0)
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
    return prompts, responses, idx, lengths, torch.tensor([len(p) for p in prompts])


def test_likelihood_term_is_the_language_models_response_log_probability():
    torch.manual_seed(0)
    lm = Transformer(CFG).eval()
    with torch.no_grad():  # larger weights than the init, so that log-probabilities differ widely
        for p in lm.parameters():
            p.mul_(3.0)
    prompts, responses, idx, lengths, starts = batch()
    rm = RewardModel.from_language_model(lm, likelihood=True).eval()
    with torch.no_grad():
        assert rm(idx, lengths, starts).abs().max() == 0  # zero head, zero weight: every reward starts at 0
        torch.nn.init.normal_(rm.score.weight)
        head_only = RewardModel.from_language_model(lm).eval()
        head_only.score.weight.copy_(rm.score.weight)
        rm.likelihood_weight.fill_(0.5)
        logprobs, _ = sequence_logprobs(lm, prompts, responses)
        want = head_only(idx, lengths) + 0.5 * logprobs.sum(-1)
        assert logprobs.sum(-1).abs().min() > 1.0  # the term is far from zero, so the comparison means something
        torch.testing.assert_close(rm(idx, lengths, starts), want, atol=1e-4, rtol=1e-5)
        # The prompt's tokens are not part of the term: counting from one token earlier changes the reward.
        assert not torch.allclose(rm(idx, lengths, starts - 1), want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("likelihood", [False, True])
def test_reward_per_token_splits_the_score_into_the_head_and_each_tokens_likelihood(likelihood):
    torch.manual_seed(0)
    lm = Transformer(CFG).eval()
    prompts, responses, idx, lengths, starts = batch(1)
    rm = RewardModel.from_language_model(lm, likelihood=likelihood).eval()
    with torch.no_grad():
        torch.nn.init.normal_(rm.score.weight)
        if likelihood:
            rm.likelihood_weight.fill_(0.5)
        head, per_token = rm.reward_per_token(prompts, responses, pad_id=0)
        assert per_token.shape == (len(responses), max(len(r) for r in responses))
        torch.testing.assert_close(head + per_token.sum(-1), rm.score_responses(prompts, responses, 0))
        logprobs, mask = sequence_logprobs(lm, prompts, responses)
        want = 0.5 * logprobs * mask if likelihood else torch.zeros_like(logprobs)
        torch.testing.assert_close(per_token, want, atol=1e-5, rtol=1e-5)


def test_the_head_reads_fp32_hidden_states_under_bf16_autocast():
    torch.manual_seed(0)
    rm = RewardModel.from_language_model(Transformer(CFG)).eval()
    torch.nn.init.normal_(rm.score.weight)
    hidden = torch.randn(3, 7, CFG.n_embd) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = rm.head(hidden)
        rounded = rm.score(hidden).squeeze(-1)  # what the head alone gives under autocast
    assert rewards.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    want = hidden @ rm.score.weight[0]
    torch.testing.assert_close(rewards, want, atol=1e-5, rtol=1e-5)
    assert (rounded.float() - want).abs().max() > 1e-3  # bf16 would have rounded the differences Bradley-Terry reads


def test_likelihood_term_needs_where_responses_start_and_a_tied_head():
    _, _, idx, lengths, _ = batch()
    with pytest.raises(StagewiseError, match="where each response starts"):
        RewardModel(CFG, likelihood=True)(idx, lengths)
    untied = ModelConfig(**{**CFG.__dict__, "tie_embeddings": False})
    with pytest.raises(StagewiseError, match="untied head .train it with likelihood=false"):
        RewardModel(untied, likelihood=True)


@pytest.mark.parametrize("likelihood", [False, True])
def test_directory_round_trip_and_transformers_reads_the_head(tmp_path, likelihood):
    torch.manual_seed(0)
    rm = RewardModel.from_language_model(Transformer(CFG), likelihood=likelihood).eval()
    torch.nn.init.normal_(rm.score.weight)
    if likelihood:
        rm.likelihood_weight.data.fill_(0.25)
    tok = train_tokenizer(["le chat est sur la table", "the cat sat on a mat 12 + 30 = 42"] * 50, 300)
    save_model_dir(tmp_path / "rm", rm, tok, [{"method": "reward_model"}], config_extra=rm.config_extra(tok.pad_id))
    loaded, _, _ = load_reward_model(tmp_path / "rm")
    assert (loaded.likelihood_weight is not None) == likelihood
    _, _, idx, lengths, starts = batch(seed=1)
    # Right padding with the pad id, which no real token is: transformers reads each row at its
    # last token that is not the pad id.
    real = torch.arange(idx.shape[1])[None, :] < lengths[:, None]
    idx = torch.where(idx == tok.pad_id, (tok.pad_id + 1) % CFG.vocab_size, idx)
    idx = torch.where(real, idx, torch.full_like(idx, tok.pad_id))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, lengths, starts), rm(idx, lengths, starts), atol=0, rtol=0)
        head = RewardModel(CFG).eval()  # the same decoder and head, without the likelihood term
        head.model.load_state_dict(rm.model.state_dict())
        head.score.load_state_dict(rm.score.state_dict())
        ours = head(idx, lengths)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
