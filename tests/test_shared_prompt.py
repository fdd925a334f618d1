"""Packing a pair's two responses behind one copy of the prompt changes nothing they compute."""

import random

import pytest
import torch

from stagewise import shared_prompt
from stagewise.engine import sequence_logprobs
from stagewise.errors import StagewiseError
from stagewise.model import ModelConfig, Transformer
from stagewise.reward_model import RewardModel

CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=32)


def random_triples(n: int, seed: int = 0):
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(1, CFG.vocab_size) for _ in range(k)]  # noqa: E731
    # Lengths vary, one-token sides included, so padding and the rejected side's restart are exercised.
    return [(ids(rng.randint(1, 12)), ids(rng.randint(1, 9)), ids(rng.randint(1, 9))) for _ in range(n)]


def test_logprobs_equal_separate_sequences():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    triples = random_triples(7)
    with torch.no_grad():
        packed = shared_prompt.pack(triples, CFG.max_seq_len)
        chosen, rejected = shared_prompt.response_logprobs(model, packed)
        only_chosen, = shared_prompt.logprobs_from_hidden(model.lm_head, shared_prompt.hidden_states(model.model, packed),
                                                          packed, sides=(0,))
        want_c, mask_c = sequence_logprobs(model, [p for p, _, _ in triples], [c for _, c, _ in triples])
        want_r, mask_r = sequence_logprobs(model, [p for p, _, _ in triples], [r for _, _, r in triples])
    torch.testing.assert_close(chosen[:, :want_c.shape[1]], want_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected[:, :want_r.shape[1]], want_r, atol=1e-5, rtol=0)
    assert chosen[:, want_c.shape[1]:].abs().sum() == 0 and rejected[:, want_r.shape[1]:].abs().sum() == 0
    torch.testing.assert_close(only_chosen, chosen, atol=1e-6, rtol=0)


def test_gradients_equal_separate_sequences():
    torch.manual_seed(0)
    packed_model = Transformer(CFG)
    separate_model = Transformer(CFG)
    separate_model.load_state_dict(packed_model.state_dict())
    triples = random_triples(5, seed=1)
    chosen, rejected = shared_prompt.response_logprobs(packed_model, shared_prompt.pack(triples, CFG.max_seq_len))
    (chosen.sum() - 0.5 * rejected.sum()).backward()
    want_c, _ = sequence_logprobs(separate_model, [p for p, _, _ in triples], [c for _, c, _ in triples])
    want_r, _ = sequence_logprobs(separate_model, [p for p, _, _ in triples], [r for _, _, r in triples])
    (want_c.sum() - 0.5 * want_r.sum()).backward()
    for (name, a), (_, b) in zip(packed_model.named_parameters(), separate_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("likelihood", [False, True])
def test_rewards_equal_separate_sequences(likelihood):
    torch.manual_seed(0)
    rm = RewardModel(CFG, likelihood).eval()
    torch.nn.init.normal_(rm.score.weight)
    if likelihood:
        rm.likelihood_weight.data.fill_(0.7)
    triples = random_triples(6, seed=2)
    with torch.no_grad():
        chosen, rejected = shared_prompt.rewards(rm, shared_prompt.pack(triples, CFG.max_seq_len))
        for b, (p, c, r) in enumerate(triples):
            want = torch.cat([rm(torch.tensor([p + side]), torch.tensor([len(p + side)]), torch.tensor([len(p)]))
                              for side in (c, r)])
            torch.testing.assert_close(torch.stack([chosen[b], rejected[b]]), want, atol=1e-5, rtol=1e-6)


def test_rows_may_be_longer_than_the_context_but_sides_may_not():
    p, c, r = [1] * 20, [2] * 10, [3] * 10  # a row of 40 tokens, each side 30 of 32
    packed = shared_prompt.pack([(p, c, r)], CFG.max_seq_len)
    assert packed.idx.shape == (1, 40) and int(packed.positions.max()) == 29
    chosen, rejected = shared_prompt.response_logprobs(Transformer(CFG), packed)  # the model runs the long row
    assert chosen.shape == rejected.shape == (1, 10)
    with pytest.raises(StagewiseError, match="pair 0.*exceeds max_seq_len 32"):
        shared_prompt.pack([(p, c + [2] * 3, r)], CFG.max_seq_len)
    with pytest.raises(StagewiseError, match="pair 0"):
        shared_prompt.pack([(p, [], r)], CFG.max_seq_len)
