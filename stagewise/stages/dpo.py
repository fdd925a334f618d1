"""`stagewise dpo`: direct preference optimisation of the SFT model on preference pairs.

The policy starts as a copy of the SFT model, which also serves as the frozen reference. The
reference's log-probabilities of every chosen and rejected response are computed once before
training, so each step runs the policy only. The loss is sigmoid DPO (beta 0.1 by default) or
IPO (`loss=ipo`, on length-averaged log-probabilities as TRL does). Logged as TRL logs it:
rewards/chosen, rewards/rejected, rewards/margins (beta times the policy-to-reference
log-ratios) and rewards/accuracies. Both responses of a pair run in one row behind a single copy
of their prompt (`shared_prompt`). `rpo_alpha` adds the chosen responses' per-token negative
log-likelihood to the loss (RPO, Pang et al. 2024; TRL's `rpo_alpha`): DPO alone can lower the
likelihood of chosen and rejected answers together, and the NLL term keeps the chosen ones up.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagewise import data, methods, shared_prompt
from stagewise.batching import IndexBatches
from stagewise.errors import StagewiseError
from stagewise.losses import dpo_logits, dpo_loss, ipo_loss
from stagewise.model import weights_sha256
from stagewise.model_dir import load_language_model, save_model_dir
from stagewise.stages import common
from stagewise.training import (MetricsLog, OptimConfig, Progress, lr_at, make_optimizer, pick_device,
                                seed_everything, set_lr)
from stagewise.world.build import DataConfig


@dataclass
class DPOConfig:
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0))
    world: DataConfig = field(default_factory=DataConfig)
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    rpo_alpha: float = 0.0  # weight of the chosen responses' per-token NLL added to the loss (RPO)
    batch_size: int = 32  # pairs per step
    group_by_length: bool = True  # batch pairs of similar length: less padding, same data
    epochs: float = 1.0
    max_steps: int = 0  # when > 0, overrides epochs
    checkpoint_every: int = 100
    log_every: int = 10
    device: str = "auto"
    keep_train_state: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_stage_arguments(parser, parent=True)


def command(args: argparse.Namespace) -> int:
    cfg = common.resolve(DPOConfig, "dpo", args)
    train(cfg, args.parent, args.out, data_files=args.data, resume=args.resume)
    return 0


def load_pairs(cfg: DPOConfig, data_files: list[Path] | None) -> list[dict]:
    if data_files:
        return data.load(data_files, "preference")
    return common.world_data(cfg.world)["preferences"]


def pair_logprobs(model, batch: list[tuple[list[int], list[int], list[int]]], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs (B,), summed or averaged over response tokens; each
    pair's prompt runs once (`shared_prompt`)."""
    device = getattr(model, "_orig_mod", model).lm_head.weight.device
    packed = shared_prompt.pack(batch, model.cfg.max_seq_len, device)
    chosen, rejected = shared_prompt.response_logprobs(model, packed)
    total = torch.stack([chosen.sum(-1), rejected.sum(-1)])  # (2, B)
    if average:
        total = total / packed.mask.sum(-1).clamp(min=1)
    return total[0], total[1]


@torch.no_grad()
def reference_logprobs(model, encoded, average: bool, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [], []
    model.eval()
    for i in range(0, len(encoded), batch_size):
        c, r = pair_logprobs(model, encoded[i:i + batch_size], average)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen).float().cpu(), torch.cat(rejected).float().cpu()


