"""DPO training steps/s: stagewise's DPO step against TRL's `DPOTrainer`, same model directory.

Both train the same model (a model directory that transformers loads for TRL) on the same
preference pairs from the embedded world, with the same batch size, beta 0.1, AdamW (lr 1e-4,
betas 0.9/0.95, no weight decay), gradient clipping at 1.0, fp32 on this machine's CPU. Both
compute the reference log-probabilities once before training (TRL's
`precompute_ref_log_probs=True`, which is what stagewise always does), so a step is one
policy forward and backward over the chosen and rejected responses. TRL renders the
conversations with the directory's chat template itself. The first steps of each side are
warm-up and not timed.

    python benchmarks/dpo_throughput.py [--model DIR] [--steps 20] [--batch 8]

The last line is the JSON object of SPEC section 6.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from stagewise.model_dir import load_language_model
from stagewise.stages import common, dpo
from stagewise.training import OptimConfig, make_optimizer
from stagewise.world.build import DataConfig, build

WARMUP = 3
BETA, LR = 0.1, 1e-4


def pairs_from_world(n: int) -> list[dict]:
    data, _ = build(DataConfig(n_people=40, n_heldout_people=10, pretrain_tokens=1000, heldout_text_tokens=100,
                               n_sft=10, n_preferences=n, n_heldout_preferences=5, n_ppo_prompts=5, n_eval_per_task=5))
    return data["preferences"]


def ours(model_dir: Path, pairs: list[dict], batch: int, steps: int) -> float:
    model, tokenizer, _ = load_language_model(model_dir)
    encoded = common.preference_triples(tokenizer, pairs, model.cfg.max_seq_len)
    ref_chosen, ref_rejected = dpo.reference_logprobs(model, encoded, average=False, amp=None)
    optimizer = make_optimizer(model, OptimConfig(lr=LR, weight_decay=0.0, beta2=0.95))
    model.train()
    start = 0.0
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        index = list(range(step * batch, (step + 1) * batch))
        chosen, rejected = dpo.pair_logprobs(model, [encoded[i] for i in index], average=False)
        loss = dpo.dpo_loss(chosen, rejected, ref_chosen[index], ref_rejected[index], BETA)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def peer(model_dir: Path, pairs: list[dict], batch: int, steps: int) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch, max_steps=WARMUP + steps,
                           learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                           adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
                           precompute_ref_log_probs=True, max_length=256, use_cpu=True, report_to="none",
                           save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
                           dataloader_num_workers=0, bf16=False, fp16=False)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                             args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])
        trainer.train()
    return steps / (clock.times[-1] - clock.times[WARMUP - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="an SFT model directory; default: a fresh "
                                                                 "default-size model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    pairs = pairs_from_world(args.batch * (WARMUP + args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from decode import default_model_dir  # benchmarks/ is on the path when run as a script
            model_dir = default_model_dir(Path(tmp) / "model")
        ours_rate = ours(model_dir, pairs, args.batch, args.steps)
        peer_rate = peer(model_dir, pairs, args.batch, args.steps)
    print(f"batch {args.batch} pairs, beta {BETA}, AdamW lr {LR}, fp32, {torch.get_num_threads()} threads")
    print(f"stagewise: {ours_rate:.2f} steps/s; TRL DPOTrainer: {peer_rate:.2f} steps/s; "
          f"ratio {ours_rate / peer_rate:.2f}")
    print(json.dumps({"benchmark": "dpo_throughput", "ours": round(ours_rate, 3), "peer": round(peer_rate, 3),
                      "unit": "steps/s", "ratio": round(ours_rate / peer_rate, 3), "target": 1.5,
                      "peer_name": "trl DPOTrainer", "batch_pairs": args.batch}))


if __name__ == "__main__":
    main()
