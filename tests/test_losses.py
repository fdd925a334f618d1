"""Preference-alignment losses against values derived by hand and a plain-loop GAE."""

import math

import pytest
import torch

from stagewise import losses


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (-math.log(sigmoid(1.0)) - math.log(sigmoid(-1.0))) / 2
    assert losses.bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    with_margin = (-math.log(sigmoid(0.5)) - math.log(sigmoid(-1.5))) / 2
    assert losses.bradley_terry_loss(chosen, rejected, margin=0.5).item() == pytest.approx(with_margin, rel=1e-6)
    centred = expected + 0.01 * (3.0 ** 2 + 1.0 ** 2) / 2
    assert losses.bradley_terry_loss(chosen, rejected, center_coef=0.01).item() == pytest.approx(centred, rel=1e-6)


def test_dpo_and_ipo_by_hand():
    pc, pr = torch.tensor([-10.0]), torch.tensor([-12.0])
    rc, rr = torch.tensor([-11.0]), torch.tensor([-11.0])
    # logits = (-10 - -11) - (-12 - -11) = 1 - (-1) = 2
    assert losses.dpo_logits(pc, pr, rc, rr).item() == 2.0
    assert losses.dpo_loss(pc, pr, rc, rr, beta=0.1).item() == pytest.approx(-math.log(sigmoid(0.2)), rel=1e-6)
    # IPO with beta 0.25: (2 - 1 / 0.5)^2 = 0
    assert losses.ipo_loss(pc, pr, rc, rr, beta=0.25).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.ipo_loss(pc, pr, rc, rr, beta=0.1).item() == pytest.approx((2 - 5) ** 2, rel=1e-6)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    losses.dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1).backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def gae_loop(rewards, values, lengths, gamma, lam):
    out = []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        advantages = [0.0] * len(r)
        running = 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            advantages[t] = running
        out.append(advantages)
    return torch.tensor(out)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_equals_a_plain_loop(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    lengths = [7, 3, 1, 5]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    advantages, returns = losses.gae(rewards, values, mask, gamma, lam)
    expected = gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    advantages, _ = losses.gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), 1.0, 1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.9]]))


def test_ppo_clip_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = losses.ppo_policy_loss(new, old, advantages, mask, clip=0.2)
    # token 1: A>0, ratio 1.5 -> clipped to 1.2: -1.2; token 2: A>0, ratio 0.5: min(0.5, 0.8) -> -0.5;
    # token 3: A<0, ratio 1.1 inside the clip range: 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    # gradient flows only where the ratio was not clipped
    new.requires_grad_(True)
    losses.ppo_policy_loss(new, old, advantages, mask)[0].backward()
    assert new.grad[0, 0].item() == 0.0 and new.grad[0, 1].item() != 0.0


def test_value_clip_by_hand():
    values, old, returns = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    loss, stats = losses.ppo_value_loss(values, old, returns, torch.ones(1, 1, dtype=torch.bool), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.2 - 2.0) ** 2)  # the clipped error (3.24) is larger
    assert stats["clipfrac"].item() == 1.0


def test_kl_estimator_is_unbiased_for_a_categorical():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(5), 0)
    q = torch.softmax(torch.randn(5), 0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = losses.kl_per_token(p.log()[samples], q.log()[samples]).mean()
    exact = (p * (p.log() - q.log())).sum()
    assert estimate.item() == pytest.approx(exact.item(), abs=0.01)


def test_whiten_is_zero_mean_unit_variance_on_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = losses.whiten(x, mask)
    assert w[0, 3] == 0 and w[0, :3].mean().abs() < 1e-6
    assert (w[0, :3] ** 2).mean().item() == pytest.approx(1.0, rel=1e-4)
