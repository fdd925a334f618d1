"""`stagewise ppo`: RLHF, the policy optimised against a reward model with PPO.

Each iteration samples responses to a batch of prompts from the policy (through the engine,
batched), scores them with the frozen reward model, and turns the scores into per-token
rewards: minus kl_coef times the policy-to-reference log-ratio at every token, plus the score
at the last token (InstructGPT's KL-penalised reward; the reference is the frozen SFT model).
A response that never ends has `missing_eos_penalty` taken off its score. Advantages come from
GAE (gamma 1, lambda 0.95) over a critic initialised from the reward model, are whitened, and
feed the clipped policy and value losses for several epochs over minibatches (of rollouts of
similar length, in a shuffled order, with `group_by_length`; the critic's lowest blocks can stay
the reward model's, `critic_freeze_layers`). The KL coefficient is fixed, or adaptive (Ziegler
et al., 2019) towards `target_kl`. The policy's learning rate follows `optim`'s schedule over
all of the run's minibatch steps, and the final norm's weights can have their own
(`final_norm_lr_scale`): they set the scale of the logits, so the policy's entropy, and Adam
moves each of them by about lr a step, a few percent of their size over a run at an lr made for
the matrices.

With a reward model that has a likelihood term (a learnt weight times the response's
log-probability), `likelihood_per_token` gives each token its own part of that term as its
reward, as the KL penalty is given out, and only the head's score waits for the last token:
the return is the same, and the critic need not predict where log-probability will be lost.
With `samples_per_prompt` above 1 an iteration samples each of its prompts several times
(OpenRLHF's n_samples_per_prompt).

The logged names follow TRL and OpenRLHF: objective/kl, objective/scores,
objective/rlhf_reward, objective/entropy, policy/clipfrac, policy/approxkl, val/vf_loss,
val/clipfrac, val/mean. With the embedded world the simulated annotator also scores every
rollout (gold/score), and `overoptimisation.csv` / `.png` plot the proxy reward and the
annotator's score against sqrt(KL), as Gao et al. (2022) plot reward-model overoptimisation.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from stagewise import data, engine, methods
from stagewise.batching import IndexBatches, pad_right
from stagewise.errors import StagewiseError
from stagewise.losses import gae, kl_per_token, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from stagewise.model import weights_sha256
from stagewise.model_dir import load_language_model, load_reward_model, save_model_dir
from stagewise.reward_model import check_frozen_blocks
from stagewise.stages import common
from stagewise.training import (MetricsLog, OptimConfig, Precision, Progress, autocast, autocast_dtype, lr_at,
                                make_optimizer, pick_device, seed_everything, set_lr)
from stagewise.world import annotator
from stagewise.world.build import DataConfig, make_world


@dataclass
class PPOConfig:
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=0, schedule="constant",
                                                                   weight_decay=0.0))
    value_lr: float = 1e-4
    final_norm_lr_scale: float = 1.0  # the final norm's weights, the logit scale, train at lr times this
    critic_freeze_layers: int = 0  # the critic's token embedding and lowest blocks stay the reward model's
    world: DataConfig = field(default_factory=DataConfig)
    iterations: int = 60
    rollout_batch: int = 64  # rollouts per iteration
    samples_per_prompt: int = 1  # rollouts of each prompt in an iteration (n_samples_per_prompt in OpenRLHF)
    minibatch: int = 16
    ppo_epochs: int = 4
    group_by_length: bool = True  # minibatches of rollouts of similar length: less padding, same rollouts
    max_new_tokens: int = 48
    temperature: float = 1.0
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0  # nats per response, for the adaptive controller
    kl_horizon: int = 10_000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0
    # A reward model with a likelihood term: give each response token its part of the term as a
    # per-token reward (the score's sum is unchanged), instead of all of the score at the last token.
    likelihood_per_token: bool = False
    checkpoint_every: int = 10  # iterations
    device: str = "auto"
    dtype: Precision = "auto"  # of the policy's, reference's and critic's forward passes, as pretrain's
    keep_train_state: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", required=True, type=Path, help="reward model directory (stagewise reward)")
    common.add_stage_arguments(parser, parent=True)


def command(args: argparse.Namespace) -> int:
    cfg = common.resolve(PPOConfig, "ppo", args)
    train(cfg, args.parent, args.reward, args.out, data_files=args.data, resume=args.resume)
    return 0


class AdaptiveKL:
    """Ziegler et al. (2019): move the coefficient so the observed KL tracks the target."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon


