"""The tiny model, prompts and naive reference decoder that the engine tests share."""

import torch

from stagewise.model import ModelConfig, Transformer

# Grouped-query attention (2 kv heads for 4 query heads); prompts of 7, 1, 12 and 3 tokens.
CFG = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, max_seq_len=64)
PROMPTS = [[5, 17, 200, 31, 9, 44, 101], [12], [250, 3, 77, 8, 19, 140, 66, 23, 90, 4, 11, 280], [60, 61, 62]]


def spread_model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**CFG)).eval()
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        for p in m.parameters():
            p.mul_(4.0)
    return m


@torch.no_grad()
def naive_greedy(model, prompt, n, stop=()):
    """Greedy decoding by full recomputation of every prefix: the reference for the engine."""
    seq, out = list(prompt), []
    for _ in range(n):
        t = model(torch.tensor([seq]))[0, -1].argmax().item()
        out.append(t)
        seq.append(t)
        if t in stop:
            break
    return out
