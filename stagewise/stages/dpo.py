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
`final_norm_lr_scale` gives the final norm's weights, which set the scale of the logits and with
it the entropy of the policy's samples, a learning rate of their own, as PPO's option does.

Iterative on-policy DPO (`on_policy_rounds`, with the embedded world): fixed pairs written in
advance show the model other answers' mistakes, not its own. Each round samples the policy's
own answers to fresh preference prompts, the simulated annotator ranks each prompt's answers
with the same noise as the world's fixed pairs and the best and the worst make a pair
(`on_policy`), and DPO runs over them with the policy as it was at the round's start as the
reference, as InstructGPT and Llama 2 collected comparisons on their latest models. With --data, DPO reads the given pairs (TRL's offline DPO).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagewise import checkpoint, data, methods, shared_prompt
from stagewise.batching import IndexBatches
from stagewise.errors import StagewiseError
from stagewise.losses import dpo_logits, dpo_loss, ipo_loss
from stagewise.model import weights_sha256
from stagewise.model_dir import load_language_model, save_model_dir
from stagewise.stages import common
from stagewise.stages import on_policy as on_policy_data
from stagewise.training import (MetricsLog, OptimConfig, Precision, Progress, autocast, autocast_dtype, lr_at,
                                make_optimizer, pick_device, seed_everything, set_lr)
from stagewise.world.build import DataConfig, make_world


@dataclass
class DPOConfig:
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0))
    world: DataConfig = field(default_factory=DataConfig)
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    rpo_alpha: float = 0.0  # weight of the chosen responses' per-token NLL added to the loss (RPO)
    final_norm_lr_scale: float = 1.0  # the final norm's weights, the logit scale, train at lr times this (as PPO's)
    batch_size: int = 32  # pairs per step
    group_by_length: bool = True  # batch pairs of similar length: less padding, same data
    epochs: float = 1.0
    max_steps: int = 0  # when > 0, overrides epochs
    # Iterative on-policy DPO, with the embedded world: each round samples the policy's own
    # answers to `round_prompts` preference prompts (`round_samples` each), the annotator ranks
    # each prompt's answers and the best and the worst make a pair (`on_policy`), and DPO runs
    # `epochs` over the pairs against the policy as it was at the round's start. 0 rounds, or --data: DPO on fixed pairs.
    on_policy_rounds: int = 0
    round_prompts: int = 6000
    round_samples: int = 4
    round_temperature: float = 1.0
    round_max_new_tokens: int = 48
    checkpoint_every: int = 100
    log_every: int = 10
    device: str = "auto"
    dtype: Precision = "auto"  # of the policy's and the reference's forward passes, as pretrain's
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


