"""Report generation evaluation (`apo eval-report`): predictions, NLG metrics, clinical efficacy, drift.

For each case the model answers the case's prompt (or --prompt) about its image(s). OUT/predictions.jsonl holds
{"case_id", "prediction", "reference"} (resumable, like consensus); OUT/metrics.json holds
  nlg       BLEU-1..4, METEOR, ROUGE-L, CIDEr (apo.evaluation.metrics.nlg_scores, pycocoevalcap definitions)
  clinical  CheXpert-label precision/recall/F1 of predictions against references
            (apo.evaluation.metrics.clinical_efficacy)
  drift     the errors the teachers drift into, measured on the student's answers as `apo drift` measures each
            teacher (apo.evaluation.drift.answer_stats): labeler F1 against the case's labels, hallucination,
            omission and refusal rates, side accuracy against meta["sides"]
  n         answers scored (cases with a reference).

Length: no limit by default; with --max-length a case whose prompt (image tokens included) + --max-new-tokens does
not fit stops the run naming it, or with --skip-bad is left out and listed in OUT/too_long.jsonl (never cut: a cut
question is another question).

References: `report` in the dataset rows (case.meta["report"]; the synthetic benchmark has it), or, for MIMIC-CXR,
--reports-dir pointing at the MIMIC-CXR report tree (files/pXX/p<subject>/s<study>.txt, case ids carrying
subject_id and study_id), from which the FINDINGS and IMPRESSION sections are taken.
"""

from __future__ import annotations

import re
from pathlib import Path

from apo.data import add_data_arguments, cases_from_args
from apo.errors import ApoError
from apo.evaluation import metrics as scoring  # looked up per call: tests skip METEOR by standing in for nlg_scores
from apo.evaluation.drift import answer_stats
from apo.io.jobs import run_resumable
from apo.io.mimic import mimic_report_path
from apo.io.resumable import write_json_atomic, write_jsonl_atomic
from apo.model import generation  # generation.generate looked up per call: tests stand in for it
from apo.model.chat import prompt_text
from apo.model.generation import add_model_arguments, estimate_length, model_from_args

# ---------------------------------------------------------------- references

_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{2,}):", re.M)


def parse_mimic_report(text: str) -> str | None:
    """FINDINGS + IMPRESSION of a MIMIC-CXR free-text report (whitespace normalised); None if it has neither."""
    heads = list(_SECTION.finditer(text))
    sections = {}
    for h, nxt in zip(heads, heads[1:] + [None]):
        body = " ".join(text[h.end() : nxt.start() if nxt else len(text)].split())
        if body:
            sections.setdefault(h.group(1).strip(), body)
    parts = [sections.get("FINDINGS"), sections.get("IMPRESSION")]
    return " ".join(p for p in parts if p) or None


def reference(case, reports_dir=None) -> str | None:
    if reports_dir is not None:
        sid, st = case.meta.get("subject_id"), case.meta.get("study_id")
        p = mimic_report_path(reports_dir, sid, st) if sid and st else None
        return parse_mimic_report(p.read_text(encoding="utf-8", errors="replace")) if p else None
    return case.meta.get("report")


# ---------------------------------------------------------------- drift-sensitive metrics


def drift_metrics(cases, predictions) -> dict:
    """The student's answers read like a teacher's by `apo.evaluation.drift.answer_stats` (one definition for the repo):
    labeler precision/recall/F1 against case.labels, hallucination/omission/hedge/refusal rates, side error rate
    against meta["sides"]; plus side_accuracy = 1 - side_error_rate."""
    d = answer_stats(cases, list(predictions))
    d["side_accuracy"] = None if d.get("side_error_rate") is None else 1 - d["side_error_rate"]
    return d


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder: predictions.jsonl, metrics.json")
    parser.add_argument("--limit", type=int, default=None, help="first N cases only")
    parser.add_argument("--prompt", default=None, help="ask this instead of each case's own prompt")
    parser.add_argument(
        "--reports-dir",
        default=None,
        help="MIMIC-CXR report tree (files/pXX/p<subject>/s<study>.txt): references from FINDINGS + "
        "IMPRESSION; default: the rows' `report` field",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="limit on prompt tokens (image tokens included) + --max-new-tokens; a longer case stops "
        "the run naming it, or with --skip-bad is left out of generation and scoring (listed in "
        "OUT/too_long.jsonl, counted in metrics.json). Default: no limit",
    )


