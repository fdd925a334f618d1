"""Preference pairs run with one copy of their prompt.

A pair's chosen and rejected responses follow the same prompt, and at this scale the prompt
is most of a pair's tokens (about 60% in the embedded world). Instead of running the prompt
twice, each pair becomes one row, prompt then chosen then rejected: an attention mask keeps
the rejected tokens from seeing the chosen ones, and their RoPE positions restart where the
prompt ends, so every token sees exactly what it would in a sequence of its own and gets the
same hidden state (up to float rounding). The reward model reads each side's last token (and
its log-probabilities when it has a likelihood term); DPO
takes each side's response log-probabilities, the rejected side's first token predicted from
the prompt's last position like the chosen side's. The idea is the prefix sharing of Wang et
al. (2024) for DPO, here with a boolean mask for `scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stagewise.errors import StagewiseError

Triple = tuple[list[int], list[int], list[int]]  # prompt ids, chosen response ids, rejected response ids


@dataclass
class PackedPairs:
    idx: torch.Tensor  # (B, T) prompt, chosen, rejected, then padding
    positions: torch.Tensor  # (B, T) RoPE positions; the rejected side restarts after the prompt
    attn_mask: torch.Tensor  # (B, 1, T, T) True where a query may attend to a key
    sources: torch.Tensor  # (2, B, R) row index whose output predicts each response token
    tokens: torch.Tensor  # (2, B, R) response token ids (0 past the end)
    mask: torch.Tensor  # (2, B, R) True on real response tokens
    last: torch.Tensor  # (2, B) row index of each side's last token, where a reward model reads it


def pack(triples: list[Triple], max_seq_len: int, device: torch.device | str = "cpu") -> PackedPairs:
    """One row per (prompt, chosen, rejected); each side must be non-empty and fit max_seq_len
    with its prompt."""
    for i, (p, c, r) in enumerate(triples):
        if not p or not c or not r:
            raise StagewiseError(f"pair {i}: prompt, chosen and rejected must each have at least one token")
        if len(p) + max(len(c), len(r)) > max_seq_len:
            raise StagewiseError(f"pair {i}: prompt + response of {len(p) + max(len(c), len(r))} tokens "
                                 f"exceeds max_seq_len {max_seq_len}")
    B = len(triples)
    T = max(len(p) + len(c) + len(r) for p, c, r in triples)
    R = max(max(len(c), len(r)) for _, c, r in triples)
    rows = [p + c + r + [0] * (T - len(p) - len(c) - len(r)) for p, c, r in triples]
    idx = torch.tensor(rows, dtype=torch.long)
    n_prompt = torch.tensor([len(p) for p, _, _ in triples])[:, None]  # (B, 1)
    n_chosen = torch.tensor([len(c) for _, c, _ in triples])[:, None]
    n_rejected = torch.tensor([len(r) for _, _, r in triples])[:, None]
    rejected_start = n_prompt + n_chosen

    t = torch.arange(T)[None, :]  # (1, T)
    in_rejected = t >= rejected_start  # (B, T); padding counts as rejected, it is never read
    positions = (t - n_chosen * in_rejected).clamp(max=max_seq_len - 1)
    in_chosen = (t >= n_prompt) & ~in_rejected
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn_mask = causal[None] & ~(in_rejected[:, :, None] & in_chosen[:, None, :])  # (B, T, T)

    j = torch.arange(R)[None, :]  # (1, R)
    chosen_src = n_prompt - 1 + j
    rejected_src = torch.where(j == 0, n_prompt - 1, rejected_start + j - 1)
    chosen_mask, rejected_mask = j < n_chosen, j < n_rejected
    chosen_tokens = idx.gather(1, (n_prompt + j).clamp(max=T - 1)) * chosen_mask
    rejected_tokens = idx.gather(1, (rejected_start + j).clamp(max=T - 1)) * rejected_mask
    sources = torch.stack([chosen_src * chosen_mask, rejected_src * rejected_mask])
    last = torch.stack([rejected_start - 1, rejected_start + n_rejected - 1]).squeeze(-1)
    return PackedPairs(idx.to(device), positions.to(device), attn_mask[:, None].to(device), sources.to(device),
                       torch.stack([chosen_tokens, rejected_tokens]).to(device),
                       torch.stack([chosen_mask.expand(B, R), rejected_mask.expand(B, R)]).to(device),
                       last.to(device))


def hidden_states(decoder, packed: PackedPairs) -> torch.Tensor:
    """(B, T, C) the decoder's output for every row of the pack."""
    return decoder(packed.idx, positions=packed.positions, attn_mask=packed.attn_mask)


def response_logprobs(model, packed: PackedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) per-token log-probs of a language model, each (B, R), 0 past the end.
    The LM head runs only where a response token is predicted."""
    base = getattr(model, "_orig_mod", model)
    return logprobs_from_hidden(base.lm_head, hidden_states(base.model, packed), packed)


def logprobs_from_hidden(lm_head, hidden: torch.Tensor, packed: PackedPairs, sides: tuple[int, ...] = (0, 1)
                         ) -> tuple[torch.Tensor, ...]:
    """`response_logprobs` from the decoder's output (B, T, C) and an LM head, for the given
    sides (0 chosen, 1 rejected)."""
    S, B, R = len(sides), packed.sources.shape[1], packed.sources.shape[2]
    C = hidden.size(-1)
    sources, tokens, mask = (x[list(sides)].permute(1, 0, 2) for x in (packed.sources, packed.tokens, packed.mask))
    picked = hidden.gather(1, sources.reshape(B, S * R, 1).expand(B, S * R, C))
    logits = lm_head(picked).float()  # (B, S*R, V)
    logprobs = -F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(B, S, R)
    return tuple((logprobs * mask).permute(1, 0, 2))  # S of (B, R)


def rewards(reward_model, packed: PackedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards (B,) of a reward model: its head read at each side's last
    token, plus its likelihood term when it has one."""
    return rewards_from_hidden(reward_model, hidden_states(reward_model.model, packed), packed)


def rewards_from_hidden(reward_model, hidden: torch.Tensor, packed: PackedPairs,
                        logprobs: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rewards` from the decoder's output (B, T, C); `logprobs`, the (chosen, rejected)
    log-probabilities under the reward model's `lm_logits`, when the caller has them already."""
    last = packed.last  # (2, B)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    scores = reward_model.head(torch.stack([hidden[rows, last[0]], hidden[rows, last[1]]]))  # (2, B)
    if reward_model.likelihood_weight is not None:
        chosen, rejected = logprobs or logprobs_from_hidden(reward_model.lm_logits, hidden, packed)
        scores = scores + reward_model.likelihood_weight * torch.stack([chosen.sum(-1), rejected.sum(-1)])
    return scores[0], scores[1]
