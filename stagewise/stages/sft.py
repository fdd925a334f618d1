"""`stagewise sft`: instruction alignment by supervised fine-tuning on conversations.

Conversations are rendered with the ChatML template the model directory ships; the loss is
taken on the assistant's tokens only, its end-of-turn token included, so the model learns to
answer and then stop. Each row of a batch is one example padded on the right, so examples
never see each other. A share of pre-training text is replayed alongside (loss on every
token), which limits the erosion of pre-trained knowledge that fine-tuning at a high learning
rate causes. The model config is inherited from the parent directory; the lineage grows by one
`sft` entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagewise import data, distributed, evaluation, methods
from stagewise.batching import ExampleBatches
from stagewise.errors import StagewiseError
from stagewise.model import weights_sha256
from stagewise.model_dir import load_language_model, save_model_dir
from stagewise.stages import common
from stagewise.training import (MetricsLog, OptimConfig, Precision, Progress, Throughput, autocast_dtype, lr_at,
                                make_optimizer, matmul_peak_flops, reproducible, seed_everything, set_lr,
                                train_step)
from stagewise.world.build import DataConfig


@dataclass
class SFTConfig:
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0))
    world: DataConfig = field(default_factory=DataConfig)  # the data when --data is not given
    batch_size: int = 32  # examples per optimizer step
    grad_accum: int = 1
    epochs: float = 1.0  # passes over the conversations (replayed text comes on top)
    max_steps: int = 0  # when > 0, overrides epochs
    replay_share: float = 0.25  # share of examples that are pre-training text (world data only)
    replay_tokens: int = 96  # length of a replayed text excerpt
    group_by_length: bool = True  # batch examples of similar length: less padding, same data
    heldout_share: float = 0.02  # of conversations, held out for the validation loss
    eval_every: int = 200
    checkpoint_every: int = 100
    log_every: int = 10
    compile: bool = False
    device: str = "auto"
    dtype: Precision = "auto"  # as pretrain's
    keep_train_state: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_stage_arguments(parser, parent=True)


def command(args: argparse.Namespace) -> int:
    cfg = common.resolve(SFTConfig, "sft", args)
    train(cfg, args.parent, args.out, data_files=args.data, resume=args.resume)
    return 0


def load_conversations(cfg: SFTConfig, data_files: list[Path] | None) -> tuple[list[dict], list[str]]:
    """(conversations, pre-training texts to replay). User data is replayed from nothing."""
    if data_files:
        return data.load(data_files, "chat"), []
    world = common.world_data(cfg.world)
    return world["sft"], [r["text"] for r in world["pretrain"]]


def encode(tokenizer, conversations: list[dict], max_len: int, where: str) -> list[tuple[list[int], list[bool]]]:
    examples = []
    for i, conversation in enumerate(conversations):
        ids, mask = tokenizer.render_chat(conversation["messages"])
        if len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):
            raise StagewiseError(f"{where}: conversation {i + 1} has no assistant token within {max_len} tokens")
        examples.append((ids, mask))
    return examples


def replay_examples(tokenizer, texts: list[str], n: int, length: int, seed: int) -> list[tuple[list[int], list[bool]]]:
    """n excerpts of pre-training text, each trained on every token."""
    rng = random.Random(seed)
    chosen = [texts[rng.randrange(len(texts))] for _ in range(n)]
    out = []
    for ids in tokenizer.encode_batch(chosen):
        ids = [tokenizer.endoftext_id] + ids[:length - 1]
        out.append((ids, [False] + [True] * (len(ids) - 1)))
    return out


def train(cfg: SFTConfig, parent: Path, out: Path, data_files: list[Path] | None = None, resume: bool = False,
          log=print) -> Path:
    started = methods.now()
    t0 = time.time()
    device, dist = distributed.launch(cfg.device, cfg.batch_size, cfg.grad_accum)
    main = dist is None or dist.is_main
    say = log if main else (lambda *a, **k: None)
    world_size = dist.world_size if dist else 1

    # Parent and data first: bad input is refused before anything is written.
    model, tokenizer, lineage = load_language_model(parent)
    conversations, replay_texts = load_conversations(cfg, data_files)
    where = str(data_files[0]) if data_files else "embedded world sft data"
    examples = encode(tokenizer, conversations, model.cfg.max_seq_len, where)
    n_heldout = max(1, int(len(examples) * cfg.heldout_share))
    heldout, examples = examples[:n_heldout], examples[n_heldout:]
    n_replay = int(len(examples) * cfg.replay_share / max(1e-9, 1 - cfg.replay_share)) if replay_texts else 0
    examples += replay_examples(tokenizer, replay_texts, n_replay, cfg.replay_tokens, cfg.seed) if n_replay else []
    mode = common.prepare_out_once(out, resume, dist)
    if mode == "finished":
        say(f"sft: {out} is already finished; nothing to do")
        distributed.teardown(dist)
        return out

    seed_everything(cfg.seed)
    reproducible(device)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg.optim)
    batches = ExampleBatches(examples, cfg.batch_size, cfg.seed, tokenizer.pad_id,
                             pad_multiple=16 if cfg.compile else 1, group_by_length=cfg.group_by_length)
    # One epoch = every conversation once, with the replayed texts mixed in among them.
    max_steps = cfg.max_steps or max(1, int(cfg.epochs * len(examples) / cfg.batch_size))
    step = 0
    if mode == "resume" and (state := common.restore_state(out, model, optimizer, batches, say)):
        step = state["step"]
        say(f"sft: resumed at step {step}")
    say(f"sft: {len(conversations):,} conversations ({n_heldout} held out) and {n_replay:,} replayed texts; "
        f"{max_steps} steps of {cfg.batch_size} examples on {device}")

    train_model = torch.compile(model, dynamic=True) if cfg.compile else model
    if dist:
        train_model = distributed.wrap(train_model, dist, device)
    amp = autocast_dtype(device, cfg.dtype)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    meter = Throughput(model.flops_per_token(), matmul_peak_flops(device, amp or torch.float32))
    progress = Progress("sft", max_steps, enabled=main, start=step)

    def validation_loss() -> float:
        return evaluation.masked_loss(model, heldout, tokenizer.pad_id)

    model.train()
    while step < max_steps:
        lr = lr_at(step, max_steps, cfg.optim)
        set_lr(optimizer, lr)
        x, y = batches.next()
        if dist:
            x, y = dist.shard(x), dist.shard(y)
        loss = train_step(train_model, model, optimizer, x, y, grad_accum=cfg.grad_accum,
                          grad_clip=cfg.optim.grad_clip, device=device, amp=amp, dist=dist,
                          supervised_only=not cfg.compile)
        step += 1
        meter.add(int((x != tokenizer.pad_id).sum()) * world_size)
        if step % cfg.log_every == 0 or step == max_steps:
            loss_value = (dist.mean(loss) if dist else loss).item()
            tokens_per_s, mfu = meter.read()
            metrics.write(step=step, loss=loss_value, lr=lr, tokens_per_s=tokens_per_s, mfu=mfu)
            progress.update(step, loss=loss_value, lr=lr, **{"tok/s": round(tokens_per_s), "MFU": mfu})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps and main:
            metrics.write(step=step, validation_loss=validation_loss())
        if step % cfg.checkpoint_every == 0 and step < max_steps:
            if main:
                common.save_state(out, step, model, optimizer, batches)
            if dist:
                dist.barrier()
    progress.close()

    if main:
        final = {"validation_loss": validation_loss(), "steps": step, "seconds": round(time.time() - t0, 1)}
        metrics.write(step=step, **final)
        say(common.final_line("sft", final))
        entry = methods.lineage_entry(
            "sft", parent=str(parent), data_sha256=common.data_sha256(conversations),
            config=dataclasses.asdict(cfg), metrics=final, weights_sha256=weights_sha256(model), started=started)
        save_model_dir(out, model, tokenizer, lineage + [entry])
        common.finish_out(out, cfg.keep_train_state)
        say(f"sft: wrote {out}")
    if dist:
        dist.barrier()
    del train_model
    distributed.teardown(dist)
    return out
