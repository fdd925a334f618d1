"""Training tokens/s: stagewise's pre-training step against transformers' LlamaForCausalLM.

Both models get the same config (the default preset's), the same batches, the same AdamW with
the same hyper-parameters and gradient clipping, fp32 on this machine's CPU. Each side trains
as its users would run it: stagewise with the `torch.compile` its default preset uses and in
the deterministic mode its stages use on CPU, transformers as `LlamaForCausalLM` comes. Rounds
alternate between the two so that a noisy neighbour slows both alike. The script also measures
this machine's fp32 matmul peak and prints both models' MFU against it.

    python benchmarks/train_throughput.py [--steps 30] [--rounds 3]

The last line is the JSON object of SPEC section 6.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from stagewise.model import Transformer
from stagewise.stages import common, pretrain
from stagewise.training import make_optimizer, matmul_peak_flops, reproducible


def hf_model(stagewise_model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = stagewise_model.cfg
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_config(0, 2, 3).items() if k != "architectures"})
    model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict(stagewise_model.state_dict(), strict=False)  # same starting weights
    return model


def timed_steps(step, batches, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cfg = common.resolve(pretrain.PretrainConfig, "pretrain", SimpleNamespace(preset="default", overrides=[]))
    torch.manual_seed(0)
    reproducible(torch.device("cpu"))  # as the pre-training stage trains (process-wide: both sides)
    ours = Transformer(cfg.model)
    peer = hf_model(ours)
    batches = [torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1)) for _ in range(4)]
    tokens_per_step = cfg.batch_size * cfg.seq_len

    ours_opt, peer_opt = make_optimizer(ours, cfg.optim), make_optimizer(peer, cfg.optim)
    ours_train = torch.compile(ours) if cfg.compile else ours

    def ours_step(chunk):
        _, loss = ours_train(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), cfg.optim.grad_clip)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def peer_step(chunk):
        loss = peer(input_ids=chunk[:, :-1], labels=chunk[:, :-1]).loss  # transformers shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), cfg.optim.grad_clip)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)

    ours_batches = [(b,) for b in batches]
    compile_start = time.perf_counter()
    timed_steps(ours_step, ours_batches, 3)  # compilation and warm-up
    compile_seconds = time.perf_counter() - compile_start
    timed_steps(peer_step, ours_batches, 3)

    ours_time = peer_time = 0.0
    for _ in range(args.rounds):
        ours_time += timed_steps(ours_step, ours_batches, args.steps)
        peer_time += timed_steps(peer_step, ours_batches, args.steps)
    total_tokens = args.rounds * args.steps * tokens_per_step
    ours_tps, peer_tps = total_tokens / ours_time, total_tokens / peer_time

    peak = matmul_peak_flops(n=1024, seconds=2.0)
    flops_per_token = ours.flops_per_token(cfg.seq_len)
    print(f"config: d{cfg.model.n_embd} x {cfg.model.n_layer} layers, vocab {cfg.model.vocab_size}, "
          f"batch {cfg.batch_size} x {cfg.seq_len}, AdamW lr {cfg.optim.lr}, fp32, {torch.get_num_threads()} threads")
    print(f"fp32 matmul peak (1024 x 1024): {peak / 1e9:.1f} GFLOP/s; {flops_per_token / 1e6:.2f} MFLOP per token")
    print(f"stagewise:    {ours_tps:>9,.0f} tokens/s  MFU {ours_tps * flops_per_token / peak:.1%}"
          f"  (torch.compile: {compile_seconds:.0f} s once)")
    print(f"transformers: {peer_tps:>9,.0f} tokens/s  MFU {peer_tps * flops_per_token / peak:.1%}")
    print(json.dumps({"benchmark": "train_throughput", "ours": round(ours_tps), "peer": round(peer_tps),
                      "unit": "tokens/s", "ratio": round(ours_tps / peer_tps, 3), "target": 1.2,
                      "peer_name": "transformers LlamaForCausalLM", "matmul_peak_gflops": round(peak / 1e9, 1),
                      "mfu_ours": round(ours_tps * flops_per_token / peak, 4),
                      "mfu_peer": round(peer_tps * flops_per_token / peak, 4)}))


if __name__ == "__main__":
    main()
