"""`stagewise reward`: a reward model learnt from preference pairs.

The SFT model's decoder gets a scalar head read at the last token of a rendered exchange (the
assistant's `<|im_end|>`); the Bradley-Terry loss pushes the chosen response's reward above
the rejected one's, with an optional margin and a reward-centring term that keeps rewards near
zero. Both sides of a pair run in one row behind a single copy of their prompt
(`shared_prompt`).

With `lm_coef` > 0 the decoder also keeps predicting the chosen responses through the language
model's head, as in GRM (Yang et al., 2024): the language-modelling term keeps the hidden states
those of a language model, and the reward model generalises better to pairs it did not see. The
head is the tied token embedding, or an untied model's own LM head, frozen; the reward model's
directory does not keep it.

With `likelihood`, the reward adds a learnt weight times the response's log-likelihood under
that tied head (`reward_model`), and Bradley-Terry trains both parts. The language model
predicts a sum or a person's city better than a head read at one token can check them.

With `freeze_layers`, the token embedding and the lowest blocks stay the SFT model's: the
backward pass runs through the top blocks only, and the decoder that the likelihood term reads
keeps more of what the SFT model knew.

`pairwise_accuracy` is measured on held-out pairs: with the embedded world, pairs ordered by the
annotator's noiseless score, so the figure says how well the learnt proxy reproduces the
annotator itself rather than its noisy labels.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagewise import data, methods, shared_prompt
from stagewise.batching import IndexBatches
from stagewise.errors import StagewiseError
from stagewise.losses import bradley_terry_loss
from stagewise.model import Transformer, weights_sha256
from stagewise.model_dir import load_language_model, save_model_dir
from stagewise.reward_model import RewardModel, check_frozen_blocks, check_likelihood
from stagewise.stages import common
from stagewise.training import (MetricsLog, OptimConfig, Precision, Progress, autocast, autocast_dtype, lr_at,
                                make_optimizer, pick_device, seed_everything, set_lr)
from stagewise.world.build import DataConfig


@dataclass
class RewardConfig:
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=20, weight_decay=0.0))
    world: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 32  # pairs per step
    group_by_length: bool = True  # batch pairs of similar length: less padding, same data
    epochs: float = 1.0
    max_steps: int = 0  # when > 0, overrides epochs
    margin: float = 0.0
    center_coef: float = 0.01  # reward centring: coef * (r_chosen + r_rejected)^2
    lm_coef: float = 0.0  # GRM: weight of the chosen responses' language-modelling loss
    likelihood: bool = False  # add the responses' learnt-weighted log-likelihood to the reward (`reward_model`)
    freeze_layers: int = 0  # the token embedding and this many of the lowest blocks stay the SFT model's
    heldout_share: float = 0.05  # of user pairs, held out for pairwise_accuracy
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    device: str = "auto"
    dtype: Precision = "auto"  # of the training forward passes, as pretrain's
    keep_train_state: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_stage_arguments(parser, parent=True)


def command(args: argparse.Namespace) -> int:
    cfg = common.resolve(RewardConfig, "reward", args)
    train(cfg, args.parent, args.out, data_files=args.data, resume=args.resume)
    return 0


def load_pairs(cfg: RewardConfig, data_files: list[Path] | None) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs)."""
    if data_files:
        pairs = data.load(data_files, "preference")
        n_heldout = max(1, int(len(pairs) * cfg.heldout_share))
        if len(pairs) <= n_heldout:
            raise StagewiseError(f"{data_files[0]}: too few preference pairs ({len(pairs)}) to hold some out")
        shuffled = pairs[:]
        random.Random(cfg.seed).shuffle(shuffled)
        return shuffled[n_heldout:], shuffled[:n_heldout]
    world = common.world_data(cfg.world)
    return world["preferences"], world["heldout_preferences"]


def score_pairs(model: RewardModel, triples: list[shared_prompt.Triple], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards (B,), each pair's prompt run once (`shared_prompt`)."""
    return shared_prompt.rewards(model, shared_prompt.pack(triples, model.cfg.max_seq_len, device))


def language_model_head(model: RewardModel, lm: Transformer, device: torch.device):
    """hidden (..., C) -> logits (..., V) for the GRM term: through the reward model's own token
    embedding when the language model ties its head to it, else through a frozen copy of the
    language model's head."""
    if lm.cfg.tie_embeddings:
        return model.lm_logits
    return copy.deepcopy(lm.lm_head).to(device).requires_grad_(False)


def chosen_nll(lm_head, hidden: torch.Tensor, packed: shared_prompt.PackedPairs) -> torch.Tensor:
    """Mean negative log-likelihood of the chosen responses' tokens: GRM's language-modelling term."""
    chosen_logprobs, = shared_prompt.logprobs_from_hidden(lm_head, hidden, packed, sides=(0,))
    return -chosen_logprobs.sum() / packed.mask[0].sum()


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, pairs: list[shared_prompt.Triple], device: torch.device,
                      batch_size: int = 64) -> float:
    model.eval()
    right = 0
    for i in range(0, len(pairs), batch_size):
        chosen, rejected = score_pairs(model, pairs[i:i + batch_size], device)
        right += int((chosen > rejected).sum())
    model.train()
    return right / len(pairs)


