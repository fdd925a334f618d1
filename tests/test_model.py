"""The model: transformers parity, KV-cache decoding against full recomputation, loss, counts."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from stagewise.errors import StagewiseError
from stagewise.model import KVCache, ModelConfig, Transformer, weights_sha256
from stagewise.model_dir import save_model_dir
from stagewise.tokenizer import train_tokenizer

TINY = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, intermediate_size=48, max_seq_len=64)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


def corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    words = "le chat est sur la table bonjour comment allez vous café élève the cat sat on a mat".split()
    return [" ".join(rng.choice(words) for _ in range(6)) + f" {rng.randint(0, 999)}." for _ in range(n)]


# --- transformers parity ---------------------------------------------------------------------

@pytest.mark.parametrize("tie,n_kv_head", [(True, 4), (False, 4), (True, 2), (False, 1)])
def test_logits_match_transformers(tmp_path, tie, n_kv_head):
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(corpus(), 300)
    model = tiny_model(tie_embeddings=tie, n_kv_head=n_kv_head)
    with torch.no_grad():  # larger weights than the init, so a convention mismatch cannot hide in tiny logits
        for p in model.parameters():
            p.mul_(5.0)
    save_model_dir(tmp_path / "m", model, tok, [])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert sorted(hf.state_dict()) == sorted(model.state_dict())
    texts = ["Bonjour, comment allez-vous ?", "le chat 1234 + 56 = 1290", "<|im_start|>user\ncafé<|im_end|>\n"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"]
        idx = torch.tensor([ids])
        with torch.no_grad():
            ours, theirs = model(idx), hf(idx).logits
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-4


# --- decoding with a KV cache ------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_decoding_equals_full_recomputation(n_kv_head):
    model = tiny_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = KVCache(model.cfg, 2, 20)
        prefill = model(idx[:, :8], kv_cache=cache)
        torch.testing.assert_close(prefill, full[:, :8], atol=1e-5, rtol=0)
        for t in range(8, 14):  # one token at a time
            step = model(idx[:, t:t + 1], kv_cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)
        chunk = model(idx[:, 14:], kv_cache=cache)  # several tokens after a cached prefix
        torch.testing.assert_close(chunk, full[:, 14:], atol=1e-5, rtol=0)
    assert cache.pos == 20


def test_left_padded_rows_equal_unpadded_rows():
    """positions + attn_mask make a left-padded row compute what the row alone computes."""
    model = tiny_model(n_kv_head=2)
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 300, (n,), generator=g) for n in (9, 5, 1)]
    T = 9
    idx = torch.stack([F.pad(r, (T - len(r), 0)) for r in rows])  # (B, T) left-padded with 0
    valid = torch.stack([torch.arange(T) >= T - len(r) for r in rows])  # (B, T)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = (torch.ones(T, T, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
    with torch.no_grad():
        batched = model(idx, positions=positions, attn_mask=mask[:, None])
        for b, r in enumerate(rows):
            alone = model(r[None])
            torch.testing.assert_close(batched[b, T - len(r):], alone[0], atol=1e-5, rtol=0)


def test_sequence_longer_than_max_seq_len_raises():
    model = tiny_model()
    with pytest.raises(StagewiseError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


# --- loss, counts, init, hashing ---------------------------------------------------------------

def test_loss_is_mean_cross_entropy_over_unignored_targets():
    model = tiny_model()
    idx = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(4))
    targets[0, :3] = -100
    with torch.no_grad():
        logits, loss = model(idx, targets)
    terms = []
    for b in range(2):
        for t in range(6):
            if targets[b, t] != -100:
                row = logits[b, t].tolist()
                log_z = math.log(sum(math.exp(x) for x in row))
                terms.append(log_z - row[targets[b, t]])
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-5


def test_supervised_only_loss_and_gradients_equal_the_full_head():
    full, sparse = tiny_model(), tiny_model()
    idx = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(6))
    targets[:, :6] = -100  # a prompt carries no loss
    targets[1, 8:] = -100  # nor does padding
    logits, loss = full(idx, targets)
    sparse_logits, sparse_loss = sparse(idx, targets, supervised_only=True)
    keep = targets != -100
    assert sparse_logits.shape == (int(keep.sum()), 300)
    torch.testing.assert_close(sparse_logits, logits[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse_loss, loss, atol=1e-6, rtol=0)
    loss.backward()
    sparse_loss.backward()
    for (name, a), (_, b) in zip(full.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_parameter_names_and_counts():
    for tie in (True, False):
        cfg = ModelConfig(**{**TINY, "n_kv_head": 2, "tie_embeddings": tie})
        model = Transformer(cfg)
        V, C, I, L, hd = cfg.vocab_size, cfg.n_embd, cfg.intermediate_size, cfg.n_layer, cfg.head_dim
        names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        for i in range(L):
            p = f"model.layers.{i}."
            names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
            names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
            names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        assert set(model.state_dict()) == names
        kv = cfg.n_kv_head * hd
        per_layer = C * C * 2 + C * kv * 2 + 3 * C * I + 2 * C
        head = 0 if tie else V * C
        assert model.num_params() == V * C + head + L * per_layer + C
        assert model.num_params(exclude_embeddings=True) == head + L * per_layer + C
        matmul = L * (C * C * 2 + C * kv * 2 + 3 * C * I) + V * C
        assert model.flops_per_token(16) == 6 * matmul + 12 * L * cfg.n_head * hd * 16
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


def test_init_scales_residual_projections():
    model = Transformer(ModelConfig(n_layer=8))
    std = 0.02
    assert abs(model.model.layers[0].self_attn.q_proj.weight.std().item() - std) < 0.002
    residual = std / math.sqrt(2 * 8)
    assert abs(model.model.layers[3].mlp.down_proj.weight.std().item() - residual) < residual * 0.1
    assert torch.all(model.model.norm.weight == 1)


def test_weights_sha256_tracks_weights_not_use():
    model = tiny_model()
    h = weights_sha256(model)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert weights_sha256(model) == h
    assert weights_sha256(tiny_model()) == h
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    assert weights_sha256(model) != h


def test_hf_config_round_trip_and_missing_key():
    cfg = ModelConfig(**{**TINY, "n_kv_head": 2, "tie_embeddings": False, "rope_theta": 5e5})
    d = cfg.to_hf_config(0, [2, 0], 3)
    assert ModelConfig.from_hf_config(d) == cfg
    del d["rope_parameters"]["rope_theta"], d["rope_theta"]
    with pytest.raises(StagewiseError, match="rope_theta"):
        ModelConfig.from_hf_config(d)
    d = cfg.to_hf_config(0, 2, 3)
    del d["hidden_size"]
    with pytest.raises(StagewiseError, match="hidden_size"):
        ModelConfig.from_hf_config(d)


def test_bad_shapes_raise():
    with pytest.raises(StagewiseError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(StagewiseError, match="n_head"):
        ModelConfig(n_embd=100, n_head=3)


@pytest.mark.slow  # compiles for ~15 s
def test_compiled_model_matches_eager():
    model = tiny_model(n_kv_head=2).train()
    idx = torch.randint(0, 300, (2, 16))
    logits, loss = model(idx, idx)
    c_logits, c_loss = torch.compile(model, fullgraph=True)(idx, idx)
    torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=1e-5)
    c_loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_cpu_bf16_autocast_runs_attention_in_fp32(monkeypatch):
    import stagewise.model as model_module
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording_sdpa)
    model = tiny_model().train()
    projected = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: projected.append(out.dtype))
    idx = torch.randint(0, 300, (2, 16))
    _, loss = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, bf16_loss = model(idx, idx)
    assert projected[-1] == torch.bfloat16  # the matmuls around attention do run in bf16
    assert seen[-1] == (torch.float32, False) and len(seen) == 2 * TINY["n_layer"]
    bf16_loss.backward()
    assert abs(bf16_loss.item() - loss.item()) < 0.05
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_logits_are_fp32_under_bf16_autocast():
    model = tiny_model().eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(idx)
        logits = model(idx)
        rounded = F.linear(hidden, model.lm_head.weight)  # a plain Linear under autocast
    assert logits.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    torch.testing.assert_close(logits, hidden.float() @ model.lm_head.weight.T, atol=1e-5, rtol=1e-5)
    assert (rounded.float() - logits).abs().max() > 1e-3
