"""Teacher drift analysis (`apo drift`): how each teacher's reasoning departs from the truth and from the others.

    apo drift --dataset DATA [--image-root DIR] [--consensus consensus.jsonl] --out DIR

Every trajectory is read with the labeler (`apo.evaluation.labeler.label`, `laterality`) and compared with the case's
ground-truth labels (`case.labels`) and sides (`case.meta["sides"]`). Per teacher, and for the consensus t+ as a
pseudo-teacher when given (JSONL of {"case_id", "text", ...}, what `apo consensus` writes):

  answers, refusal_rate   answers; share that label nothing and contain a refusal phrase ("I cannot provide ...")
  mean_words              mean length in words (all answers)
  accuracy, precision,    per (answer, observation) agreement of "labelled positive (1)" with "truly positive (1)",
  recall, f1              over the 14 observations (No Finding derived from the others by CheXpert's rule where the
                          truth leaves it blank); micro-averaged; per observation under `per_observation`
  exact                   share of answers whose positive findings are exactly the truth's (No Finding aside)
  exact_with_side         the same, and every true lateral finding named on its true side
  hallucination_rate      share of answers asserting (1) a finding the truth has as 0 or blank (No Finding aside)
  omission_rate           share of truly positive findings the answer does not assert as positive (1)
  hedge_rate              share of truly positive findings the answer calls uncertain (-1)
  side_error_rate         share of lateral findings (truth side known, answer positive/uncertain with a side) on the
                          wrong side: left/right/bilateral must match
  consensus_f1/_exact     the answer's positive findings against the consensus's for the same case
Refused answers count only in refusal_rate and mean_words; the other rates are over the answers that label
something. The per-answer definitions follow `apo.world.synth.teachers.measure` (rates per answer, per true finding,
per lateral finding), so the synthetic benchmark's designed rates can be read back here.

Divergence: for each teacher and observation, the distribution of its labels (1, 0, -1, unmentioned) over the
cases; teachers are compared pairwise by the Jensen-Shannon divergence (base 2, in [0, 1]) of those distributions,
averaged over the observations.

Images are only checked to exist (`--verify-images none` by default here): drift reads text.

Outputs: drift.json (everything), DRIFT.md (tables), error_rates.png, js_divergence.png. `drift_stats` and
`answer_stats` are pure (no I/O).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from apo.consensus import load_consensus
from apo.constants import OBSERVATIONS, TEACHERS
from apo.data import add_data_arguments, cases_from_args
from apo.errors import ApoError
from apo.evaluation.labeler import is_refusal, label, laterality
from apo.io.jobs import check_outputs
from apo.io.resumable import write_json_atomic

log = logging.getLogger(__name__)

CONSENSUS = "consensus"
FINDINGS = tuple(o for o in OBSERVATIONS if o != "No Finding")
VALUES = (1, 0, -1, None)
RATES = ("hallucination_rate", "omission_rate", "hedge_rate", "side_error_rate", "refusal_rate")


def _truth(labels: dict) -> dict:
    """Ground truth with No Finding filled in by CheXpert's rule when the data leaves it blank."""
    t = {o: labels.get(o) for o in OBSERVATIONS}
    if t["No Finding"] is None:
        t["No Finding"] = 0 if any(t[o] in (1, -1) for o in FINDINGS if o != "Support Devices") else 1
    return t


def _ratio(a, b):
    return a / b if b else None


def _prf(tp, fp, fn):
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return p, r, f


