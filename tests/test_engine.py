"""The engine: batched cached generation against a naive full-recomputation loop, stop tokens,
seeding, the logits_processor contract, and response log-probs against a per-sequence loop."""

import pytest
import torch

from stagewise.engine import generate, sequence_logprobs
from stagewise.errors import StagewiseError
from stagewise.model import Transformer, weights_sha256

from engine_cases import PROMPTS, naive_greedy, spread_model


@pytest.fixture(scope="module")
def model() -> Transformer:
    return spread_model()


def test_batched_generation_equals_naive_one_by_one(model):
    batched = generate(model, PROMPTS, max_new_tokens=20)
    assert batched == [naive_greedy(model, p, 20) for p in PROMPTS]
    assert batched == [generate(model, [p], max_new_tokens=20)[0] for p in PROMPTS]


def test_stop_tokens_end_rows_and_are_kept(model):
    full = generate(model, PROMPTS, max_new_tokens=20)
    stop = full[0][2]
    out = generate(model, PROMPTS, max_new_tokens=20, stop_ids={stop, 299})
    for row, f in zip(out, full):
        expected = f[:f.index(stop) + 1] if stop in f else f
        assert row == expected
    assert out[0][-1] == stop and len(out[0]) <= 3
    assert out == [naive_greedy(model, p, 20, stop=(stop, 299)) for p in PROMPTS]


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=15, temperature=1.5, top_p=0.95)
    a = generate(model, PROMPTS, seed=1, **kw)
    assert a == generate(model, PROMPTS, seed=1, **kw)
    assert a != generate(model, PROMPTS, seed=2, **kw)
    assert all(len(row) == 15 for row in a)


def test_top_k_one_is_greedy(model):
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=0) == \
        generate(model, PROMPTS, max_new_tokens=10)


def test_logits_processor_contract(model):
    """Row r is forced to token 5 + r + step; 8 is a stop token, so row r finishes at step 3 - r."""
    seen = []

    def force(step, logits, rows, generated):
        seen.append((step, list(rows)))
        for r in rows:  # the previous step's choice is visible, as a grammar matcher needs
            assert len(generated[r]) == step and (step == 0 or generated[r][-1] == 5 + r + step - 1)
        forced = torch.full_like(logits, float("-inf"))
        for j, r in enumerate(rows):
            forced[j, 5 + r + step] = 0.0
        return forced

    out = generate(model, PROMPTS, max_new_tokens=10, stop_ids=[8], logits_processor=force)
    assert out == [[5, 6, 7, 8], [6, 7, 8], [7, 8], [8]]
    assert seen == [(0, [0, 1, 2, 3]), (1, [0, 1, 2]), (2, [0, 1]), (3, [0])]


def test_generation_does_not_change_weights(model):
    h = weights_sha256(model)
    generate(model, PROMPTS, max_new_tokens=5, temperature=1.0, seed=0)
    assert weights_sha256(model) == h


def test_edge_cases_and_errors(model):
    assert generate(model, [], max_new_tokens=5) == []
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], [], []]
    with pytest.raises(StagewiseError, match="max_seq_len"):
        generate(model, [[1] * 60], max_new_tokens=5)
    with pytest.raises(StagewiseError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=5)
    with pytest.raises(StagewiseError, match="token id 300"):
        generate(model, [[1, 300]], max_new_tokens=5)


def test_sequence_logprobs_equal_per_sequence_reference(model):
    responses = [[9, 9, 120], [], [1, 2, 3, 4, 5, 6], [299]]
    logprobs, mask = sequence_logprobs(model, PROMPTS, responses)
    assert logprobs.shape == mask.shape == (4, 6)
    for b, (p, r) in enumerate(zip(PROMPTS, responses)):
        assert mask[b].tolist() == [j < len(r) for j in range(6)]
        with torch.no_grad():
            logits = model(torch.tensor([p + r]))[0]  # (T, V)
        for j, t in enumerate(r):
            expected = torch.log_softmax(logits[len(p) - 1 + j], -1)[t].item()
            assert abs(logprobs[b, j].item() - expected) < 1e-5
        assert logprobs[b, len(r):].abs().sum().item() == 0


def test_sequence_logprobs_temperature_and_gradients(model):
    p, r = [PROMPTS[0]], [[3, 4]]
    hot, _ = sequence_logprobs(model, p, r, temperature=2.0)
    with torch.no_grad():
        logits = model(torch.tensor([p[0] + r[0]]))[0] / 2.0
    expected = torch.log_softmax(logits[len(p[0]) - 1], -1)[3].item()
    assert abs(hot[0, 0].item() - expected) < 1e-5
    hot.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_generation_with_stop_equals_greedy_on_batch_of_one(model):
    """The unpadded path (no masks) and the padded path give the same tokens."""
    same_length = [PROMPTS[0], PROMPTS[0][::-1]]
    assert generate(model, same_length, max_new_tokens=12) == [naive_greedy(model, p, 12) for p in same_length]
