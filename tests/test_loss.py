"""The APO Plackett-Luce loss and the pairwise DPO ablation, against brute force."""

import math

import pytest
import torch
import torch.nn.functional as F

from apo.loss import dpo_loss, plackett_luce_loss


def _rand(b, n, seed=0, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1 + n, generator=g, dtype=torch.float64) * scale, torch.randn(
        b, 1 + n, generator=g, dtype=torch.float64
    ) * scale


def test_n1_equals_dpo_sigmoid_loss():
    pol, ref = _rand(6, 1)
    beta = 0.1
    loss, m = plackett_luce_loss(pol, ref, beta)
    r = beta * (pol - ref)
    want = -F.logsigmoid(r[:, 0] - r[:, 1]).mean()
    assert torch.allclose(loss, want, atol=1e-12)
    # and dpo_loss with N=1 is the same thing
    assert torch.allclose(dpo_loss(pol, ref, beta)[0], want, atol=1e-12)
    assert torch.allclose(m["rewards/margins"], (r[:, 0] - r[:, 1]).mean())


def test_brute_force_softmax():
    pol, ref = _rand(5, 4, seed=1)
    beta = 0.3
    loss, m = plackett_luce_loss(pol, ref, beta)
    r = (beta * (pol - ref)).tolist()
    want = sum(-math.log(math.exp(row[0]) / sum(math.exp(x) for x in row)) for row in r) / len(r)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    acc = sum(row[0] > max(row[1:]) for row in r) / len(r)
    assert m["rewards/accuracies"].item() == pytest.approx(acc)


def test_masking_equals_removal_and_order_is_irrelevant():
    pol, ref = _rand(3, 5, seed=2)
    valid = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pol_pad = pol.clone()
    pol_pad[~valid] = float("nan")  # padding may hold anything, even NaN
    loss, m = plackett_luce_loss(pol_pad, ref, 0.1, valid)
    per_group = [plackett_luce_loss(pol[b : b + 1, valid[b]], ref[b : b + 1, valid[b]], 0.1)[0] for b in range(3)]
    assert torch.allclose(loss, torch.stack(per_group).mean(), atol=1e-12)
    assert torch.isfinite(torch.stack(list(m.values()))).all()
    perm = torch.tensor([0, 3, 5, 1, 4, 2])  # shuffle the negatives, keep column 0
    loss_p, m_p = plackett_luce_loss(pol_pad[:, perm], ref[:, perm], 0.1, valid[:, perm])
    assert torch.allclose(loss, loss_p, atol=1e-12)
    for k in m:
        assert torch.allclose(m[k], m_p[k], atol=1e-12), k


@pytest.mark.parametrize("loss_fn", [plackett_luce_loss, dpo_loss])
@pytest.mark.parametrize("gap", [1e-3, 1.0, 1e2, 1e3, 1e4])
def test_finite_for_huge_gaps(loss_fn, gap):
    for sign in (1.0, -1.0):
        pol = torch.tensor([[sign * gap, -sign * gap, 0.0, sign * gap]], requires_grad=True)
        loss, m = loss_fn(pol, torch.zeros(1, 4), 1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pol.grad).all(), (gap, sign)
        assert all(torch.isfinite(v) for v in m.values())
    # the loss of a hugely-won group is ~0, of a hugely-lost group ~ the gap (float32, no rounding to inf)
    won, _ = loss_fn(torch.tensor([[gap, -gap]]), torch.zeros(1, 2), 1.0)
    lost, _ = loss_fn(torch.tensor([[-gap, gap]]), torch.zeros(1, 2), 1.0)
    assert won.item() == pytest.approx(math.log1p(math.exp(-2 * gap)), abs=1e-6)
    assert lost.item() == pytest.approx(2 * gap + math.log1p(math.exp(-2 * gap)), rel=1e-6)


def test_group_without_valid_negative_is_left_out():
    pol, ref = _rand(3, 2, seed=3)
    valid = torch.ones(3, 3, dtype=torch.bool)
    valid[1, 1:] = False
    for fn in (plackett_luce_loss, dpo_loss):
        loss, m = fn(pol, ref, 0.1, valid)
        keep = torch.tensor([0, 2])
        loss_k, m_k = fn(pol[keep], ref[keep], 0.1)
        assert torch.allclose(loss, loss_k, atol=1e-12), fn.__name__
        for k in m:
            assert torch.allclose(m[k], m_k[k], atol=1e-12), (fn.__name__, k)
    # nothing to rank at all: loss 0 with a graph (backward works), not NaN
    pol = pol.clone().requires_grad_()
    loss, _ = plackett_luce_loss(pol, ref, 0.1, torch.tensor([[1, 0, 0]] * 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pol.grad, torch.zeros_like(pol))


def test_dpo_loss_is_mean_over_pairs():
    pol, ref = _rand(2, 3, seed=4)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    loss, _ = dpo_loss(pol, ref, 0.2, valid)
    r = 0.2 * (pol - ref)
    pairs = [-F.logsigmoid(r[b, 0] - r[b, i]) for b in range(2) for i in range(1, 4) if valid[b, i]]
    assert len(pairs) == 4
    assert torch.allclose(loss, torch.stack(pairs).mean(), atol=1e-12)


def test_gradient_pushes_positive_up_and_negatives_down():
    pol = torch.zeros(1, 4, requires_grad=True)
    loss, _ = plackett_luce_loss(pol, torch.zeros(1, 4), 0.1)
    loss.backward()
    g = pol.grad[0]
    assert g[0] < 0 and (g[1:] > 0).all()  # descent raises log pi(t+), lowers each teacher's
    assert torch.allclose(g.sum(), torch.tensor(0.0), atol=1e-7)  # softmax gradient: shift invariant


def test_metrics_names():
    _, m = plackett_luce_loss(*_rand(2, 2), 0.1)
    assert set(m) == {
        "rewards/positive",
        "rewards/negatives",
        "rewards/margins",
        "rewards/accuracies",
        "logps/positive",
        "logps/negatives",
    }
