"""The paper's tables and training curves from a results folder (`apo tables --results DIR --out DIR`).

Results layout (what the evaluation stages write; any run name works, base / sft / dpo / apo are the ablation's):

    results/<run>/metrics.json        apo eval-report: {"nlg": {BLEU-1..4, METEOR, ROUGE-L, CIDEr},
                                      "clinical": {"micro": {precision, recall, f1}, "macro": {...}, ...},
                                      "drift": {hallucination_rate, omission_rate, ...}, "n": ...,
                                      "drift_rates": {"greedy": {...}, "sampled": {...} | null},
                                      "signature": {"phrases", "own", "greedy", "sampled"} | null} (the last two
                                      optional: older files without them give greedy rates only)
    results/<run>/mscxrt.json         apo eval-mscxrt: {"per_finding": {finding: top-1}, "average",
                                      "average_macro", ...}
    results/<run>/trainer_state.json  HF Trainer state (its "log_history": loss, rewards/margins, rewards/accuracies,
                                      rewards/teacher/<name>, ...); else the latest
                                      <run>/checkpoint-*/trainer_state.json
    results/drift/drift.json          apo drift: per-teacher statistics on the teachers' own trajectories

Writes OUT/tables.md and OUT/tables.tex with: MS-CXR-T top-1 per finding and average; report generation (NLG and
clinical efficacy); the ablation (each run's headline numbers and its drift rates, greedy and sampled side by side);
the teachers scored on their own trajectories (with each student's rates on its answers for comparison); how often
each run copies each teacher's signature wording (runs evaluated with --signatures-from); and OUT/curves_<run>.png
(loss, reward margin, mean reward per teacher). Numbers the paper publishes (PAPER_* below) are shown in their own rows,
labelled "paper (published)", below the measured ones; cells it does not publish stay blank. Prints the MS-CXR-T table.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from apo.constants import MSCXRT_FINDINGS
from apo.errors import ApoError, DataError

log = logging.getLogger(__name__)

ABLATION_ORDER = ("base", "sft", "dpo", "apo")
PUBLISHED = "paper (published)"
# Only what the paper (arXiv 2510.04142) publishes as numbers: MS-CXR-T top-1 and report-generation BLEU-1.
PAPER_MSCXRT = [
    ("APO 7B", {"pneumothorax": 0.96, "consolidation": 0.84, "average": 0.78}),
    ("best prior", {"average": 0.69}),
]
PAPER_REPORT = [("APO 7B", {"BLEU-1": 0.56}), ("best prior", {"BLEU-1": 0.43})]
NLG_COLS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
DRIFT_COLS = (
    ("hallucination", "hallucination_rate"),
    ("omission", "omission_rate"),
    ("hedge", "hedge_rate"),
    ("side error", "side_error_rate"),
    ("refusal", "refusal_rate"),
)
# DRIFT_COLS' answer_stats keys -> eval-report's "drift_rates" names (apo.evaluation.report.DRIFT_RATES)
RATE_NAMES = {
    "hallucination_rate": "hallucination",
    "omission_rate": "omission",
    "hedge_rate": "hedge",
    "side_error_rate": "wrong_side",
    "refusal_rate": "refusal",
}


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"not JSON ({e.msg})") from None


def _trainer_state(run_dir: Path) -> Path | None:
    p = run_dir / "trainer_state.json"
    if p.is_file():
        return p
    ckpts = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"),
        key=lambda q: int(q.parent.name.split("-")[-1]) if q.parent.name.split("-")[-1].isdigit() else -1,
    )
    return ckpts[-1] if ckpts else None


def _order(names):
    known = [n for n in ABLATION_ORDER if n in names]
    return known + sorted(n for n in names if n not in ABLATION_ORDER)


def read_results(root) -> dict:
    """{"runs": {run: {"metrics", "mscxrt", "trainer_state": path}}, "drift": drift.json or None}."""
    root = Path(root)
    if not root.is_dir():
        raise ApoError(f"--results {root}: no such folder")
    runs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "drift"):
        run = {}
        if (d / "metrics.json").is_file():
            run["metrics"] = _read_json(d / "metrics.json")
        if (d / "mscxrt.json").is_file():
            run["mscxrt"] = _read_json(d / "mscxrt.json")
        ts = _trainer_state(d)
        if ts:
            run["trainer_state"] = ts
        if run:
            runs[d.name] = run
    drift = _read_json(root / "drift" / "drift.json") if (root / "drift" / "drift.json").is_file() else None
    if not runs and drift is None:
        raise ApoError(
            f"{root}: no results found (expected <run>/metrics.json, <run>/mscxrt.json, "
            "<run>/trainer_state.json or drift/drift.json)"
        )
    return {"runs": {k: runs[k] for k in _order(runs)}, "drift": drift}


def student_drift(metrics: dict) -> dict | None:
    """A run's drift rates from its metrics.json: a flat rate dict (apo.evaluation.drift.answer_stats, or
    eval-report's own drift_metrics), or a drift_stats dict whose pseudo-teacher ("consensus") holds the run's
    answers."""
    d = (metrics or {}).get("drift")
    if not isinstance(d, dict):
        return None
    if "per_teacher" in d:
        per = d["per_teacher"]
        d = per.get("consensus") or (next(iter(per.values())) if len(per) == 1 else None)
    if d is not None and d.get("side_error_rate") is None and d.get("side_accuracy") is not None:
        d = dict(d, side_error_rate=1 - d["side_accuracy"])
    return d


def _greedy_sampled(metrics: dict) -> tuple[dict, dict]:
    """({answer_stats key: rate} of the greedy answers, the same of the pooled samples) from a metrics.json; a file
    written before eval-report had drift_rates gives its `drift` rates as greedy and no sampled rates."""
    dr = (metrics or {}).get("drift_rates") or {}
    greedy = dr.get("greedy")
    greedy = {k: greedy.get(n) for k, n in RATE_NAMES.items()} if greedy else (student_drift(metrics) or {})
    sampled = dr.get("sampled")
    return greedy, ({k: sampled.get(n) for k, n in RATE_NAMES.items()} if sampled else {})


# ----------------------------------------------------------------------------- tables as data


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def mscxrt_table(res) -> dict:
    # "average" is the paper's (mean Top-1 over findings); "class-balanced" the mean over findings of the accuracy
    # balanced over improving/stable/worsening (BioViL-T's macro accuracy), for runs whose mscxrt.json has it
    cols = [*MSCXRT_FINDINGS, "average", "class-balanced"]
    rows = []
    for run, r in res["runs"].items():
        m = r.get("mscxrt")
        if m:
            rows.append(
                (
                    run,
                    [_num(m.get("per_finding", {}).get(f)) for f in MSCXRT_FINDINGS]
                    + [_num(m.get("average")), _num(m.get("average_macro"))],
                )
            )
    ref = [(f"{who} — {PUBLISHED}", [vals.get(c) for c in cols]) for who, vals in PAPER_MSCXRT]
    return {
        "title": "MS-CXR-T temporal image classification (top-1 accuracy)",
        "columns": ["run"] + [c.replace("_", " ") for c in cols],
        "rows": rows,
        "reference": ref,
    }


def report_table(res) -> dict:
    cols = list(NLG_COLS) + ["CE P", "CE R", "CE F1", "n"]
    rows = []
    for run, r in res["runs"].items():
        m = r.get("metrics")
        if m:
            nlg, ce = m.get("nlg") or {}, (m.get("clinical") or {}).get("micro") or {}
            rows.append(
                (
                    run,
                    [_num(nlg.get(k)) for k in NLG_COLS]
                    + [_num(ce.get(k)) for k in ("precision", "recall", "f1")]
                    + [m.get("n")],
                )
            )
    ref = [(f"{who} — {PUBLISHED}", [vals.get(c) for c in cols]) for who, vals in PAPER_REPORT]
    policy = {
        str((r.get("metrics") or {}).get("clinical", {}).get("uncertain", "positive"))
        for r in res["runs"].values()
        if r.get("metrics")
    }
    return {
        "title": "Report generation (NLG: pycocoevalcap; CE: micro over the 14 CheXpert labels, uncertain = "
        + "/".join(sorted(policy or {"positive"}))
        + ")",
        "columns": ["run"] + cols,
        "rows": rows,
        "reference": ref,
    }


def ablation_table(res) -> dict:
    cols = ["MS-CXR-T avg", "BLEU-1", "ROUGE-L", "CE F1"] + [
        f"{name} {mode}" for name, _ in DRIFT_COLS for mode in ("g", "s")
    ]
    rows = []
    for run, r in res["runs"].items():
        m, x = r.get("metrics") or {}, r.get("mscxrt") or {}
        if not m and not x:
            continue
        greedy, sampled = _greedy_sampled(m)
        rows.append(
            (
                run,
                [
                    _num(x.get("average")),
                    _num((m.get("nlg") or {}).get("BLEU-1")),
                    _num((m.get("nlg") or {}).get("ROUGE-L")),
                    _num(((m.get("clinical") or {}).get("micro") or {}).get("f1")),
                ]
                + [_num(d.get(k)) for _, k in DRIFT_COLS for d in (greedy, sampled)],
            )
        )
    return {
        "title": "Ablation: base / SFT / SFT + pairwise DPO / APO (drift rates of each run's answers, labeler vs "
        "ground truth; g = greedy answers, s = sampled answers pooled, eval-report --num-samples; blank = not run)",
        "columns": ["run"] + cols,
        "rows": rows,
        "reference": [],
    }


def teachers_table(res) -> dict:
    cols = ["accuracy", "F1", "exact", *(name for name, _ in DRIFT_COLS), "words"]
    keys = ["accuracy", "f1", "exact", *(k for _, k in DRIFT_COLS), "mean_words"]
    rows = []
    drift = res.get("drift")
    if drift:
        for name in drift.get("sources", drift.get("per_teacher", {}).keys()):
            s = drift["per_teacher"][name]
            rows.append((name, [_num(s.get(k)) for k in keys]))
    for run, r in res["runs"].items():
        d = student_drift(r.get("metrics"))
        if d:
            rows.append((f"student: {run}", [_num(d.get(k)) for k in keys]))
    return {
        "title": "Teachers on their own trajectories (apo drift), and each student's answers",
        "columns": ["source"] + cols,
        "rows": rows,
        "reference": [],
        "digits": [3] * (len(cols) - 1) + [1],
    }


def signature_table(res) -> dict:
    """Per run, how often its answers (greedy / sampled) carry each teacher's signature wording (eval-report
    --signatures-from); the first row per teacher is the teachers' own rate on their training answers."""
    sigs = {run: (r.get("metrics") or {}).get("signature") for run, r in res["runs"].items()}
    sigs = {run: s for run, s in sigs.items() if isinstance(s, dict) and s.get("phrases")}
    teachers = []
    for s in sigs.values():
        teachers += [t for t, p in s["phrases"].items() if p and t not in teachers]
    rows = []
    if sigs:
        own = next(iter(sigs.values())).get("own") or {}
        rows.append(("teachers (own answers)", [_num(own.get(t)) for t in teachers for _ in (0, 1)]))
    for run, s in sigs.items():
        rows.append((run, [_num((s.get(mode) or {}).get(t)) for t in teachers for mode in ("greedy", "sampled")]))
    return {
        "title": "Teacher signature wording copied (share of answers with one of the teacher's mined phrases; "
        "g = greedy, s = sampled)",
        "columns": ["run"] + [f"{t} {m}" for t in teachers for m in ("g", "s")],
        "rows": rows if teachers else [],
        "reference": [],
    }


