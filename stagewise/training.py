"""Pieces every training stage calls, so that they cannot drift apart: the optimizer and its
learning-rate schedule, seeding, the device and precision, throughput and MFU, the metrics log
and the progress display. There is deliberately no Trainer class: each stage owns its loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from stagewise.muon import Muon, MuonAdamW

# A training stage's `dtype`: "auto" (see `autocast_dtype`), or fp32 or bf16 autocast throughout.
Precision = Literal["auto", "float32", "bfloat16"]


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine, linear or constant (after warm-up)
    # > 0: the blocks' weight matrices train with Muon (`stagewise.muon`) at this peak lr, on the
    # same schedule; the embedding, the norms and any head stay with AdamW at `lr`.
    muon_lr: float = 0.0


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                   lr_scales: dict[torch.nn.Parameter, float] | None = None) -> torch.optim.AdamW | MuonAdamW:
    """AdamW with weight decay on matrices only (not on norms), as nanoGPT and litgpt do.
    `lr_scales` gives some parameters a learning rate of their own, the schedule's times a
    factor, each in a group without weight decay (as nanochat gives its scalars their own lr);
    `set_lr` keeps the factors. With `muon_lr`, see `MuonAdamW`."""
    scaled = {id(p): scale for p, scale in (lr_scales or {}).items()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in scaled]
    hidden = [p for n, p in named if p.dim() == 2 and ".layers." in f".{n}"] if cfg.muon_lr > 0 else []
    params = [p for _, p in named if not any(p is h for h in hidden)]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": [p], "weight_decay": 0.0, "lr": cfg.lr * scale, "lr_scale": scale}
               for p, scale in (lr_scales or {}).items() if p.requires_grad]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if not hidden:
        return adamw
    # Both decay a weight by lr * weight_decay per step: Muon's decay is scaled so that its
    # matrices shrink at AdamW's pace, whatever the ratio of the two learning rates.
    scale = cfg.muon_lr / cfg.lr
    muon = Muon([{"params": hidden, "lr": cfg.muon_lr, "lr_scale": scale}], lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay / scale)
    return MuonAdamW(muon, adamw)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine or linear decay to lr * min_lr_ratio."""
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: `lr` times the group's `lr_scale` (see `make_optimizer`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def reproducible(device: torch.device) -> None:
    """Make training bit-reproducible on CPU, compiled or not. Compiled, inductor accumulates the
    embedding's gradient with atomic adds from several threads, so the order of the float
    additions, and the weights, change from run to run; in deterministic mode it calls aten's
    ordered index_put_ instead, at no measurable cost at the default size here. GPUs keep their
    faster kernels."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype of training, None for plain fp32. "auto": bf16 on GPUs, fp32 on CPUs.
    The default preset's settings were tuned in fp32, and bf16 costs a model this small more
    than it saves on a CPU: on a Zen 4 CPU (AVX512-BF16) a compiled pre-training step took 205 ms
    against 257 ms in fp32, but the default pipeline's base model reached a held-out loss of 0.575
    against 0.558 and fact cloze 0.929 against 0.950, and its SFT model answered 9% of the sums
    against 94%. `dtype=bfloat16` still asks for bf16 on a CPU. Attention on CPUs, master weights,
    optimizer state and the loss are fp32 either way."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"float32": None, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, amp: torch.dtype | None):
    """The autocast context for a forward pass in `amp` (none for fp32)."""
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


_PEAK: dict[tuple[str, torch.dtype], float] = {}


def matmul_peak_flops(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                      n: int = 1024, seconds: float = 0.5) -> float:
    """This machine's measured matmul throughput in FLOP/s, the denominator of MFU: the best of
    five short windows, so that a moment of load from another process does not lower it."""
    key = (str(device), dtype)
    if key not in _PEAK:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        best = 0.0
        for _ in range(5):
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 5:
                a @ b
                reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
        _PEAK[key] = best
    return _PEAK[key]


class Throughput:
    """Tokens per second and model FLOPs utilisation over the last interval."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> tuple[float, float]:
        """(tokens/s, MFU) since the last read; resets the interval."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        self.tokens, self.start = 0, time.perf_counter()
        return tokens_per_s, tokens_per_s * self.flops_per_token / self.peak


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl`, flushed as it goes, so that a crash
    keeps every line written before it."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


_display = None  # set by `stagewise run`: one display for the whole pipeline


def set_display(display) -> None:
    """Route every Progress to `display(name, step, total, fraction_done, eta_seconds, line)`
    (None restores the per-stage lines)."""
    global _display
    _display = display


class Progress:
    """One status line per stage: a live line on a terminal, periodic lines in a log. `start`
    is the step a resumed run starts from, so the time left is estimated from this run's pace."""

    def __init__(self, name: str, total: int, enabled: bool = True, stream=None, start: int = 0):
        self.name, self.total, self.enabled, self.first = name, total, enabled, start
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, **values) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        done = step / max(self.total, 1)
        pace = (step - self.first) / max(elapsed, 1e-9)
        eta = (self.total - step) / pace if pace > 0 else float("nan")
        fields = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        line = (f"{self.name} {step:>6}/{self.total} [{'#' * int(20 * done):<20}] {fields}  "
                f"{_duration(elapsed)} elapsed, {_duration(eta)} left")
        if _display is not None:
            _display(self.name, step, self.total, done, eta, line)
            return
        if self.live:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.live and _display is None:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: not known yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def train_step(train_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, *, grad_accum: int, grad_clip: float, device: torch.device,
               amp: torch.dtype | None, dist=None, supervised_only: bool = False) -> torch.Tensor:
    """One optimizer step on a batch (B, T) of inputs and next-token targets (-100 = no loss),
    split into `grad_accum` micro-batches. `train_model` is what runs forward (compiled and/or
    DDP-wrapped), `model` owns the parameters. Returns the mean micro-batch loss (detached).
    Under DDP, gradients are synchronised only on the last micro-batch. `supervised_only`: see
    `Transformer.forward`."""
    micro = x.shape[0] // grad_accum
    loss_sum = torch.zeros((), device=device)
    for i in range(grad_accum):
        xb, yb = x[i * micro:(i + 1) * micro].to(device), y[i * micro:(i + 1) * micro].to(device)
        sync = dist is None or i == grad_accum - 1
        with (train_model.no_sync() if not sync else contextlib.nullcontext()), autocast(device, amp):
            _, loss = train_model(xb, yb, supervised_only=supervised_only)
            (loss / grad_accum).backward()
        loss_sum += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / grad_accum
