"""Sampling: masks against naive per-row references, greedy, reproducibility, distributions."""

import math

import pytest
import torch

from stagewise.errors import StagewiseError
from stagewise.sampling import draw, greedy, sample, top_k_mask, top_p_mask


def naive_top_k(row: list[float], k: int) -> list[bool]:
    kth = sorted(row, reverse=True)[k - 1]
    return [x >= kth for x in row]


def naive_top_p(row: list[float], p: float) -> list[bool]:
    z = sum(math.exp(x) for x in row)
    probs = [math.exp(x) / z for x in row]
    keep = [False] * len(row)
    total = 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):
        keep[i] = True
        total += probs[i]
        if total >= p:
            break
    return keep


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_matches_naive(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(6, 50, generator=g)
    out = top_k_mask(logits, k)
    for b in range(6):
        keep = naive_top_k(logits[b].tolist(), k)
        assert [x != float("-inf") for x in out[b].tolist()] == keep
        assert torch.equal(out[b][torch.tensor(keep)], logits[b][torch.tensor(keep)])  # kept logits unchanged


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_top_p_matches_naive(p):
    g = torch.Generator().manual_seed(int(p * 100))
    logits = torch.randn(6, 40, generator=g) * 2
    out = top_p_mask(logits, p)
    for b in range(6):
        keep = naive_top_p(logits[b].tolist(), p)
        assert [x != float("-inf") for x in out[b].tolist()] == keep


def test_top_p_keeps_one_token_when_it_dominates():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert top_p_mask(logits, 0.5).isinf().tolist() == [[False, True, True, True]]


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=0.0, top_k=5, top_p=0.5), logits.argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 30)
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_samples_stay_inside_the_masks():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    allowed = torch.topk(logits, 5).indices
    for _ in range(50):
        ids = sample(logits, 2.0, top_k=5, generator=g)
        assert all(ids[b] in allowed[b] for b in range(3))


def test_sampled_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    t = 0.7
    expected = torch.softmax(logits[0] / t, -1)
    g = torch.Generator().manual_seed(3)
    n = 20000
    ids = sample(logits.expand(n, 4), t, generator=g)
    freq = torch.bincount(ids, minlength=4).float() / n
    assert (freq - expected).abs().max() < 0.015


@pytest.mark.parametrize("u", [0.0, 0.5, 1.0 - 2 ** -24, 1.0])
def test_a_draw_never_picks_a_token_without_probability(monkeypatch, u):
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, u, dtype=kw.get("dtype")))
    ids = draw(probs)
    assert ids.tolist()[1] == 2 and ids.tolist()[0] in (1, 3)
    assert ids.tolist()[0] == (1 if u < 0.25 else 3)


def test_bad_arguments_raise():
    logits = torch.randn(1, 10)
    for kwargs in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(StagewiseError):
            sample(logits, **{"temperature": 1.0, **kwargs})