def all_tables(res) -> list[dict]:
    tables = (mscxrt_table(res), report_table(res), ablation_table(res), teachers_table(res), signature_table(res))
    return [t for t in tables if t["rows"]]


# ----------------------------------------------------------------------------- rendering


def _cell(v, published=False, digits=3) -> str:
    if v is None:
        return ""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return f"{v:.2f}" if published else f"{v:.{digits}f}"


def _cells(t, vals, published=False) -> list[str]:
    digits = t.get("digits") or [3] * len(vals)
    return [_cell(v, published, d) for v, d in zip(vals, digits)]


def to_markdown(t: dict) -> str:
    lines = [
        f"### {t['title']}",
        "",
        "| " + " | ".join(t["columns"]) + " |",
        "|---|" + "---:|" * (len(t["columns"]) - 1),
    ]
    lines += ["| " + " | ".join([name] + _cells(t, vals)) + " |" for name, vals in t["rows"]]
    lines += ["| *" + name + "* | " + " | ".join(_cells(t, vals, True)) + " |" for name, vals in t["reference"]]
    if t["reference"]:
        lines += [
            "",
            f"Rows marked *{PUBLISHED}* are the numbers the paper reports (arXiv 2510.04142), not measured "
            "here; blank = not published.",
        ]
    return "\n".join(lines) + "\n"


