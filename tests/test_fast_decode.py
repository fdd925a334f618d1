"""Fast decoding, `engine.generate(compile=True)`: the same tokens as the eager engine and as full
recomputation, at batch 1 and above, with left padding, stop tokens, sampling and a logits processor.

The default suite runs `fast_decode.decode_step` eagerly in place of its compiled form (the same
function, the same cache layout and bookkeeping); the slow suite compiles it with AOTInductor.
"""

import pytest
import torch

from stagewise import fast_decode
from stagewise.engine import generate
from stagewise.model import ModelConfig, Transformer

from engine_cases import CFG, PROMPTS, naive_greedy, spread_model


@pytest.fixture(scope="module")
def model() -> Transformer:
    return spread_model()


class EagerStep:
    """Stands in for the AOTInductor runner: `decode_step` run eagerly, same inputs and outputs."""

    def __init__(self, cfg: ModelConfig, single: bool):
        self.cfg, self.single = cfg, single

    def run(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(fast_decode.decode_step(self.cfg, self.single, *args))


@pytest.fixture
def eager_step(monkeypatch):
    monkeypatch.setattr(fast_decode, "compiled_step", lambda cfg, dtype, device, single: EagerStep(cfg, single))


def stops_leaving_one_row(model) -> set[int]:
    """Stop ids that end every prompt but the second within its first two tokens."""
    full = generate(model, PROMPTS, max_new_tokens=20)
    stop = {full[0][0], full[2][1], full[3][1]} - set(full[1])
    assert len(stop) == 3, "pick other stop tokens: these also occur in the second row"
    return stop


@torch.no_grad()
def test_decode_step_equals_full_forward(model):
    """Feeding sequences through the step one token at a time gives a full forward pass's logits,
    also for a left-padded row, whose pad slots the step must not attend to."""
    cfg = model.cfg
    a, b = PROMPTS[2], PROMPTS[0]  # 12 and 7 tokens: b is padded by 5
    for single in (True, False):
        rows = [a] if single else [a, [0] * 5 + b]
        starts = [0] if single else [0, 5]
        full = [model(torch.tensor([a]))[0]] + ([] if single else [model(torch.tensor([b]))[0]])  # (T, V) each
        T, B = len(a), len(rows)
        caches = [torch.zeros(T, B, cfg.n_kv_head, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
        slot, start = torch.tensor(0), torch.tensor(starts)
        for t in range(T):
            tok = torch.tensor([r[t] for r in rows])
            rpos = torch.tensor([max(0, t - s) for s in starts])  # RoPE position: real tokens count from 0
            logits, greedy = fast_decode.decode_step(cfg, single, tok, slot, rpos, start, *caches,
                                                     *fast_decode.fused_weights(model))
            for i, s in enumerate(starts):
                if t >= s:
                    torch.testing.assert_close(logits[i], full[i][t - s], atol=1e-4, rtol=1e-4)
            assert torch.equal(greedy, logits.argmax(-1))
            assert slot.item() == t + 1  # advanced in place
        assert rpos.tolist() == [T - s for s in starts]  # advanced in place


def test_fast_path_equals_full_recomputation(model, eager_step):
    # 20 new tokens after prompts of 1 to 12 tokens: the attended prefix crosses block boundaries.
    naive = [naive_greedy(model, p, 20) for p in PROMPTS]
    assert generate(model, PROMPTS, max_new_tokens=20, compile=True) == naive
    for p, expected in zip(PROMPTS, naive):  # batch 1: the multiply-and-sum form of the matmuls
        assert generate(model, [p], max_new_tokens=20, compile=True) == [expected]


def test_fast_path_stop_tokens_drop_rows_down_to_one(model, eager_step):
    stop = stops_leaving_one_row(model)
    out = generate(model, PROMPTS, max_new_tokens=20, stop_ids=stop, compile=True)
    assert out == generate(model, PROMPTS, max_new_tokens=20, stop_ids=stop)
    assert out == [naive_greedy(model, p, 20, stop=stop) for p in PROMPTS]
    assert [len(r) for r in out] == [1, 20, 2, 2] and all(r[-1] in stop for i, r in enumerate(out) if i != 1)


def test_fast_path_sampling_and_logits_processor_match_eager(model, eager_step):
    kw = dict(max_new_tokens=15, temperature=1.5, top_k=50, top_p=0.95, seed=3)
    assert generate(model, PROMPTS, compile=True, **kw) == generate(model, PROMPTS, **kw)

    def no_even_tokens(step, logits, rows, generated):
        logits[:, ::2] = float("-inf")
        return logits

    kw = dict(max_new_tokens=12, logits_processor=no_even_tokens, stop_ids={1})
    out = generate(model, PROMPTS, compile=True, **kw)
    assert out == generate(model, PROMPTS, **kw)
    assert all(t % 2 == 1 for row in out for t in row)


def test_fast_path_sees_weight_updates(model, eager_step):
    m = Transformer(ModelConfig(**CFG)).eval()
    m.load_state_dict(model.state_dict())
    before = generate(m, PROMPTS, max_new_tokens=10, compile=True)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(-3.0)  # in place: the fused copies are stale
    after = generate(m, PROMPTS, max_new_tokens=10, compile=True)
    assert after == generate(m, PROMPTS, max_new_tokens=10) != before


@pytest.mark.slow
def test_compiled_step_equals_eager_engine(model):
    """AOTInductor-compiled steps (batch 1 and dynamic batch) give the eager engine's tokens."""
    stop = stops_leaving_one_row(model)
    for prompts in (PROMPTS, [PROMPTS[2]], [PROMPTS[1]], PROMPTS[1:]):
        assert generate(model, prompts, max_new_tokens=20, compile=True) == generate(model, prompts, max_new_tokens=20)
    n_compiled = len(fast_decode._compiled)
    assert n_compiled >= 2  # one for batch 1, one for any other batch size
    out = generate(model, PROMPTS, max_new_tokens=20, stop_ids=stop, compile=True)
    assert out == [naive_greedy(model, p, 20, stop=stop) for p in PROMPTS]
    kw = dict(max_new_tokens=15, temperature=1.5, top_p=0.95, seed=3)
    assert generate(model, PROMPTS, compile=True, **kw) == generate(model, PROMPTS, **kw)
    assert len(fast_decode._compiled) == n_compiled  # other batch sizes reuse the compiled steps
