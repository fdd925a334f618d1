"""Muon: torch's algorithm exactly, with the Newton-Schulz iteration in a dtype of our choosing,
and its place beside AdamW in `make_optimizer`."""

import copy as copy_module

import pytest
import torch

from stagewise.model import ModelConfig, Transformer
from stagewise.muon import Muon, MuonAdamW, orthogonalise
from stagewise.training import OptimConfig, make_optimizer, set_lr


def test_muon_in_bf16_takes_exactly_torchs_steps():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(r, c)) for r, c in ((32, 96), (96, 32), (40, 40))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_orthogonalise_in_fp32_brings_singular_values_near_one():
    torch.manual_seed(0)
    for shape in ((128, 384), (384, 128)):
        g = torch.randn(*shape)
        s = torch.linalg.svdvals(orthogonalise(g, dtype=torch.float32))
        assert s.min() > 0.6 and s.max() < 1.25
        assert orthogonalise(g).dtype == torch.float32


def test_muon_refuses_a_vector():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.ones(4))])


def test_make_optimizer_gives_the_blocks_matrices_to_muon_and_the_rest_to_adamw():
    model = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=2,
                                    intermediate_size=48, max_seq_len=16))
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3, muon_lr=0.02, weight_decay=0.1))
    assert isinstance(optimizer, MuonAdamW)
    in_muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_muon) == (name.startswith("model.layers.") and p.dim() == 2), name
    # The schedule moves both learning rates together; the decay per step is AdamW's lr * wd.
    set_lr(optimizer, 5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4, pytest.approx(0.01)]
    muon = optimizer.muon.param_groups[0]
    assert muon["lr"] * muon["weight_decay"] == pytest.approx(5e-4 * 0.1)
    assert not isinstance(make_optimizer(model, OptimConfig()), MuonAdamW)


def test_a_resumed_muon_adamw_takes_the_same_step():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, intermediate_size=48,
                      max_seq_len=16)
    x = torch.randint(0, 64, (4, 17))

    def step(model, optimizer):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model = Transformer(cfg)
    optimizer = make_optimizer(model, OptimConfig(muon_lr=0.02))
    step(model, optimizer)
    copy = Transformer(cfg)
    copy.load_state_dict(model.state_dict())
    resumed = make_optimizer(copy, OptimConfig(muon_lr=0.02))
    resumed.load_state_dict(copy_module.deepcopy(optimizer.state_dict()))  # as a checkpoint on disk holds it
    step(model, optimizer)
    step(copy, resumed)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))