_TEX_ESCAPE = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "—": "---",
}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPE.get(ch, ch) for ch in str(s))


def to_latex(t: dict) -> str:
    n = len(t["columns"])
    out = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{tex_escape(t['title'])}}}",
        r"\begin{tabular}{l" + "r" * (n - 1) + "}",
        r"\toprule",
        " & ".join(tex_escape(c) for c in t["columns"]) + r" \\",
        r"\midrule",
    ]
    out += [" & ".join([tex_escape(name)] + _cells(t, vals)) + r" \\" for name, vals in t["rows"]]
    if t["reference"]:
        out.append(r"\midrule")
        out += [
            " & ".join([r"\textit{" + tex_escape(name) + "}"] + _cells(t, vals, True)) + r" \\"
            for name, vals in t["reference"]
        ]
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- training curves


def plot_curves(state_path, out_png, title: str) -> str | None:
    """Loss, reward margin and mean reward per teacher against the step, from a Trainer state's log_history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = [h for h in (_read_json(Path(state_path)).get("log_history") or []) if isinstance(h, dict) and "step" in h]
    series = {"loss": "loss", "reward margin": "rewards/margins"}
    teachers = sorted({k for h in hist for k in h if k.startswith("rewards/teacher/")})
    panels = [(name, [key]) for name, key in series.items() if any(key in h for h in hist)]
    if teachers:
        panels.append(("mean reward per teacher", teachers))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(h["step"], h[k]) for h in hist if isinstance(h.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k.split("/")[-1])
        ax.set_title(name)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return str(out_png)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument(
        "--results",
        required=True,
        help="results folder: <run>/metrics.json, <run>/mscxrt.json, <run>/trainer_state.json, "
        "drift/drift.json (see apo/evaluation/tables.py)",
    )
    parser.add_argument("--out", required=True, help="output folder: tables.md, tables.tex, curves_<run>.png")
    parser.add_argument(
        "--print",
        dest="show",
        default="MS-CXR-T",
        help="which table to print: the start of its title (MS-CXR-T, Report, Ablation, Teachers, Teacher signature) "
        "or 'all'",
    )


def run(args) -> int:
    res = read_results(args.results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = all_tables(res)
    head = "# Results\n\nMeasured from " + str(Path(args.results)) + ".\n\n"
    (out / "tables.md").write_text(head + "\n".join(to_markdown(t) for t in tables), encoding="utf-8")
    tex = "% apo tables: needs \\usepackage{booktabs}\n" + "\n".join(to_latex(t) for t in tables)
    (out / "tables.tex").write_text(tex, encoding="utf-8")
    pngs = []
    for run_name, r in res["runs"].items():
        if "trainer_state" in r:
            p = plot_curves(r["trainer_state"], out / f"curves_{run_name}.png", f"training: {run_name}")
            if p:
                pngs.append(p)
    show = getattr(args, "show", "MS-CXR-T")
    shown = tables if show == "all" else [t for t in tables if t["title"].lower().startswith(show.lower())][:1]
    for t in shown or tables[:1]:
        print(to_markdown(t))
    print(f"tables: wrote {out / 'tables.md'}, {out / 'tables.tex'}" + "".join(f", {Path(p).name}" for p in pngs))
    return 0
