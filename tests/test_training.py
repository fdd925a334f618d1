"""Shared training pieces: the schedule against hand-computed values, weight-decay groups."""

import math

import pytest
import torch

from stagewise.training import (OptimConfig, autocast_dtype, lr_at, make_optimizer, matmul_peak_flops, reproducible,
                                set_lr, train_step)


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)


def test_linear_and_constant():
    cfg = OptimConfig(lr=2.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(25, 100, cfg) == pytest.approx(1.5)
    assert lr_at(99, 100, OptimConfig(lr=2.0, warmup_steps=0, schedule="constant")) == 2.0


def test_no_weight_decay_on_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    decay, no_decay = make_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_some_parameters_can_have_an_lr_of_their_own_that_follows_the_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4, bias=False))
    norm = model[1].weight
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1), {norm: 50.0})
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, pytest.approx(5e-2)]
    assert groups[1]["params"] == [] and groups[2]["params"] == [norm] and groups[2]["weight_decay"] == 0.0
    set_lr(optimizer, 2e-4)
    assert [g["lr"] for g in groups] == [2e-4, 2e-4, pytest.approx(1e-2)]
    # Adam's first step moves each parameter by its group's lr (times sign(grad)), and decay.
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).pow(2).sum().backward()
    optimizer.step()
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert moved[1] == pytest.approx(1e-2, rel=1e-3) and moved[0] < 3e-4


def test_matmul_peak_is_positive():
    assert matmul_peak_flops(n=128, seconds=0.05) > 1e6


def compiled_training_weights(steps: int = 4, amp: torch.dtype | None = None) -> list[torch.Tensor]:
    from stagewise.model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, intermediate_size=128, max_seq_len=128)
    model = Transformer(cfg)
    optimizer = make_optimizer(model, OptimConfig(lr=1e-2))
    train = torch.compile(model)
    for _ in range(steps):
        batch = torch.randint(0, cfg.vocab_size, (16, 129))  # many repeated ids: the embedding gradient sums them
        train_step(train, model, optimizer, batch[:, :-1], batch[:, 1:], grad_accum=1, grad_clip=1.0,
                   device=torch.device("cpu"), amp=amp)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_training_is_bit_reproducible_on_cpu(amp):
    was = torch.are_deterministic_algorithms_enabled()
    try:
        reproducible(torch.device("cpu"))
        first, second = compiled_training_weights(amp=amp), compiled_training_weights(amp=amp)
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_auto_precision_is_bf16_on_gpus_and_fp32_on_cpus():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cuda, "auto") == torch.bfloat16
    assert autocast_dtype(cpu, "auto") is None
    assert autocast_dtype(cpu, "float32") is None and autocast_dtype(cuda, "float32") is None
    assert autocast_dtype(cpu, "bfloat16") == torch.bfloat16


def test_an_unknown_precision_is_refused_by_name():
    from stagewise import config
    from stagewise.errors import StagewiseError
    from stagewise.stages.dpo import DPOConfig
    with pytest.raises(StagewiseError, match="dtype: expected one of 'auto', 'float32', 'bfloat16', got 'fp8'"):
        config.resolve(DPOConfig, "dpo", None, ["dtype=fp8"])
