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
  drift_rates  {"greedy": {...}, "sampled": {...} or null}: refusal, hedge, wrong_side, hallucination, omission
            (fractions, answer_stats' definitions; wrong_side = side_error_rate) of the greedy answers and of all
            sampled answers pooled (every sample of every case, --num-samples K > 0; null when K = 0)
  sampling  {"num_samples", "temperature", "seed"}
  signature with --signatures-from TRAIN_DATA: {"phrases": {teacher: [...]}, "own": {teacher: share of its own
            training answers with one of its phrases}, "greedy": {teacher: share of greedy answers with one},
            "sampled": {...} or null} (apo.evaluation.signatures: phrases mined from the teachers' answers);
            null without the flag.

Sampled answers (--num-samples K, --temperature T, --seed S): greedy decoding shows only the mode of what the
student learnt (a student that refuses 30 % of the time may never refuse greedily), so K answers per case are also
drawn at temperature T (plain temperature sampling: no top-k / top-p) into OUT/samples.jsonl, one record per case
{"case_id", "samples": [K texts], "seed", "temperature"}, resumable like predictions.jsonl. Sample k of a case is
drawn with its own generator seeded from (S, case id, k) (apo.model.generation.sample_seed / SeededSampler), so
it does not depend on batch size, batch composition, --limit, the number of processes, or on a resume: the same
command on a fresh folder gives byte-identical samples, and a resumed run draws the missing cases exactly as an
uninterrupted run would (up to the float rounding of batched logits, which greedy shares). A resume with another
K, T or S than the records already written stops with an error instead of mixing them. --backend vllm seeds each
request the same way, but its draws are vLLM's, not the hf backend's.

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

from apo.data import add_data_arguments, cases_from_args, load_cases
from apo.errors import ApoError
from apo.evaluation import metrics as scoring  # looked up per call: tests skip METEOR by standing in for nlg_scores
from apo.evaluation.drift import answer_stats
from apo.evaluation.signatures import copy_rates, mine
from apo.io.jobs import check_outputs, claim, fingerprint, finished_records, run_resumable
from apo.io.mimic import mimic_report_path
from apo.io.resumable import write_json_atomic, write_jsonl_atomic
from apo.model import generation  # generation.generate looked up per call: tests stand in for it
from apo.model.chat import prompt_text
from apo.model.generation import (
    add_model_arguments,
    add_overwrite_argument,
    estimate_length,
    model_from_args,
    model_identity,
    pixels_from_args,
)

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

# metrics.json "drift_rates" name -> apo.evaluation.drift.answer_stats key
DRIFT_RATES = {
    "refusal": "refusal_rate",
    "hedge": "hedge_rate",
    "wrong_side": "side_error_rate",
    "hallucination": "hallucination_rate",
    "omission": "omission_rate",
}


def drift_rates(cases, texts) -> dict:
    """{refusal, hedge, wrong_side, hallucination, omission} of `texts[i]` answering `cases[i]` (None = not
    measurable, e.g. no lateral finding for wrong_side)."""
    d = answer_stats(cases, list(texts))
    return {name: d[key] for name, key in DRIFT_RATES.items()}


def sampled_drift_rates(cases, samples: dict) -> dict:
    """drift_rates pooled over every sample of every case: `samples` {case_id: [texts]}."""
    pairs = [(c, t) for c in cases for t in samples.get(c.case_id, [])]
    return drift_rates([c for c, _ in pairs], [t for _, t in pairs])


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
    add_overwrite_argument(parser)
    g = parser.add_argument_group("sampled drift")
    g.add_argument(
        "--num-samples",
        type=int,
        default=0,
        help="also draw K sampled answers per case (OUT/samples.jsonl) and report drift rates over them; "
        "0 (default): greedy only",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --num-samples (> 0)")
    g.add_argument(
        "--seed", type=int, default=0, help="sampling seed: sample k of a case is seeded from (seed, case id, k)"
    )
    g.add_argument(
        "--signatures-from",
        default=None,
        help="teacher data (any format --dataset reads, e.g. cxrmax_train.jsonl): mine each teacher's signature "
        "phrases from it and report how often the answers copy them",
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


def _check_sample_settings(path: Path, args) -> None:
    """Stop if samples already on disk (OUT/samples.jsonl or its shard files) were drawn with other settings."""

    want = (args.num_samples, args.temperature, args.seed)
    for r in finished_records(path).values():
        have = (len(r.get("samples") or []), r.get("temperature"), r.get("seed"))
        if have != want:
            raise ApoError(
                f"{path}: case {r['case_id']} has {have[0]} samples at temperature {have[1]}, seed {have[2]}; this "
                f"run asks for {want[0]} at temperature {want[1]}, seed {want[2]} (use a fresh --out or delete "
                "samples.jsonl)"
            )


def _signature_metrics(args, greedy_texts, sample_texts) -> dict | None:
    if not args.signatures_from:
        return None
    teachers_data = load_cases(args.signatures_from, verify_images="none", check_images=False, allow_absolute=True)
    phrases = mine(teachers_data)
    if not phrases:
        raise ApoError(f"--signatures-from {args.signatures_from}: no teacher answers in it")
    own = {}
    for t in phrases:
        texts = [x.text for c in teachers_data for x in c.trajectories if x.teacher == t]
        own[t] = copy_rates(texts, {t: phrases[t]})[t]
    return {
        "source": str(args.signatures_from),
        "phrases": phrases,
        "own": own,
        "greedy": copy_rates(greedy_texts, phrases),
        "sampled": copy_rates(sample_texts, phrases) if sample_texts is not None else None,
    }


def run_identity(args, sampled=False) -> dict:
    """What decides predictions.jsonl (and samples.jsonl): OUT/<file>.identity.json; a rerun with another is refused."""
    ident = {
        "command": "eval-report",
        "dataset": fingerprint(args.dataset),
        "split": args.split,
        "image_root": str(Path(args.image_root).resolve()) if args.image_root else None,
        "prompt": args.prompt,
        "reports_dir": str(Path(args.reports_dir).resolve()) if args.reports_dir else None,
        **model_identity(args),
    }
    if sampled:
        ident.update(num_samples=args.num_samples, temperature=args.temperature, seed=args.seed)
    return ident


def run(args) -> int:
    out = Path(args.out)
    if args.num_samples < 0:
        raise ApoError("--num-samples must be 0 (greedy only) or more")
    if args.num_samples and not args.temperature > 0:
        raise ApoError("--temperature must be > 0 with --num-samples (greedy is the temperature-0 answer)")
    if args.signatures_from and not Path(args.signatures_from).exists():
        raise ApoError(f"--signatures-from {args.signatures_from}: not found")
    check_outputs(
        {"--out": out / "predictions.jsonl"},
        {"--dataset": args.dataset, "--signatures-from": args.signatures_from},
    )
    claim(out / "predictions.jsonl", run_identity(args), args.overwrite)  # before the model loads
    if args.num_samples:
        if not args.overwrite:
            _check_sample_settings(out / "samples.jsonl", args)
        claim(out / "samples.jsonl", run_identity(args, sampled=True), args.overwrite)
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
        identity=run_identity(args),
    )
    samples = None
    if args.num_samples:
        K = args.num_samples

        def draw(chunk):
            answers = generation.generate(
                model,
                processor,
                [(c.images, args.prompt or c.prompt) for c in chunk for _ in range(K)],
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                progress=False,
                greedy=False,
                temperature=args.temperature,
                seeds=[generation.sample_seed(args.seed, c.case_id, k) for c in chunk for k in range(K)],
            )
            return [
                {
                    "case_id": c.case_id,
                    "samples": answers[i * K : (i + 1) * K],
                    "seed": args.seed,
                    "temperature": args.temperature,
                }
                for i, c in enumerate(chunk)
            ]

        samples = run_resumable(
            out / "samples.jsonl",
            cases,
            key=lambda c: c.case_id,
            process=draw,
            chunk_size=args.batch_size * 4,
            desc=f"eval-report samples (K={K})",
            identity=run_identity(args, sampled=True),
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
        "pixel_budget": pixels_from_args(args),
    }
    greedy_texts = [records[c.case_id]["prediction"] for c in cases]
    sample_lists = {c.case_id: samples[c.case_id]["samples"] for c in cases} if samples is not None else None
    metrics["drift_rates"] = {
        "greedy": drift_rates(cases, greedy_texts),
        "sampled": sampled_drift_rates(cases, sample_lists) if sample_lists is not None else None,
    }
    metrics["sampling"] = {"num_samples": args.num_samples, "temperature": args.temperature, "seed": args.seed}
    metrics["signature"] = _signature_metrics(
        args, greedy_texts, [t for c in cases for t in sample_lists[c.case_id]] if sample_lists is not None else None
    )
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
    for mode, rates in metrics["drift_rates"].items():
        if rates is not None:
            print(f"  {mode} drift: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items() if v is not None))
    sig = metrics["signature"]
    if sig:
        for mode in ("greedy", "sampled"):
            if sig[mode]:
                print(
                    f"  {mode} signature copies: "
                    + ", ".join(f"{t} {v:.3f}" for t, v in sig[mode].items() if v is not None)
                )
    print(f"  wrote {out / 'metrics.json'}")
    return 0
