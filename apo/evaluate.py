"""Report generation evaluation (`apo eval-report`): predictions, NLG metrics, clinical efficacy, drift.

For each case the model answers the case's prompt (or --prompt) about its image(s). OUT/predictions.jsonl holds
{"case_id", "prediction", "reference"} (resumable, like consensus); OUT/metrics.json holds
  nlg       BLEU-1..4, METEOR, ROUGE-L, CIDEr (apo.metrics.nlg_scores, pycocoevalcap definitions)
  clinical  CheXpert-label precision/recall/F1 of predictions against references (apo.metrics.clinical_efficacy)
  drift     the errors the teachers drift into, measured on the student's answers with the labeler: F1 against the
            case's ground-truth labels, side accuracy against meta["sides"], hallucination, omission and refusal rates
  n         answers scored (cases with a reference).

References: `report` in the dataset rows (case.meta["report"]; the synthetic benchmark has it), or, for MIMIC-CXR,
--reports-dir pointing at the MIMIC-CXR report tree (files/pXX/p<subject>/s<study>.txt, case ids carrying
subject_id and study_id), from which the FINDINGS and IMPRESSION sections are taken.
"""

from __future__ import annotations

import re
from pathlib import Path

from apo.constants import OBSERVATIONS

# ---------------------------------------------------------------- references

_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{2,}):", re.M)


def parse_mimic_report(text: str) -> str | None:
    """FINDINGS + IMPRESSION of a MIMIC-CXR free-text report (whitespace normalised); None if it has neither."""
    heads = list(_SECTION.finditer(text))
    sections = {}
    for h, nxt in zip(heads, heads[1:] + [None]):
        body = " ".join(text[h.end():nxt.start() if nxt else len(text)].split())
        if body:
            sections.setdefault(h.group(1).strip(), body)
    parts = [sections.get("FINDINGS"), sections.get("IMPRESSION")]
    return " ".join(p for p in parts if p) or None


def mimic_report_path(reports_dir, subject_id, study_id) -> Path | None:
    subject, study = str(subject_id).lstrip("p"), str(study_id).lstrip("s")
    for base in (Path(reports_dir) / "files", Path(reports_dir)):
        p = base / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        if p.is_file():
            return p
    return None


def reference(case, reports_dir=None) -> str | None:
    if reports_dir is not None:
        sid, st = case.meta.get("subject_id"), case.meta.get("study_id")
        p = mimic_report_path(reports_dir, sid, st) if sid and st else None
        return parse_mimic_report(p.read_text(encoding="utf-8", errors="replace")) if p else None
    return case.meta.get("report")


# ---------------------------------------------------------------- drift-sensitive metrics

def drift_metrics(cases, predictions) -> dict:
    """Labeler-based error rates of the answers, against each case's ground truth (labels, sides) where present.
    hallucination: share of answers asserting (1) a finding the ground truth does not have (0 or unmentioned);
    omission: share of answers not mentioning as present or uncertain a finding the ground truth has (1);
    refusal: share of answers with nothing to label; side accuracy: over lateral findings both state."""
    from apo.labeler import label, laterality

    tp = fp = fn = 0
    halluc = omit = labelled = refused = side_ok = side_n = 0
    for case, pred in zip(cases, predictions):
        p = label(pred)
        refused += all(v is None for v in p.values())
        if case.labels:
            labelled += 1
            findings = [o for o in OBSERVATIONS if o != "No Finding"]
            gt_pos = {o for o in findings if case.labels.get(o) == 1}
            pr_pos = {o for o in findings if p.get(o) == 1}
            tp, fp, fn = tp + len(gt_pos & pr_pos), fp + len(pr_pos - gt_pos), fn + len(gt_pos - pr_pos)
            halluc += any(case.labels.get(o) in (0, None) for o in pr_pos)
            omit += any(p.get(o) not in (1, -1) for o in gt_pos)
        sides = case.meta.get("sides") or {}
        if sides:
            said = laterality(pred)
            for obs, side in sides.items():
                if obs in said:
                    side_n += 1
                    side_ok += said[obs] == side
    n = len(predictions)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"labeler_f1": _r(f1), "labeler_precision": _r(tp / (tp + fp) if tp + fp else None),
            "labeler_recall": _r(tp / (tp + fn) if tp + fn else None),
            "hallucination_rate": _r(halluc / labelled if labelled else None),
            "omission_rate": _r(omit / labelled if labelled else None),
            "refusal_rate": _r(refused / n if n else None),
            "side_accuracy": _r(side_ok / side_n if side_n else None), "side_n": side_n, "labelled_n": labelled}


def _r(x):
    return None if x is None else round(float(x), 6)


def _drift(cases, predictions) -> dict:
    """The drift helper's per-answer statistics when apo.drift offers them (one definition for the whole repo)."""
    try:
        from apo.drift import drift_stats
    except ImportError:
        return drift_metrics(cases, predictions)
    return drift_stats(cases, predictions)


# ---------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    from apo.data import add_data_arguments
    from apo.generation import add_model_arguments

    add_data_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder: predictions.jsonl, metrics.json")
    parser.add_argument("--limit", type=int, default=None, help="first N cases only")
    parser.add_argument("--prompt", default=None, help="ask this instead of each case's own prompt")
    parser.add_argument("--reports-dir", default=None,
                        help="MIMIC-CXR report tree (files/pXX/p<subject>/s<study>.txt): references from FINDINGS + "
                             "IMPRESSION; default: the rows' `report` field")


def run(args) -> int:
    from apo.data import cases_from_args
    from apo.errors import ApoError
    from apo.generation import generate, model_from_args, run_resumable
    from apo.metrics import clinical_efficacy, nlg_scores
    from apo.resumable import write_json_atomic

    out = Path(args.out)
    cases = cases_from_args(args, rejects_default=str(out / "rejects.jsonl"))
    cases = cases[:args.limit] if args.limit else cases
    if not cases:
        raise ApoError(f"{args.dataset}: no case to evaluate")
    refs = {c.case_id: reference(c, args.reports_dir) for c in cases}
    model, processor = model_from_args(args)

    def process(chunk):
        answers = generate(model, processor, [(c.images, args.prompt or c.prompt) for c in chunk],
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
        return [{"case_id": c.case_id, "prediction": a, "reference": refs[c.case_id]} for c, a in zip(chunk, answers)]

    records = run_resumable(out / "predictions.jsonl", cases, key=lambda c: c.case_id, process=process,
                            chunk_size=args.batch_size * 4, desc="eval-report")
    if records is None:  # not rank 0
        return 0
    scored = [c for c in cases if refs[c.case_id]]
    if not scored:
        raise ApoError("no case has a reference report (a `report` field in the rows, or --reports-dir)")
    hyps = [records[c.case_id]["prediction"] for c in scored]
    gts = [refs[c.case_id] for c in scored]
    metrics = {"n": len(scored), "no_reference": len(cases) - len(scored),
               "nlg": nlg_scores(gts, hyps), "clinical": clinical_efficacy(gts, hyps),
               "drift": _drift(cases, [records[c.case_id]["prediction"] for c in cases])}
    write_json_atomic(out / "metrics.json", metrics)
    nlg = metrics["nlg"]
    print(f"eval-report: {len(scored)} answers scored" + (f" ({metrics['no_reference']} without a reference)"
                                                          if metrics["no_reference"] else ""))
    print("  " + ", ".join(f"{k} {v:.4f}" for k, v in nlg.items() if isinstance(v, (int, float))))
    print(f"  drift: {metrics['drift']}")
    print(f"  wrote {out / 'metrics.json'}")
    return 0
