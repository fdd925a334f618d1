"""`stagewise pretrain`: a tokenizer and a Llama-style model trained from nothing by next-token
prediction on packed sequences.

Read top to bottom: the config, then `train` (data and tokenizer, model and optimizer, resume,
the loop with periodic evaluation and atomic checkpoints, the final evaluation and the model
directory with its lineage). Under torchrun it runs data-parallel with the same global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagewise import data, distributed, evaluation, methods
from stagewise.batching import PackedBatches, pack
from stagewise.errors import StagewiseError
from stagewise.model import ModelConfig, Transformer, weights_sha256
from stagewise.model_dir import save_model_dir
from stagewise.stages import common
from stagewise.tokenizer import Tokenizer, train_tokenizer
from stagewise.training import (MetricsLog, OptimConfig, Precision, Progress, Throughput, autocast_dtype, lr_at,
                                make_optimizer, matmul_peak_flops, reproducible, seed_everything, set_lr,
                                train_step)
from stagewise.world.build import DataConfig, make_world


@dataclass
class PretrainConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    world: DataConfig = field(default_factory=DataConfig)  # the data when --data is not given
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, over all processes and micro-batches
    grad_accum: int = 1  # micro-batches per step
    max_steps: int = 1000
    eval_every: int = 250
    eval_windows: int = 64  # held-out windows of seq_len tokens per evaluation
    heldout_share: float = 0.01  # of user documents, held out when --data is given
    checkpoint_every: int = 100
    log_every: int = 10
    compile: bool = False
    device: str = "auto"  # auto, cpu, cuda
    dtype: Precision = "auto"  # auto: bf16 autocast on GPUs, fp32 on CPUs (`training.autocast_dtype`)
    keep_train_state: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_stage_arguments(parser, parent=False)


def command(args: argparse.Namespace) -> int:
    cfg = common.resolve(PretrainConfig, "pretrain", args)
    train(cfg, args.out, data_files=args.data, resume=args.resume)
    return 0


def load_texts(cfg: PretrainConfig, data_files: list[Path] | None) -> tuple[list[str], list[str], list]:
    """(training texts, held-out texts, the records hashed into the lineage)."""
    if data_files:
        records = data.load(data_files, "text")
        n_heldout = max(1, int(len(records) * cfg.heldout_share))
        if len(records) <= n_heldout:
            raise StagewiseError(f"{data_files[0]}: too few documents ({len(records)}) to hold some out")
        texts = [r["text"] for r in records]
        return texts[n_heldout:], texts[:n_heldout], records
    world = common.world_data(cfg.world)
    return [r["text"] for r in world["pretrain"]], [r["text"] for r in world["heldout_text"]], world["pretrain"]


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    return pack(tokenizer.encode_batch(texts), tokenizer.endoftext_id)


def train(cfg: PretrainConfig, out: Path, data_files: list[Path] | None = None, resume: bool = False,
          log=print) -> Path:
    started = methods.now()
    t0 = time.time()
    device, dist = distributed.launch(cfg.device, cfg.batch_size, cfg.grad_accum)
    main = dist is None or dist.is_main
    say = log if main else (lambda *a, **k: None)

    # Data first: bad input is refused before anything is written.
    texts, heldout_texts, records = load_texts(cfg, data_files)
    mode = common.prepare_out_once(out, resume, dist)
    if mode == "finished":
        say(f"pretrain: {out} is already finished; nothing to do")
        distributed.teardown(dist)
        return out
    state_dir = out / common.TRAIN_STATE

    # The tokenizer is trained once and stored with the checkpoints, so a resumed run
    # tokenizes exactly as the interrupted one did.
    if mode == "resume" and (state_dir / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(state_dir / "tokenizer")
    else:
        tokenizer = train_tokenizer(texts, cfg.model.vocab_size)
        if main:
            tokenizer.save(state_dir / "tokenizer")
    model_cfg = dataclasses.replace(cfg.model, max_seq_len=max(cfg.model.max_seq_len, cfg.seq_len))
    tokens, heldout_tokens = tokenize(tokenizer, texts), tokenize(tokenizer, heldout_texts)
    say(f"pretrain: {len(texts):,} documents, {len(tokens):,} tokens; held out {len(heldout_tokens):,} tokens; "
        f"vocabulary {tokenizer.vocab_size}")

    # Model, optimizer, batches.
    seed_everything(cfg.seed)
    reproducible(device)
    model = Transformer(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    batches = PackedBatches(tokens, cfg.seq_len, cfg.batch_size, cfg.seed)
    step = 0
    if mode == "resume" and (state := common.restore_state(out, model, optimizer, batches, say)):
        step = state["step"]
        say(f"pretrain: resumed at step {step}")
    say(f"pretrain: {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} without "
        f"embeddings), {cfg.max_steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens on {device}")

    train_model = torch.compile(model) if cfg.compile else model
    if dist:
        train_model = distributed.wrap(train_model, dist, device)
    amp = autocast_dtype(device, cfg.dtype)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    meter = Throughput(model.flops_per_token(cfg.seq_len), matmul_peak_flops(device, amp or torch.float32))
    progress = Progress("pretrain", cfg.max_steps, enabled=main, start=step)

    def evaluate() -> float:
        return evaluation.heldout_loss(model, heldout_tokens, cfg.seq_len, max_windows=cfg.eval_windows)

    model.train()
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.max_steps, cfg.optim)
        set_lr(optimizer, lr)
        x, y = batches.next()  # (B, T) global batch; this rank's share below
        if dist:
            x, y = dist.shard(x), dist.shard(y)
        loss = train_step(train_model, model, optimizer, x, y, grad_accum=cfg.grad_accum,
                          grad_clip=cfg.optim.grad_clip, device=device, amp=amp, dist=dist)
        step += 1
        meter.add(cfg.batch_size * cfg.seq_len)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            loss_value = dist.mean(loss) if dist else loss
            tokens_per_s, mfu = meter.read()
            record = {"step": step, "loss": loss_value.item(), "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu}
            metrics.write(**record)
            progress.update(step, loss=record["loss"], lr=lr, **{"tok/s": round(tokens_per_s), "MFU": mfu})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and main:
            metrics.write(step=step, heldout_loss=evaluate())
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            if main:
                common.save_state(out, step, model, optimizer, batches)
            if dist:
                dist.barrier()
    progress.close()

    if main:
        final = {"heldout_loss": evaluate(), "steps": step, "tokens_seen": step * cfg.batch_size * cfg.seq_len,
                 "seconds": round(time.time() - t0, 1)}
        if not data_files:
            world = make_world(cfg.world)
            cloze = evaluation.fact_cloze(model, tokenizer, world.people)
            heldout = [p for p in world.people if p.name in world.heldout_names]
            final.update(cloze)
            final["fact_cloze_heldout_people"] = evaluation.fact_cloze(model, tokenizer, heldout)["fact_cloze"]
        metrics.write(step=step, **final)
        say(common.final_line("pretrain", final))
        entry = methods.lineage_entry(
            "pretrain", parent=None, data_sha256=common.data_sha256(records),
            config=dataclasses.asdict(cfg), metrics=final, weights_sha256=weights_sha256(model), started=started)
        save_model_dir(out, model, tokenizer, [entry])
        common.finish_out(out, cfg.keep_train_state)
        say(f"pretrain: wrote {out}")
    if dist:
        dist.barrier()
    del train_model
    distributed.teardown(dist)
    return out