def gather_values(critic, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  device: torch.device) -> torch.Tensor:
    """(B, R) the critic's value of the state before each response token, aligned like
    `engine.sequence_logprobs` aligns log-probs."""
    sequences = [p + r for p, r in zip(prompts, responses)]
    values = critic.values(pad_right(sequences, pad_id).to(device))  # (B, T)
    R = max(len(r) for r in responses)
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)
    cols = (start[:, None] + torch.arange(R, device=device)[None, :]).clamp(max=values.shape[1] - 1)
    return values.gather(1, cols)


def token_rewards(kl: torch.Tensor, kl_coef: float, mask: torch.Tensor, last_reward: torch.Tensor,
                  per_token: torch.Tensor | None = None) -> torch.Tensor:
    """(B, R) rewards: minus kl_coef times each token's KL term, plus `per_token` (B, R) where
    given (the reward model's likelihood term, token by token), plus `last_reward` (B,) on each
    response's last token."""
    rewards = -kl_coef * kl
    if per_token is not None:
        rewards = rewards + per_token
    rewards[torch.arange(len(rewards)), mask.sum(-1) - 1] += last_reward
    return rewards


def in_length_order(fn, prompts: list[list[int]], responses: list[list[int]], chunk: int):
    """fn(prompts, responses) -> a tensor, or a tuple of tensors, of (b,) or (b, R_chunk) rows,
    run on chunks of at most `chunk` rollouts of similar length and put back in rollout order,
    the (b, R_chunk) ones padded with zeros to the longest response. The same figures as one call
    over all rollouts, up to float rounding, with a fraction of the padding: in one batch of
    rollouts, the longest prompt and response is about twice as long as the mean."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    R = max(len(r) for r in responses)
    parts = [fn([prompts[i] for i in order[s:s + chunk]], [responses[i] for i in order[s:s + chunk]])
             for s in range(0, len(order), chunk)]
    single = not isinstance(parts[0], tuple)
    merged = []
    for outs in zip(*([(p,) for p in parts] if single else parts)):
        stacked = torch.cat([F.pad(o, (0, R - o.shape[1])) if o.dim() == 2 else o for o in outs])
        back = torch.empty_like(stacked)
        back[torch.tensor(order, device=stacked.device)] = stacked
        merged.append(back)
    return merged[0] if single else tuple(merged)


def load_prompts(cfg: PPOConfig, data_files: list[Path] | None) -> list[str]:
    if data_files:
        return [r["prompt"] for r in data.load(data_files, "prompt")]
    return [r["prompt"] for r in common.world_data(cfg.world)["prompts"]]


def write_overoptimisation(out: Path, rows: list[dict]) -> None:
    """CSV and PNG of the proxy reward and the annotator's score against sqrt(KL)."""
    with (out / "overoptimisation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r["sqrt_kl"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["proxy_score"] for r in rows], marker=".", label="proxy reward (reward model)")
    if rows[0].get("gold_score") is not None:
        ax.plot(x, [r["gold_score"] for r in rows], marker=".", label="gold score (simulated annotator)")
    ax.set_xlabel("sqrt(KL to the SFT model), nats^0.5")
    ax.set_ylabel("mean score of the rollouts")
    ax.set_title("Reward-model overoptimisation during PPO")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "overoptimisation.png", dpi=100)
    plt.close(fig)