def train(cfg: DPOConfig, parent: Path, out: Path, data_files: list[Path] | None = None, resume: bool = False,
          log=print) -> Path:
    if cfg.loss not in ("sigmoid", "ipo"):
        raise StagewiseError(f"dpo: loss must be sigmoid or ipo, got {cfg.loss!r}")
    started, t0 = methods.now(), time.time()
    device = pick_device(cfg.device)
    model, tokenizer, lineage = load_language_model(parent)
    pairs = load_pairs(cfg, data_files)
    mode = common.prepare_out(out, resume)
    if mode == "finished":
        log(f"dpo: {out} is already finished; nothing to do")
        return out

    seed_everything(cfg.seed)
    model = model.to(device)
    encoded = common.preference_triples(tokenizer, pairs, model.cfg.max_seq_len)
    average = cfg.loss == "ipo"
    optimizer = make_optimizer(model, cfg.optim)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in encoded] if cfg.group_by_length else None
    batches = IndexBatches(len(encoded), cfg.batch_size, cfg.seed, lengths)
    max_steps = cfg.max_steps or max(1, int(cfg.epochs * len(batches)))
    # The policy starts equal to the reference, so the reference's log-probs are the policy's now;
    # only the pairs that the run's steps will draw are scored (a fresh copy of the batch order).
    plan = IndexBatches(len(encoded), cfg.batch_size, cfg.seed, lengths)
    used = sorted({i for _ in range(max_steps) for i in plan.next()})
    ref_chosen, ref_rejected = torch.zeros(len(encoded)), torch.zeros(len(encoded))
    ref_chosen[used], ref_rejected[used] = reference_logprobs(model, [encoded[i] for i in used], average)
    step = 0
    if mode == "resume" and (state := common.restore_state(out, model, optimizer, batches, log)):
        step = state["step"]
        log(f"dpo: resumed at step {step}")
    log(f"dpo: {len(encoded):,} preference pairs, {cfg.loss} loss, beta {cfg.beta}; {max_steps} steps of "
        f"{cfg.batch_size} pairs on {device}")

    metrics = MetricsLog(out / "metrics.jsonl")
    progress = Progress("dpo", max_steps, start=step)
    loss_fn = ipo_loss if cfg.loss == "ipo" else dpo_loss
    model.train()
    while step < max_steps:
        lr = lr_at(step, max_steps, cfg.optim)
        set_lr(optimizer, lr)
        index = batches.next()
        chosen, rejected = pair_logprobs(model, [encoded[i] for i in index], average)
        rc, rr = ref_chosen[index].to(device), ref_rejected[index].to(device)
        loss = loss_fn(chosen, rejected, rc, rr, cfg.beta)
        nll = None
        if cfg.rpo_alpha:
            tokens = torch.tensor([len(encoded[i][1]) for i in index], device=device)
            nll = -(chosen if average else chosen / tokens).mean()
            loss = loss + cfg.rpo_alpha * nll
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == max_steps:
            with torch.no_grad():
                reward_chosen = cfg.beta * (chosen - rc)
                reward_rejected = cfg.beta * (rejected - rr)
                record = {"loss": loss.item(), "rewards/chosen": reward_chosen.mean().item(),
                          "rewards/rejected": reward_rejected.mean().item(),
                          "rewards/margins": (reward_chosen - reward_rejected).mean().item(),
                          "rewards/accuracies": (dpo_logits(chosen, rejected, rc, rr) > 0).float().mean().item()}
                if nll is not None:
                    record["nll_loss"] = nll.item()
            metrics.write(step=step, lr=lr, **record)
            progress.update(step, loss=record["loss"], margin=record["rewards/margins"],
                            acc=record["rewards/accuracies"])
        if step % cfg.checkpoint_every == 0 and step < max_steps:
            common.save_state(out, step, model, optimizer, batches)
    progress.close()

    final = {"steps": step, "seconds": round(time.time() - t0, 1)}
    metrics.write(step=step, **final)
    log(f"dpo: {step} steps in {final['seconds']} s")
    entry = methods.lineage_entry(
        "dpo", parent=str(parent), data_sha256=common.data_sha256(pairs), config=dataclasses.asdict(cfg),
        metrics=final, weights_sha256=weights_sha256(model), started=started)
    save_model_dir(out, model, tokenizer, lineage + [entry])
    common.finish_out(out, cfg.keep_train_state)
    log(f"dpo: wrote {out}")
    return out