def pair_logprobs(model, batch: list[tuple[list[int], list[int], list[int]]], average: bool,
                  amp: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs (B,), summed or averaged over response tokens; each
    pair's prompt runs once (`shared_prompt`), under autocast to `amp` when given."""
    device = getattr(model, "_orig_mod", model).lm_head.weight.device
    packed = shared_prompt.pack(batch, model.cfg.max_seq_len, device)
    with autocast(device, amp):
        chosen, rejected = shared_prompt.response_logprobs(model, packed)
    total = torch.stack([chosen.sum(-1), rejected.sum(-1)])  # (2, B)
    if average:
        total = total / packed.mask.sum(-1).clamp(min=1)
    return total[0], total[1]


@torch.no_grad()
def reference_logprobs(model, encoded, average: bool, amp: torch.dtype | None,
                       batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs, computed as the policy's are in training (same `amp`), so that
    the policy starts at a DPO margin of zero."""
    chosen, rejected = [], []
    model.eval()
    for i in range(0, len(encoded), batch_size):
        c, r = pair_logprobs(model, encoded[i:i + batch_size], average, amp)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen).float().cpu(), torch.cat(rejected).float().cpu()


def round_prompts(cfg: DPOConfig, round_index: int) -> list[str]:
    """The preference prompts that on-policy round `round_index` samples answers to: disjoint
    slices of the world's preference prompts, in a seeded order."""
    prompts = sorted({p["prompt"] for p in common.world_data(cfg.world)["preferences"]})
    random.Random(cfg.seed).shuffle(prompts)
    n = min(cfg.round_prompts, len(prompts))
    first = (round_index * n) % len(prompts)
    return (prompts[first:] + prompts[:first])[:n]


def train(cfg: DPOConfig, parent: Path, out: Path, data_files: list[Path] | None = None, resume: bool = False,
          log=print) -> Path:
    if cfg.loss not in ("sigmoid", "ipo"):
        raise StagewiseError(f"dpo: loss must be sigmoid or ipo, got {cfg.loss!r}")
    started, t0 = methods.now(), time.time()
    device = pick_device(cfg.device)
    model, tokenizer, lineage = load_language_model(parent)
    on_policy = cfg.on_policy_rounds > 0 and not data_files
    fixed_pairs = None if on_policy else load_pairs(cfg, data_files)
    mode = common.prepare_out(out, resume)
    if mode == "finished":
        log(f"dpo: {out} is already finished; nothing to do")
        return out

    seed_everything(cfg.seed)
    model = model.to(device)
    amp = autocast_dtype(device, cfg.dtype)
    optimizer = make_optimizer(model, cfg.optim, {model.model.norm.weight: cfg.final_norm_lr_scale})
    state = checkpoint.load_latest(out / common.TRAIN_STATE, warn=log) if mode == "resume" else None
    n_rounds = cfg.on_policy_rounds if on_policy else 1
    people = make_world(cfg.world).people_by_name if on_policy else None
    metrics = MetricsLog(out / "metrics.jsonl")
    seen: list[dict] = state["seen"] if state else []  # the pairs of the finished rounds, for the data hash
    step = 0  # over all rounds
    for round_index in range(state["round"] if state else 0, n_rounds):
        resuming = state is not None and state["round"] == round_index
        if resuming and on_policy:
            pairs = state["pairs"]
        elif on_policy:
            comparisons = on_policy_data.collect(
                model, tokenizer, round_prompts(cfg, round_index), people, samples=cfg.round_samples,
                temperature=cfg.round_temperature, max_new_tokens=cfg.round_max_new_tokens,
                seed=cfg.seed * 1_000_003 + round_index)
            pairs = comparisons.pairs
            metrics.write(step=step, round=round_index + 1, **{"samples/gold_score": comparisons.sample_score,
                                                               "samples/pairs": len(pairs)})
            log(f"dpo: round {round_index + 1}/{n_rounds}: {comparisons.samples:,} sampled answers score "
                f"{comparisons.sample_score:.3f} with the annotator; {len(pairs):,} pairs")
            if not pairs:
                raise StagewiseError("dpo: the annotator scored every sampled answer alike; no pairs to learn from")
        else:
            pairs = fixed_pairs
        encoded = common.preference_triples(tokenizer, pairs, model.cfg.max_seq_len)
        lengths = [len(p) + len(c) + len(r) for p, c, r in encoded] if cfg.group_by_length else None
        batches = IndexBatches(len(encoded), cfg.batch_size, cfg.seed + round_index, lengths)
        round_steps = cfg.max_steps or max(1, int(cfg.epochs * len(batches)))
        if resuming:
            ref_chosen, ref_rejected = state["ref_chosen"], state["ref_rejected"]
        else:
            # The policy at the start of the round is its reference (the SFT model in the first
            # round), so the reference's log-probs are the policy's now; only the pairs that the
            # round's steps will draw are scored (a fresh copy of the batch order).
            plan = IndexBatches(len(encoded), cfg.batch_size, cfg.seed + round_index, lengths)
            used = sorted({i for _ in range(round_steps) for i in plan.next()})
            ref_chosen, ref_rejected = torch.zeros(len(encoded)), torch.zeros(len(encoded))
            ref_chosen[used], ref_rejected[used] = reference_logprobs(model, [encoded[i] for i in used],
                                                                      cfg.loss == "ipo", amp)
        round_step = 0
        if resuming:
            common.apply_state(state, model, optimizer, batches)
            round_step, step = state["round_step"], state["step"]
            log(f"dpo: resumed at step {step}" + (f" (round {round_index + 1})" if on_policy else ""))
        state = None
        # What a checkpoint needs to continue this round: its pairs when they were sampled, and
        # the reference's log-probs (the round's starting policy is gone once training moves it).
        round_state = {"round": round_index, "pairs": pairs if on_policy else None, "seen": seen,
                       "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
        log(f"dpo: {len(encoded):,} preference pairs, {cfg.loss} loss, beta {cfg.beta}; {round_steps} steps of "
            f"{cfg.batch_size} pairs on {device}" + (f" (round {round_index + 1}/{n_rounds})" if on_policy else ""))
        step = run_round(cfg, model, optimizer, encoded, batches, round_state, round_steps, round_step, step,
                         metrics, out, amp, last=round_index == n_rounds - 1)
        seen = seen + pairs

    final = {"steps": step, "seconds": round(time.time() - t0, 1)}
    if on_policy:
        final["rounds"] = n_rounds
    metrics.write(step=step, **final)
    log(f"dpo: {step} steps in {final['seconds']} s")
    entry = methods.lineage_entry(
        "dpo", parent=str(parent), data_sha256=common.data_sha256(seen), config=dataclasses.asdict(cfg),
        metrics=final, weights_sha256=weights_sha256(model), started=started)
    save_model_dir(out, model, tokenizer, lineage + [entry])
    common.finish_out(out, cfg.keep_train_state)
    log(f"dpo: wrote {out}")
    return out


def run_round(cfg: DPOConfig, model, optimizer, encoded, batches, round_state: dict, round_steps: int,
              round_step: int, step: int, metrics: MetricsLog, out: Path, amp: torch.dtype | None, last: bool) -> int:
    """DPO steps over one round's pairs against `round_state`'s reference log-probs (the
    learning-rate schedule restarts each round); returns the step count over all rounds."""
    average = cfg.loss == "ipo"
    ref_chosen, ref_rejected = round_state["ref_chosen"], round_state["ref_rejected"]
    device = getattr(model, "_orig_mod", model).lm_head.weight.device
    progress = Progress("dpo", round_steps, start=round_step)
    loss_fn = ipo_loss if cfg.loss == "ipo" else dpo_loss
    model.train()
    while round_step < round_steps:
        lr = lr_at(round_step, round_steps, cfg.optim)
        set_lr(optimizer, lr)
        index = batches.next()
        chosen, rejected = pair_logprobs(model, [encoded[i] for i in index], average, amp)
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
        round_step += 1
        step += 1
        if round_step % cfg.log_every == 0 or round_step == round_steps:
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
            progress.update(round_step, loss=record["loss"], margin=record["rewards/margins"],
                            acc=record["rewards/accuracies"])
        if (round_step % cfg.checkpoint_every == 0 or round_step == round_steps) and not (last and round_step == round_steps):
            common.save_state(out, step, model, optimizer, batches, round_step=round_step, **round_state)
    progress.close()
    return step
