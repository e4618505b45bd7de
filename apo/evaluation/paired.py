"""Paired differences between two students with bootstrap intervals over seeds and cases.

Every rate of `apo.evaluation.drift.answer_stats` is a ratio of sums over cases (F1 = 2TP / (2TP + FP + FN),
hallucination = hallucinated / labelled, ...), so a student's answers are kept as per-case counts (`case_counts`) and
any resample's rate is recomputed from the pooled sums, never averaged from per-case rates.

`paired_bootstrap` resamples in two levels, as the experiment varies: seeds with replacement, then the cases of each
drawn seed with replacement; both students are scored on the same draw (the pairing), and the difference of their
pooled rates is one bootstrap value. The point estimate is the difference on all cases of all seeds; the interval is
the percentile interval of the bootstrap values. With one seed it is the plain case bootstrap.
"""

from __future__ import annotations

import numpy as np

from apo.evaluation.drift import answer_stats

COUNTS = (
    "answers",
    "refused",
    "labelled",
    "tp",
    "fp",
    "fn",
    "hallucinated",
    "true_findings",
    "omitted",
    "hedged",
    "side_n",
    "side_errors",
)
_I = {k: i for i, k in enumerate(COUNTS)}


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


# rate name -> (rate from pooled counts [..., len(COUNTS)], direction: +1 higher is better, -1 lower is better)
RATES = {
    "f1": (lambda c: _div(2 * c[..., _I["tp"]], 2 * c[..., _I["tp"]] + c[..., _I["fp"]] + c[..., _I["fn"]]), +1),
    "side_accuracy": (lambda c: 1 - _div(c[..., _I["side_errors"]], c[..., _I["side_n"]]), +1),
    "hallucination": (lambda c: _div(c[..., _I["hallucinated"]], c[..., _I["labelled"]]), -1),
    "omission": (lambda c: _div(c[..., _I["omitted"]], c[..., _I["true_findings"]]), -1),
    "hedge": (lambda c: _div(c[..., _I["hedged"]], c[..., _I["true_findings"]]), -1),
    "refusal": (lambda c: _div(c[..., _I["refused"]], c[..., _I["answers"]]), -1),
}


def case_counts(case, texts) -> list[int]:
    """The counts of one case's answers (one greedy answer, or its K samples pooled), in COUNTS order."""
    texts = list(texts)
    c = answer_stats([case] * len(texts), texts)["counts"]
    return [c[k] for k in COUNTS]


def rates(counts) -> dict:
    """Every rate of `counts` ([cases, len(COUNTS)] or a list of such arrays, one per seed) pooled over all cases."""
    total = np.concatenate([np.asarray(c, dtype=float).reshape(-1, len(COUNTS)) for c in _seeds(counts)]).sum(0)
    return {name: _float(f(total)) for name, (f, _) in RATES.items()}


def _seeds(counts):
    return counts if isinstance(counts, list) else [counts]


def _float(x):
    x = float(x)
    return None if np.isnan(x) else x


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Rate differences a - b with bootstrap intervals over seeds and cases.

    `a`, `b`: one [cases, len(COUNTS)] array per seed, row i of a seed being the same case for both students.
    Returns {rate: {"diff", "low", "high", "better_share", "n_seeds", "n_cases"}}: `better_share` is the share of
    bootstrap draws in which a is better than b (by the rate's direction); None where a rate is not measurable.
    """
    a = [np.asarray(x, dtype=float).reshape(-1, len(COUNTS)) for x in _seeds(a)]
    b = [np.asarray(x, dtype=float).reshape(-1, len(COUNTS)) for x in _seeds(b)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError("paired_bootstrap: both students need the same seeds and the same cases per seed")
    if not a or any(len(x) == 0 for x in a):
        raise ValueError("paired_bootstrap: a seed without cases")
    rng = np.random.default_rng(seed)
    S = len(a)
    # pooled sums of each draw: seeds drawn with replacement, then cases within each drawn seed
    sum_a = np.zeros((n_boot, len(COUNTS)))
    sum_b = np.zeros((n_boot, len(COUNTS)))
    seed_draws = rng.integers(0, S, size=(n_boot, S))
    for s in range(S):
        n = len(a[s])
        times = (seed_draws == s).sum(1)  # how often seed s is drawn in each bootstrap sample
        for k in range(1, S + 1):
            rows = np.nonzero(times >= k)[0]  # the k-th copy of seed s, in the draws that hold one
            if rows.size == 0:
                break
            idx = rng.integers(0, n, size=(rows.size, n))
            sum_a[rows] += a[s][idx].sum(1)
            sum_b[rows] += b[s][idx].sum(1)
    total_a = np.concatenate(a).sum(0)
    total_b = np.concatenate(b).sum(0)
    alpha = (1 - level) / 2
    out = {}
    for name, (f, better) in RATES.items():
        point = f(total_a) - f(total_b)
        boots = f(sum_a) - f(sum_b)
        boots = boots[~np.isnan(boots)]
        if np.isnan(point) or boots.size == 0:
            out[name] = None
            continue
        lo, hi = np.quantile(boots, [alpha, 1 - alpha])
        out[name] = {
            "diff": float(point),
            "low": float(lo),
            "high": float(hi),
            "better_share": float(np.mean(boots * better > 0)),
            "n_seeds": S,
            "n_cases": int(sum(len(x) for x in a)),
        }
    return out