def train(cfg: RewardConfig, parent: Path, out: Path, data_files: list[Path] | None = None, resume: bool = False,
          log=print) -> Path:
    started, t0 = methods.now(), time.time()
    device = pick_device(cfg.device)
    lm, tokenizer, lineage = load_language_model(parent)
    pairs, heldout = load_pairs(cfg, data_files)
    if cfg.likelihood:
        try:
            check_likelihood(lm.cfg)
        except StagewiseError as e:
            raise StagewiseError(f"{parent}: {e}") from None
    try:
        check_frozen_blocks("freeze_layers", cfg.freeze_layers, lm.cfg)
    except StagewiseError as e:
        raise StagewiseError(f"{parent}: {e}") from None
    mode = common.prepare_out(out, resume)
    if mode == "finished":
        log(f"reward: {out} is already finished; nothing to do")
        return out

    seed_everything(cfg.seed)
    model = RewardModel.from_language_model(lm, cfg.likelihood).to(device)
    model.freeze_bottom(cfg.freeze_layers)
    lm_head = language_model_head(model, lm, device)
    del lm
    train_pairs = common.preference_triples(tokenizer, pairs, model.cfg.max_seq_len)
    heldout_pairs = common.preference_triples(tokenizer, heldout, model.cfg.max_seq_len)
    optimizer = make_optimizer(model, cfg.optim)
    lengths = [len(p) + len(c) + len(r) for p, c, r in train_pairs] if cfg.group_by_length else None
    batches = IndexBatches(len(train_pairs), cfg.batch_size, cfg.seed, lengths)
    max_steps = cfg.max_steps or max(1, int(cfg.epochs * len(batches)))
    step = 0
    if mode == "resume" and (state := common.restore_state(out, model, optimizer, batches, log)):
        step = state["step"]
        log(f"reward: resumed at step {step}")
    log(f"reward: {len(train_pairs):,} preference pairs, {len(heldout_pairs):,} held out; {max_steps} steps of "
        f"{cfg.batch_size} pairs on {device}")

    metrics = MetricsLog(out / "metrics.jsonl")
    progress = Progress("reward", max_steps, start=step)
    amp = autocast_dtype(device, cfg.dtype)
    model.train()
    while step < max_steps:
        lr = lr_at(step, max_steps, cfg.optim)
        set_lr(optimizer, lr)
        chunk = [train_pairs[i] for i in batches.next()]
        packed = shared_prompt.pack(chunk, model.cfg.max_seq_len, device)
        with autocast(device, amp):
            hidden = shared_prompt.hidden_states(model.model, packed)
            # With the likelihood term, its log-probabilities give GRM's term too: the same tied head.
            logprobs = shared_prompt.logprobs_from_hidden(lm_head, hidden, packed) if cfg.likelihood else None
            chosen, rejected = shared_prompt.rewards_from_hidden(model, hidden, packed, logprobs)
            losses = {"loss": bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coef)}
            if cfg.lm_coef:
                losses["lm_loss"] = (-logprobs[0].sum() / packed.mask[0].sum() if logprobs
                                     else chosen_nll(lm_head, hidden, packed))
        (losses["loss"] + cfg.lm_coef * losses.get("lm_loss", 0.0)).backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == max_steps:
            accuracy = (chosen > rejected).float().mean().item()
            margin = (chosen - rejected).mean().item()
            logged = {name: value.item() for name, value in losses.items()}
            metrics.write(step=step, **logged, lr=lr, accuracy=accuracy, margin=margin)
            progress.update(step, **logged, acc=accuracy, margin=margin)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps:
            metrics.write(step=step, pairwise_accuracy=pairwise_accuracy(model, heldout_pairs, device))
        if step % cfg.checkpoint_every == 0 and step < max_steps:
            common.save_state(out, step, model, optimizer, batches)
    progress.close()

    final = {"pairwise_accuracy": pairwise_accuracy(model, heldout_pairs, device),
             "heldout_pairs": len(heldout_pairs), "steps": step, "seconds": round(time.time() - t0, 1)}
    metrics.write(step=step, **final)
    log(common.final_line("reward", final))
    entry = methods.lineage_entry(
        "reward_model", parent=str(parent), data_sha256=common.data_sha256(pairs), config=dataclasses.asdict(cfg),
        metrics=final, weights_sha256=weights_sha256(model), started=started)
    save_model_dir(out, model, tokenizer, lineage + [entry], config_extra=model.config_extra(tokenizer.pad_id))
    common.finish_out(out, cfg.keep_train_state)
    log(f"reward: wrote {out}")
    return out
