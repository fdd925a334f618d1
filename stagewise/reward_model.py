"""The reward model: the language model's decoder with a scalar head read at the last token.

Its parameters are named as transformers' `LlamaForSequenceClassification` names them (the
decoder under `model.`, the head as `score`), and its directory says so in config.json, so
`AutoModelForSequenceClassification.from_pretrained(dir)` loads it with the same scores. PPO
also uses it as the critic, reading the head at every position (`values`).

With `likelihood`, the reward also counts how likely the decoder finds the response: it adds
`likelihood_weight` (learnt with the head) times the response's summed log-probability under
the language-model head tied to the token embedding. A small decoder read at one token cannot
recompute a sum or recall a person's city and compare it with the written one; the language
model it came from predicts both, and its log-probability of a wrong sum or city is low. The
term is the implicit reward of a language model, as in DPO, without a reference. transformers'
classifier has no such term: for such a reward model it gives the head's part of the score
(config.json says `likelihood_reward`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stagewise.batching import pad_right
from stagewise.errors import StagewiseError
from stagewise.model import Decoder, ModelConfig, Transformer, fp32_logits

ARCHITECTURE = "LlamaForSequenceClassification"


class RewardModel(nn.Module):
    def __init__(self, cfg: ModelConfig, likelihood: bool = False):
        super().__init__()
        if likelihood:
            check_likelihood(cfg)
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        self.likelihood_weight = nn.Parameter(torch.zeros(())) if likelihood else None

    @classmethod
    def from_language_model(cls, lm: Transformer, likelihood: bool = False) -> "RewardModel":
        """The LM's decoder with a zero-initialised head (and likelihood weight): every response
        starts at reward 0."""
        rm = cls(lm.cfg, likelihood)
        rm.model.load_state_dict(lm.model.state_dict())
        nn.init.zeros_(rm.score.weight)
        return rm

    def freeze_bottom(self, n_layers: int) -> None:
        """Keep the token embedding and the lowest `n_layers` blocks as they are (none when 0):
        backward then stops above them, and costs a fraction of a full one."""
        if n_layers:
            self.model.embed_tokens.requires_grad_(False)
        for block in self.model.layers[:n_layers]:
            block.requires_grad_(False)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., V) through the tied token embedding, in fp32 as the language model's."""
        return fp32_logits(hidden, self.model.embed_tokens.weight)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (...) the head's output, in fp32 also under autocast: Bradley-
        Terry and PPO read differences of rewards, which bf16's 8-bit mantissa would round."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.score(hidden.float()).squeeze(-1)

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T) the head's output at every position."""
        return self.head(self.model(idx))

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) right-padded token ids, (B,) real lengths and, for the likelihood term, (B,)
        where each response starts -> (B,) rewards."""
        hidden = self.model(idx)  # (B, T, C)
        reward = self._head(hidden, lengths)  # (B,)
        if self.likelihood_weight is None:
            return reward
        in_response, logprobs = self._response_logprobs(hidden, idx, lengths, starts)
        row_of = in_response.nonzero()[:, 0]
        return reward + self.likelihood_weight * torch.zeros_like(reward).index_add(0, row_of, logprobs)

    def _head(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) the head's output at each row's last token."""
        return self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1])

    def _response_logprobs(self, hidden: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor,
                           starts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T-1) which positions predict a response token, and (N,) those tokens' log-probs."""
        if starts is None:
            raise StagewiseError("reward model: its likelihood term needs where each response starts")
        # The LM head runs only where a response token is predicted: position t-1 predicts token t.
        t = torch.arange(1, idx.shape[1], device=idx.device)[None, :]
        in_response = (t >= starts[:, None]) & (t < lengths[:, None])  # (B, T-1)
        logprobs = -F.cross_entropy(self.lm_logits(hidden[:, :-1][in_response]).float(), idx[:, 1:][in_response],
                                    reduction="none")
        return in_response, logprobs

    def reward_per_token(self, prompts: list[list[int]], responses: list[list[int]],
                         pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward of token-id responses in two parts, whose sum over a row is `score_responses`:
        (B,) the head's score at the last token, and (B, R) the likelihood term of each response
        token (likelihood_weight times its log-probability; zeros without the term, and after a
        response's end), R the longest response."""
        idx, lengths, starts = self._token_batch(prompts, responses, pad_id)
        hidden = self.model(idx)
        per_token = torch.zeros(len(responses), max(len(r) for r in responses), device=idx.device)
        if self.likelihood_weight is not None:
            in_response, logprobs = self._response_logprobs(hidden, idx, lengths, starts)
            row, col = in_response.nonzero().unbind(1)  # column c predicts token c + 1
            per_token[row, col + 1 - starts[row]] = self.likelihood_weight * logprobs
        return self._head(hidden, lengths), per_token

    def score_responses(self, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> torch.Tensor:
        """(B,) rewards of token-id responses to token-id prompts, in one right-padded batch."""
        return self(*self._token_batch(prompts, responses, pad_id))

    def _token_batch(self, prompts: list[list[int]], responses: list[list[int]],
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (B, T) prompt-then-response ids, (B,) their lengths and (B,) where each
        response starts."""
        device = self.score.weight.device
        sequences = [p + r for p, r in zip(prompts, responses)]
        return (pad_right(sequences, pad_id).to(device), torch.tensor([len(s) for s in sequences], device=device),
                torch.tensor([len(p) for p in prompts], device=device))

    def config_extra(self, pad_token_id: int) -> dict:
        """config.json keys that make transformers read this as a one-label sequence classifier."""
        extra = {"architectures": [ARCHITECTURE], "num_labels": 1, "id2label": {"0": "LABEL_0"},
                 "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id}
        if self.likelihood_weight is not None:
            extra["likelihood_reward"] = True
        return extra


def check_likelihood(cfg: ModelConfig) -> None:
    """The likelihood term reads the tied token embedding: refuse a model with an untied head."""
    if not cfg.tie_embeddings:
        raise StagewiseError("the reward model's likelihood term reads the tied token embedding, and this "
                             "language model has an untied head (train it with likelihood=false)")


def check_frozen_blocks(key: str, n_layers: int, cfg: ModelConfig) -> None:
    """`freeze_bottom` takes from none to all of the model's blocks."""
    if not 0 <= n_layers <= cfg.n_layer:
        raise StagewiseError(f"{key} {n_layers} is outside 0..{cfg.n_layer}, the number of blocks of the model")