def answer_stats(cases, texts, consensus: dict | None = None) -> dict:
    """Drift statistics of one source: `texts[i]` answers `cases[i]` (None = no answer, skipped).
    `consensus`: {case_id: text} to compare with. See the module docstring for the definitions."""
    n = refused = words = answered = labelled = exact = exact_side = halluc = 0
    pos_truth = omitted = hedged = side_n = side_err = 0
    per = {o: [0, 0, 0, 0] for o in OBSERVATIONS}  # tp, fp, fn, tn
    cons = [0, 0, 0, 0]  # tp, fp, fn, exact
    cons_n = 0
    dist = {o: dict.fromkeys(VALUES, 0) for o in OBSERVATIONS}
    for case, text in zip(cases, texts):
        if text is None:
            continue
        n += 1
        words += len(text.split())
        lab = label(text)
        for o in OBSERVATIONS:
            dist[o][lab[o]] += 1
        if all(v is None for v in lab.values()):
            refused += is_refusal(text)
            if is_refusal(text):
                continue
        answered += 1
        said = {o for o in FINDINGS if lab[o] == 1}
        if consensus is not None and consensus.get(case.case_id) is not None:
            cl = label(consensus[case.case_id])
            want = {o for o in FINDINGS if cl[o] == 1}
            cons_n += 1
            cons[0], cons[1], cons[2] = (
                cons[0] + len(said & want),
                cons[1] + len(said - want),
                cons[2] + len(want - said),
            )
            cons[3] += said == want
        if not case.labels:
            continue
        labelled += 1
        truth = _truth(case.labels)
        for o in OBSERVATIONS:
            t, p = truth[o] == 1, lab[o] == 1
            per[o][0 if t and p else 1 if p else 2 if t else 3] += 1
        true_pos = {o for o in FINDINGS if truth[o] == 1}
        exact += said == true_pos
        halluc += bool(said - true_pos)
        pos_truth += len(true_pos)
        omitted += len(true_pos - said)
        hedged += sum(lab[o] == -1 for o in true_pos)
        sides = (case.meta or {}).get("sides") or {}
        lat = laterality(text) if sides else {}
        for o, side in sides.items():
            if o in lat and lab.get(o) in (1, -1):
                side_n += 1
                side_err += lat[o] != side
        exact_side += said == true_pos and all(lat.get(o) == side for o, side in sides.items() if o in true_pos)
    tp, fp, fn, tn = (sum(c[i] for o, c in per.items()) for i in range(4))
    p, r, f = _prf(tp, fp, fn)
    per_obs = {}
    for o, (a, b, c, d) in per.items():
        po, ro, fo = _prf(a, b, c)
        per_obs[o] = {
            "accuracy": _ratio(a + d, a + b + c + d),
            "precision": po,
            "recall": ro,
            "f1": fo,
            "support": a + c,
            "tp": a,
            "fp": b,
            "fn": c,
        }
    out = {
        "answers": n,
        "answered": answered,
        "labelled": labelled,
        "refusal_rate": _ratio(refused, n),
        "mean_words": _ratio(words, n),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "precision": p,
        "recall": r,
        "f1": f,
        "exact": _ratio(exact, labelled),
        "exact_with_side": _ratio(exact_side, labelled),
        "hallucination_rate": _ratio(halluc, labelled),
        "omission_rate": _ratio(omitted, pos_truth),
        "hedge_rate": _ratio(hedged, pos_truth),
        "side_error_rate": _ratio(side_err, side_n),
        "side_n": side_n,
        "true_findings": pos_truth,
        "consensus_f1": _prf(*cons[:3])[2] if cons_n else None,
        "consensus_exact": _ratio(cons[3], cons_n),
        "per_observation": per_obs,
        "label_distribution": {o: {str(k): v for k, v in d.items()} for o, d in dist.items()},
        # the sums behind the rates: pooled over any subset of cases they give that subset's rates (the bootstrap)
        "counts": {
            "answers": n,
            "refused": refused,
            "labelled": labelled,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "hallucinated": halluc,
            "true_findings": pos_truth,
            "omitted": omitted,
            "hedged": hedged,
            "side_n": side_n,
            "side_errors": side_err,
            "exact": exact,
            "exact_with_side": exact_side,
        },
    }
    return out


def brief(stats: dict, cases: int) -> dict:
    """The rates a consensus is judged by, under the names summary.json uses (fractions). `exact` and
    `exact_findings` are over all `cases` with ground truth: a refusal is not an exact answer."""
    c = stats["counts"]
    return {
        "exact": _ratio(c["exact_with_side"], cases),
        "exact_findings": _ratio(c["exact"], cases),
        "f1": stats["f1"],
        "hallucination": stats["hallucination_rate"],
        "omission": stats["omission_rate"],
        "wrong_side": stats["side_error_rate"],
        "hedge": stats["hedge_rate"],
        "refusal": stats["refusal_rate"],
        "answers": stats["answers"],
    }


