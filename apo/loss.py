"""Preference losses over groups {t+, t_1..t_N}: the APO Plackett-Luce loss and pairwise DPO (the ablation).

Inputs are [B, 1+N] summed response log-probs, column 0 the positive (the consensus t+), columns 1.. the teacher
negatives; `valid` [B, 1+N] marks real negatives (groups may have fewer than N). Implicit reward
r = beta * (log pi_theta - log pi_ref). Both work on reward *differences* d_i = r_i - r+, which keeps them exact and
finite for |r| up to 1e4 in float32 (r+ and r_i alone would lose the small gap to rounding). A group with no valid
negative has nothing to rank: it is left out of the mean, not counted as a zero loss.
"""

import torch
import torch.nn.functional as F


def _f32(x):  # at least float32 (bf16 log-probs would swamp the reward gap), float64 kept for tests
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _prepare(policy_logps, ref_logps, beta, valid):
    r = beta * (_f32(policy_logps) - _f32(ref_logps))
    if valid is None:
        valid = torch.ones_like(r, dtype=torch.bool)
    valid = valid.clone()
    valid[:, 0] = True
    neg = valid[:, 1:]
    d = torch.where(neg, r[:, 1:] - r[:, :1], torch.zeros_like(r[:, 1:]))  # where(): no NaN leaks from padding
    return r, d, neg, neg.any(dim=1)


@torch.no_grad()
def _metrics(r, policy_logps, neg, active):
    """Means over the groups that have a negative (and over valid negatives for the negatives' columns)."""
    lp = _f32(policy_logps)
    r_neg, lp_neg = torch.where(neg, r[:, 1:], 0.0), torch.where(neg, lp[:, 1:], 0.0)
    n_neg = neg.sum().clamp(min=1)
    a = active.float() / active.sum().clamp(min=1)
    r_neg_mean = r_neg.sum(1) / neg.sum(1).clamp(min=1)
    r_neg_max = r[:, 1:].masked_fill(~neg, float("-inf")).amax(1)
    return {
        "rewards/positive": (torch.where(active, r[:, 0], 0.0) * a).sum(),
        "rewards/negatives": r_neg.sum() / n_neg,
        "rewards/margins": (torch.where(active, r[:, 0] - r_neg_mean, 0.0) * a).sum(),
        "rewards/accuracies": ((r[:, 0] > r_neg_max).float() * a).sum(),
        "logps/positive": (torch.where(active, lp[:, 0], 0.0) * a).sum(),
        "logps/negatives": lp_neg.sum() / n_neg,
    }


def plackett_luce_loss(policy_logps, ref_logps, beta: float, valid=None):
    """-log P(t+ ranked above all negatives) = logsumexp([r+, r_1..r_N]) - r+ = log(1 + sum_i exp(r_i - r+)).

    policy_logps, ref_logps: [B, 1+N] summed response log-probs under the policy and pi_ref, column 0 t+.
    valid: [B, 1+N] bool or None (all valid). Returns (loss: scalar, the mean over groups with a negative;
    metrics: dict of scalars, rewards/{positive,negatives,margins,accuracies}, logps/{positive,negatives}).

    >>> import torch
    >>> from apo import plackett_luce_loss
    >>> policy = torch.tensor([[-10.0, -12.0, -11.0, 0.0]], requires_grad=True)  # 1 group: t+, 2 negatives, padding
    >>> ref = torch.tensor([[-11.0, -11.0, -11.0, 0.0]])
    >>> loss, m = plackett_luce_loss(policy, ref, beta=0.1, valid=torch.tensor([[True, True, True, False]]))
    >>> round(loss.item(), 4), round(m["rewards/margins"].item(), 4)
    (1.0019, 0.15)
    >>> loss.backward()  # gradients reach the policy log-probs; the padded column gets none
    >>> policy.grad[0, 3].item()
    0.0
    """
    r, d, neg, active = _prepare(policy_logps, ref_logps, beta, valid)
    d = torch.cat([torch.zeros_like(d[:, :1]), d.masked_fill(~neg, float("-inf"))], dim=1)
    losses = torch.logsumexp(d, dim=1)  # N=1: log(1 + e^(r1 - r+)) = -logsigmoid(r+ - r1), DPO exactly
    loss = (losses * active).sum() / active.sum().clamp(min=1)
    return loss, _metrics(r, policy_logps, neg, active)


def dpo_loss(policy_logps, ref_logps, beta: float, valid=None):
    """Pairwise DPO: -logsigmoid(r+ - r_i), mean over every valid (positive, negative) pair in the batch.

    Same shapes and return as `plackett_luce_loss`; with N = 1 both give the same loss.

    >>> import torch
    >>> from apo import dpo_loss, plackett_luce_loss
    >>> policy, ref = torch.tensor([[-10.0, -12.0]]), torch.tensor([[-11.0, -11.0]])
    >>> torch.allclose(dpo_loss(policy, ref, 0.1)[0], plackett_luce_loss(policy, ref, 0.1)[0])
    True
    """
    r, d, neg, active = _prepare(policy_logps, ref_logps, beta, valid)
    losses = F.softplus(d)  # = -logsigmoid(r+ - r_i)
    loss = (losses * neg).sum() / neg.sum().clamp(min=1)
    return loss, _metrics(r, policy_logps, neg, active)


LOSSES = {"apo": plackett_luce_loss, "dpo": dpo_loss}