def train(cfg: PPOConfig, parent: Path, reward_dir: Path, out: Path, data_files: list[Path] | None = None,
          resume: bool = False, log=print) -> Path:
    started, t0 = methods.now(), time.time()
    device = pick_device(cfg.device)
    policy, tokenizer, lineage = load_language_model(parent)
    reward_model, reward_tokenizer, _ = load_reward_model(reward_dir)
    if reward_tokenizer.tk.to_str() != tokenizer.tk.to_str():
        raise StagewiseError(f"{reward_dir}: the reward model's tokenizer differs from {parent}'s")
    prompts_text = load_prompts(cfg, data_files)
    if cfg.rollout_batch % cfg.minibatch:
        raise StagewiseError(f"ppo: rollout_batch {cfg.rollout_batch} must be a multiple of minibatch {cfg.minibatch}")
    if cfg.samples_per_prompt < 1 or cfg.rollout_batch % cfg.samples_per_prompt:
        raise StagewiseError(f"ppo: rollout_batch {cfg.rollout_batch} must be a multiple of samples_per_prompt "
                             f"{cfg.samples_per_prompt} (at least 1)")
    if len(prompts_text) < cfg.rollout_batch // cfg.samples_per_prompt:
        raise StagewiseError(f"ppo: {len(prompts_text)} prompts, fewer than the "
                             f"{cfg.rollout_batch // cfg.samples_per_prompt} of one rollout batch")
    try:
        check_frozen_blocks("critic_freeze_layers", cfg.critic_freeze_layers, reward_model.cfg)
    except StagewiseError as e:
        raise StagewiseError(f"{reward_dir}: {e}") from None
    mode = common.prepare_out(out, resume)
    if mode == "finished":
        log(f"ppo: {out} is already finished; nothing to do")
        return out

    seed_everything(cfg.seed)
    amp = autocast_dtype(device, cfg.dtype)
    policy = policy.to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = copy.deepcopy(reward_model).to(device)
    critic.freeze_bottom(cfg.critic_freeze_layers)
    reward_model = reward_model.to(device).eval().requires_grad_(False)
    optimizer = make_optimizer(policy, cfg.optim, {policy.model.norm.weight: cfg.final_norm_lr_scale})
    value_optimizer = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=cfg.value_lr,
                                        weight_decay=0.0)
    batches = IndexBatches(len(prompts_text), cfg.rollout_batch // cfg.samples_per_prompt, cfg.seed)
    prompt_ids = [tokenizer.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0]
                  for p in prompts_text]
    stop = [tokenizer.im_end_id, tokenizer.endoftext_id]
    people = None if data_files else make_world(cfg.world).people_by_name
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    curve: list[dict] = []
    iteration = 0
    if mode == "resume" and (state := common.restore_state(out, policy, optimizer, batches, log)):
        critic.load_state_dict(state["critic"])
        value_optimizer.load_state_dict(state["value_optimizer"])
        kl_ctl.value, curve, iteration = state["kl_coef"], state["curve"], state["step"]
        log(f"ppo: resumed at iteration {iteration}")
    log(f"ppo: {len(prompts_text):,} prompts; {cfg.iterations} iterations of {cfg.rollout_batch} rollouts, "
        f"{cfg.ppo_epochs} epochs of minibatches of {cfg.minibatch}, kl_coef {cfg.kl_coef}"
        f"{' (adaptive)' if cfg.adaptive_kl else ''} on {device}")

    metrics = MetricsLog(out / "metrics.jsonl")
    progress = Progress("ppo", cfg.iterations, start=iteration)
    while iteration < cfg.iterations:
        # 1. Rollouts.
        index = [i for i in batches.next() for _ in range(cfg.samples_per_prompt)]
        prompts = [prompt_ids[i] for i in index]
        policy.eval()
        room = policy.cfg.max_seq_len - max(len(p) for p in prompts)
        responses = engine.generate(policy, prompts, max_new_tokens=min(cfg.max_new_tokens, room),
                                    temperature=cfg.temperature, stop_ids=stop, seed=cfg.seed * 1_000_003 + iteration)
        ended = torch.tensor([r[-1] in stop for r in responses], device=device)
        with torch.no_grad():
            chunk = 2 * cfg.minibatch
            # The same precision as the minibatches' forward passes, so that the first ratio is 1.
            with autocast(device, amp):
                old_logprobs, mask = in_length_order(
                    lambda p, r: engine.sequence_logprobs(policy, p, r, temperature=cfg.temperature), prompts,
                    responses, chunk)
                ref_logprobs, _ = in_length_order(
                    lambda p, r: engine.sequence_logprobs(reference, p, r, temperature=cfg.temperature), prompts,
                    responses, chunk)
                old_values = in_length_order(lambda p, r: gather_values(critic, p, r, tokenizer.pad_id, device),
                                             prompts, responses, chunk)
            penalty = cfg.missing_eos_penalty * (~ended).float()
            if cfg.likelihood_per_token:
                last_reward, per_token = in_length_order(
                    lambda p, r: reward_model.reward_per_token(p, r, tokenizer.pad_id), prompts, responses, chunk)
            else:
                last_reward = in_length_order(lambda p, r: reward_model.score_responses(p, r, tokenizer.pad_id),
                                              prompts, responses, chunk)
                per_token = None
            last_reward = last_reward - penalty
            scores = last_reward if per_token is None else last_reward + per_token.sum(-1)
            # 2. KL-penalised per-token rewards.
            kl = kl_per_token(old_logprobs, ref_logprobs) * mask
            rewards = token_rewards(kl, kl_ctl.value, mask, last_reward, per_token)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, mask)

        # 3. PPO epochs over minibatches.
        policy.train()
        stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approxkl", "vf_clipfrac")}
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)] if cfg.group_by_length else None
        minibatches = IndexBatches(len(responses), cfg.minibatch, cfg.seed * 1_000_003 + iteration, lengths,
                                   megabatch=len(responses))
        steps_per_iteration = cfg.ppo_epochs * len(minibatches)
        for epoch in range(cfg.ppo_epochs):
            for j in range(len(minibatches)):
                step = (iteration * cfg.ppo_epochs + epoch) * len(minibatches) + j
                set_lr(optimizer, lr_at(step, cfg.iterations * steps_per_iteration, cfg.optim))
                mb = minibatches.next()
                mb_prompts, mb_responses = [prompts[i] for i in mb], [responses[i] for i in mb]
                R = max(len(r) for r in mb_responses)
                with autocast(device, amp):
                    logprobs, mb_mask = engine.sequence_logprobs(policy, mb_prompts, mb_responses,
                                                                 temperature=cfg.temperature)
                    values = gather_values(critic, mb_prompts, mb_responses, tokenizer.pad_id, device)
                pg_loss, pg_stats = ppo_policy_loss(logprobs, old_logprobs[mb, :R], advantages[mb, :R], mb_mask,
                                                    cfg.clip)
                vf_loss, vf_stats = ppo_value_loss(values, old_values[mb, :R], returns[mb, :R], mb_mask,
                                                   cfg.value_clip)
                (pg_loss + cfg.vf_coef * vf_loss).backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip)
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                value_optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value_optimizer.zero_grad(set_to_none=True)
                for key, value in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clipfrac", pg_stats["clipfrac"]),
                                   ("approxkl", pg_stats["approxkl"]), ("vf_clipfrac", vf_stats["clipfrac"])):
                    stats[key].append(value.item())
        iteration += 1

        # 4. What people read in TRL and OpenRLHF, and the annotator beside the proxy.
        kl_sum = kl.sum(-1).mean().item()
        record = {
            "iteration": iteration,
            "objective/kl": kl_sum,
            "objective/kl_coef": kl_ctl.value,
            "lr": optimizer.param_groups[0]["lr"],
            "objective/scores": scores.mean().item(),
            "objective/rlhf_reward": (scores - kl_ctl.value * kl.sum(-1)).mean().item(),
            "objective/entropy": (-old_logprobs * mask).sum(-1).mean().item(),
            "policy/clipfrac": sum(stats["clipfrac"]) / len(stats["clipfrac"]),
            "policy/approxkl": sum(stats["approxkl"]) / len(stats["approxkl"]),
            "loss/policy": sum(stats["pg_loss"]) / len(stats["pg_loss"]),
            "val/vf_loss": sum(stats["vf_loss"]) / len(stats["vf_loss"]),
            "val/clipfrac": sum(stats["vf_clipfrac"]) / len(stats["vf_clipfrac"]),
            "val/mean": masked_mean(old_values, mask).item(),
            "response/length": mask.sum(-1).float().mean().item(),
            "response/eos_rate": ended.float().mean().item(),
        }
        gold = None
        if people is not None:
            texts = [tokenizer.decode(r[:-1] if r[-1] in stop else r) for r in responses]
            gold = sum(annotator.gold_score(prompts_text[i], t, people) for i, t in zip(index, texts)) / len(texts)
            record["gold/score"] = gold
        metrics.write(**record)
        curve.append({"iteration": iteration, "kl": kl_sum, "sqrt_kl": math.sqrt(max(kl_sum, 0.0)),
                      "proxy_score": record["objective/scores"], "gold_score": gold})
        progress.update(iteration, score=record["objective/scores"], kl=kl_sum,
                        **({"gold": gold} if gold is not None else {}))
        if cfg.adaptive_kl:
            kl_ctl.update(kl_sum, cfg.rollout_batch)
        if iteration % cfg.checkpoint_every == 0 and iteration < cfg.iterations:
            common.save_state(out, iteration, policy, optimizer, batches, critic=critic.state_dict(),
                              value_optimizer=value_optimizer.state_dict(), kl_coef=kl_ctl.value, curve=curve)
    progress.close()

    write_overoptimisation(out, curve)
    final = {"iterations": iteration, "final_kl": curve[-1]["kl"], "final_proxy_score": curve[-1]["proxy_score"],
             "final_gold_score": curve[-1]["gold_score"], "seconds": round(time.time() - t0, 1)}
    metrics.write(**final)
    log(common.final_line("ppo", final))
    entry = methods.lineage_entry(
        "ppo", parent=str(parent), data_sha256=common.data_sha256(prompts_text),
        config={**dataclasses.asdict(cfg), "reward_model": str(reward_dir)}, metrics=final,
        weights_sha256=weights_sha256(policy), started=started)
    save_model_dir(out, policy, tokenizer, lineage + [entry])
    common.finish_out(out, cfg.keep_train_state)
    log(f"ppo: wrote {out}")
    return out
