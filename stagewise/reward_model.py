"""The reward model: the language model's decoder with a scalar head read at the last token.

Its parameters are named as transformers' `LlamaForSequenceClassification` names them (the
decoder under `model.`, the head as `score`), and its directory says so in config.json, so
`AutoModelForSequenceClassification.from_pretrained(dir)` loads it with the same scores. PPO
also uses it as the critic, reading the head at every position (`values`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from stagewise.model import Decoder, ModelConfig, Transformer

ARCHITECTURE = "LlamaForSequenceClassification"


class RewardModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)

    @classmethod
    def from_language_model(cls, lm: Transformer) -> "RewardModel":
        """The LM's decoder with a zero-initialised head: every response starts at reward 0."""
        rm = cls(lm.cfg)
        rm.model.load_state_dict(lm.model.state_dict())
        nn.init.zeros_(rm.score.weight)
        return rm

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T) the head's output at every position."""
        return self.score(self.model(idx)).squeeze(-1)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded token ids and (B,) real lengths -> (B,) rewards at the last real token."""
        hidden = self.model(idx)  # (B, T, C)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # (B, C)
        return self.score(last).squeeze(-1)

    def config_extra(self, pad_token_id: int) -> dict:
        """config.json keys that make transformers read this as a one-label sequence classifier."""
        return {"architectures": [ARCHITECTURE], "num_labels": 1, "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id}