def consensus_quality(cases, strategies: dict[str, dict]) -> dict:
    """How close each strategy's t+ ({name: {case_id: text}}) is to the truth, beside the best single teacher (by
    exact match of the positive findings and their sides): is the compare stage's positive better than one teacher?
    Every source is scored on the same cases: those with ground truth that every strategy answered."""
    common = [c for c in cases if c.labels and all(c.case_id in texts for texts in strategies.values())]
    teachers = sorted({t.teacher for c in common for t in c.trajectories})
    per_teacher = {
        name: answer_stats(common, [next((t.text for t in c.trajectories if t.teacher == name), None) for c in common])
        for name in teachers
    }
    best = max(teachers, key=lambda n: per_teacher[n]["counts"]["exact_with_side"]) if teachers else None
    n = len(common)
    out = {
        name: brief(answer_stats(common, [texts[c.case_id] for c in common]), n) for name, texts in strategies.items()
    }
    out["best_teacher"] = best
    out["best_teacher_exact"] = _ratio(per_teacher[best]["counts"]["exact_with_side"], n) if best else None
    out["n_cases"] = n
    return out


def _js(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon divergence, base 2 (0 = same distribution, 1 = disjoint support)."""

    def kl(a, b):
        return sum(x * math.log2(x / y) for x, y in zip(a, b) if x > 0)

    m = [(x + y) / 2 for x, y in zip(p, q)]
    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


def js_divergence(dist_a: dict, dist_b: dict) -> float:
    """Mean over observations of the JS divergence between two sources' label distributions
    (`label_distribution` of `answer_stats`: {obs: {"1": n, "0": n, "-1": n, "None": n}})."""
    vals = []
    for o in OBSERVATIONS:
        a, b = dist_a[o], dist_b[o]
        na, nb = sum(a.values()), sum(b.values())
        if na and nb:
            vals.append(_js([a[k] / na for k in a], [b[k] / nb for k in a]))
    return sum(vals) / len(vals) if vals else float("nan")


def drift_stats(cases, consensus: dict | list | None = None) -> dict:
    """Per-teacher drift statistics (plus the consensus as a pseudo-teacher) and pairwise JS divergence.

    `cases`: `apo.data.Case` list; `consensus`: {case_id: text} or a list of texts aligned with `cases` (None
    entries = no consensus for that case). Teachers are ordered as CXR-MAX lists them, unknown names after."""
    if consensus is not None and not isinstance(consensus, dict):
        consensus = {c.case_id: t for c, t in zip(cases, consensus)}
    seen = {t.teacher for c in cases for t in c.trajectories}
    order = [t for t in TEACHERS if t in seen] + sorted(seen - set(TEACHERS))
    per = {}
    for name in order:
        texts = [next((t.text for t in c.trajectories if t.teacher == name), None) for c in cases]
        per[name] = answer_stats(cases, texts, consensus)
    if consensus is not None:
        per[CONSENSUS] = answer_stats(cases, [consensus.get(c.case_id) for c in cases], consensus)
    names = list(per)
    matrix = {
        a: {b: js_divergence(per[a]["label_distribution"], per[b]["label_distribution"]) for b in names} for a in names
    }
    return {
        "n_cases": len(cases),
        "n_labelled": sum(bool(c.labels) for c in cases),
        "n_consensus": sum(1 for c in cases if consensus and consensus.get(c.case_id) is not None),
        "sources": names,
        "per_teacher": per,
        "divergence": {
            "method": "Jensen-Shannon (base 2) of per-observation label distributions, mean over the 14 observations",
            "matrix": matrix,
        },
    }


def _fmt(x, pct=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}%" if pct else (f"{x:.3f}" if isinstance(x, float) else str(x))


def markdown(stats: dict) -> str:
    per, names = stats["per_teacher"], stats["sources"]
    lines = [
        "# Teacher drift",
        "",
        f"{stats['n_cases']} cases ({stats['n_labelled']} with ground-truth labels"
        + (f", {stats['n_consensus']} with a consensus t+" if stats.get("n_consensus") else "")
        + "). "
        "Labels read with `apo.evaluation.labeler`; definitions in `apo/evaluation/drift.py`.",
        "",
        "| source | answers | refusal | words | accuracy | F1 | exact | hallucination | omission | hedge | "
        "side error | F1 vs consensus |",
        "|---|" + "---:|" * 11,
    ]
    for n in names:
        s = per[n]
        words = "-" if s["mean_words"] is None else f"{s['mean_words']:.1f}"
        lines.append(
            f"| {n} | {s['answers']} | {_fmt(s['refusal_rate'], 1)} | {words} | "
            f"{_fmt(s['accuracy'])} | {_fmt(s['f1'])} | {_fmt(s['exact'], 1)} | {_fmt(s['hallucination_rate'], 1)} | "
            f"{_fmt(s['omission_rate'], 1)} | {_fmt(s['hedge_rate'], 1)} | {_fmt(s['side_error_rate'], 1)} | "
            f"{_fmt(s['consensus_f1'])} |"
        )
    obs = [o for o in OBSERVATIONS if any(per[n]["per_observation"][o]["support"] for n in names)]
    if obs:
        lines += [
            "",
            "## F1 per observation (support = truly positive answers)",
            "",
            "| observation | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for o in obs:
            cells = [
                f"{_fmt(per[n]['per_observation'][o]['f1'])} ({per[n]['per_observation'][o]['support']})" for n in names
            ]
            lines.append(f"| {o} | " + " | ".join(cells) + " |")
    m = stats["divergence"]["matrix"]
    lines += [
        "",
        "## Pairwise divergence",
        "",
        stats["divergence"]["method"] + ".",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(_fmt(m[a][b]) for b in names) + " |")
    return "\n".join(lines) + "\n"


def plot(stats: dict, out_dir) -> list[str]:
    """error_rates.png (grouped bars per source) and js_divergence.png (heatmap). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    per, names = stats["per_teacher"], stats["sources"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    w = 0.8 / len(RATES)
    x = np.arange(len(names))
    for i, r in enumerate(RATES):
        ax.bar(x + (i - (len(RATES) - 1) / 2) * w, [per[n][r] or 0.0 for n in names], w, label=r.replace("_rate", ""))
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1)
    ax.set_title("Teacher drift: error rates (labeler vs ground truth)")
    ax.legend(fontsize=8, ncol=len(RATES))
    fig.tight_layout()
    bars = out_dir / "error_rates.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)

    m = np.array([[stats["divergence"]["matrix"][a][b] for b in names] for a in names])
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 0.9 * len(names) + 1.5))
    im = ax.imshow(m, cmap="viridis", vmin=0)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{m[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if m[i, j] < m.max() / 2 else "black",
            )
    fig.colorbar(im, ax=ax, label="JS divergence (bits)")
    ax.set_title("Pairwise divergence of label distributions")
    fig.tight_layout()
    heat = out_dir / "js_divergence.png"
    fig.savefig(heat, dpi=120)
    plt.close(fig)
    return [str(bars), str(heat)]


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.set_defaults(verify_images="none")  # drift reads text only: check that images exist, do not decode them
    parser.add_argument(
        "--consensus",
        default=None,
        help="consensus JSONL ({case_id, text} per line, as `apo consensus` writes): scored as a "
        "pseudo-teacher and compared with every teacher",
    )
    parser.add_argument(
        "--out", required=True, help="output folder: drift.json, DRIFT.md, error_rates.png, js_divergence.png"
    )


def run(args) -> int:
    out = Path(args.out)
    check_outputs({"--out": out / "drift.json"}, {"--dataset": args.dataset, "--consensus": args.consensus})
    cases = cases_from_args(args, rejects_default=str(out / "rejects.jsonl"))
    if not cases:
        raise ApoError(f"{args.dataset}: no case to analyse")
    consensus = None
    if args.consensus:
        records = load_consensus(args.consensus, args.skip_bad, out / "consensus_rejects.jsonl")
        consensus = {k: r["text"] for k, r in records.items()}
    if consensus is not None:
        known = {c.case_id for c in cases}
        missing = sum(c.case_id not in consensus for c in cases)
        extra = sum(k not in known for k in consensus)
        if missing == len(cases):
            raise ApoError(f"--consensus {args.consensus}: none of its case ids is in {args.dataset}")
        if missing or extra:
            log.warning(
                "consensus: %d cases have no consensus text, %d consensus records match no case", missing, extra
            )
    stats = drift_stats(cases, consensus)
    write_json_atomic(out / "drift.json", stats)
    (out / "DRIFT.md").write_text(markdown(stats), encoding="utf-8")
    pngs = plot(stats, out)
    if not stats["n_labelled"]:
        log.warning(
            "no case has ground-truth labels: only refusal, length, consensus agreement and divergence are measured"
        )
    print(markdown(stats).split("\n## ")[0])
    print(f"drift: wrote {out / 'drift.json'}, {out / 'DRIFT.md'}, " + ", ".join(Path(p).name for p in pngs))
    return 0
