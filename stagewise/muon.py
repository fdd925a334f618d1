"""Muon (Jordan et al., 2024): momentum SGD whose update of a weight matrix is orthogonalised by
a Newton-Schulz iteration, so that every direction of the matrix moves at the same rate.
nanochat and the modded-nanogpt speedruns train their hidden matrices with it and everything
else with AdamW (`MuonAdamW`); here it reaches a lower held-out loss in the same number of
pre-training steps (see the default preset).

`Muon` is `torch.optim.Muon`'s algorithm (same momentum, Nesterov blend, quintic iteration,
learning-rate adjustment by shape and decoupled weight decay) with one difference: the iteration
runs in fp32 on CPUs. torch's runs in bf16, which a CPU without bf16 matrix instructions
emulates; at the default model size its step took 31 ms there, against 4 ms for AdamW's.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's, from Keller Jordan's post


def orthogonalise(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """(A, B) -> (A, B): about U V^T of g = U S V^T, by a quintic Newton-Schulz iteration in
    `dtype`. The singular values land near 1, not on it: between 0.68 and 1.14 for a random
    128 x 384 matrix."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. `ns_dtype`: the iteration's dtype; None is bf16 on GPUs and
    fp32 elsewhere."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns_steps": ns_steps, "ns_dtype": ns_dtype}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon trains matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = group["ns_dtype"] or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
                update = orthogonalise(update, group["ns_steps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                # A tall matrix's rows outnumber its columns: scaled up as torch's "original" adjustment.
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return None


class MuonAdamW:
    """Muon for the blocks' weight matrices and AdamW for every other parameter, stepped as one
    optimizer: orthogonalising an update only makes sense for hidden matrices, not for the
    embedding, the norms' gains or a head."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