def _fit(cases, processor, args):
    """-> (cases within --max-length, the others). Over-long cases stop the run unless --skip-bad."""
    if not args.max_length:
        return cases, []
    keep, too_long = [], []
    for c in cases:
        n = estimate_length(processor, c.images, prompt_text(processor, len(c.images), args.prompt or c.prompt))
        if n + args.max_new_tokens <= args.max_length:
            keep.append(c)
            continue
        reason = (
            f"prompt is {n} tokens; with --max-new-tokens {args.max_new_tokens} that exceeds --max-length "
            f"{args.max_length}"
        )
        if not args.skip_bad:
            raise ApoError(f"case {c.case_id}: {reason} (or pass --skip-bad to leave such cases out)")
        too_long.append({"case_id": c.case_id, "reason": reason})
    if too_long:
        write_jsonl_atomic(Path(args.out) / "too_long.jsonl", too_long)
        print(
            f"eval-report: left out {len(too_long)} case(s) over --max-length; listed in "
            f"{Path(args.out) / 'too_long.jsonl'}"
        )
    if not keep:
        raise ApoError(f"no case fits --max-length {args.max_length}")
    return keep, too_long


def run(args) -> int:
    out = Path(args.out)
    cases = cases_from_args(args, rejects_default=str(out / "rejects.jsonl"))
    cases = cases[: args.limit] if args.limit else cases
    if not cases:
        raise ApoError(f"{args.dataset}: no case to evaluate")
    refs = {c.case_id: reference(c, args.reports_dir) for c in cases}
    model, processor = model_from_args(args)
    cases, too_long = _fit(cases, processor, args)

    def process(chunk):
        answers = generation.generate(
            model,
            processor,
            [(c.images, args.prompt or c.prompt) for c in chunk],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            progress=False,
        )
        return [{"case_id": c.case_id, "prediction": a, "reference": refs[c.case_id]} for c, a in zip(chunk, answers)]

    records = run_resumable(
        out / "predictions.jsonl",
        cases,
        key=lambda c: c.case_id,
        process=process,
        chunk_size=args.batch_size * 4,
        desc="eval-report",
    )
    if records is None:  # not rank 0
        return 0
    scored = [c for c in cases if refs[c.case_id]]
    if not scored:
        raise ApoError("no case has a reference report (a `report` field in the rows, or --reports-dir)")
    hyps = [records[c.case_id]["prediction"] for c in scored]
    gts = [refs[c.case_id] for c in scored]
    metrics = {
        "n": len(scored),
        "no_reference": len(cases) - len(scored),
        "nlg": scoring.nlg_scores(gts, hyps),
        "clinical": scoring.clinical_efficacy(gts, hyps),
        "drift": drift_metrics(cases, [records[c.case_id]["prediction"] for c in cases]),
    }
    if too_long:
        metrics["too_long"] = len(too_long)
    write_json_atomic(out / "metrics.json", metrics)
    nlg = metrics["nlg"]
    print(
        f"eval-report: {len(scored)} answers scored"
        + (f" ({metrics['no_reference']} without a reference)" if metrics["no_reference"] else "")
    )
    print("  " + ", ".join(f"{k} {v:.4f}" for k, v in nlg.items() if isinstance(v, (int, float))))
    d = metrics["drift"]
    print(
        "  drift: "
        + ", ".join(
            f"{k} {d[k]:.3f}"
            for k in ("f1", "hallucination_rate", "omission_rate", "refusal_rate", "side_accuracy")
            if d.get(k) is not None
        )
    )
    print(f"  wrote {out / 'metrics.json'}")
    return 0
