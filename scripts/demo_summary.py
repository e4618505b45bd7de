"""results/summary.json for the demo: the base's seeing scores, and per student (base, SFT, DPO, APO) finding F1, side
accuracy, distinct-answer share, MS-CXR-T average, and each drift's rate greedy and sampled.

    .venv/bin/python scripts/demo_summary.py --results results --seconds 512 [--consensus scores.json]
        [--apo-positive vote]

Rates are fractions. finding_f1 and side_accuracy come from `apo eval-report`'s metrics.json (labeler against the
case's labels and sides); distinct_answer_share = distinct greedy answers / cases answered. With --consensus, the
compare stage's strategies scored against the truth beside the best teacher (scripts/consensus_quality.py).
"""

import argparse
import json
import sys
from pathlib import Path

STUDENTS = ("base", "sft", "dpo", "apo")
DRIFTS = ("refusal", "hedge", "wrong_side", "hallucination", "omission")


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def student(folder: Path) -> dict | None:
    metrics = _read(folder / "metrics.json")
    if metrics is None:
        return None
    answers = [
        json.loads(line)["prediction"]
        for line in (folder / "predictions.jsonl").read_text("utf-8").splitlines()
        if line.strip()
    ]
    answers = [a for a in answers if a is not None]
    rates = metrics.get("drift_rates") or {}
    mscxrt = _read(folder / "mscxrt.json") or {}
    return {
        "finding_f1": metrics["drift"].get("f1"),
        "side_accuracy": metrics["drift"].get("side_accuracy"),
        "distinct_answer_share": len(set(answers)) / len(answers) if answers else None,
        "mscxrt_average": mscxrt.get("average"),
        "n_cases": len(answers),
        "greedy": {k: (rates.get("greedy") or {}).get(k) for k in DRIFTS},
        "sampled": {k: (rates.get("sampled") or {}).get(k) for k in DRIFTS},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument(
        "--consensus", default=None, help="consensus scores to include (scripts/consensus_quality.py's JSON)"
    )
    ap.add_argument(
        "--apo-positive",
        default=None,
        choices=["vote", "self-vote", "model"],
        help="the consensus strategy whose t+ APO and DPO learned from (recorded as apo_positive)",
    )
    args = ap.parse_args()
    results = Path(args.results)
    seeing = _read(results / "base_seeing.json") or {}
    summary = {
        "base_seeing": {
            k: seeing.get(k) for k in ("finding_f1", "side_accuracy", "mscxrt_average", "grade_accuracy", "n_images")
        },
        "students": {name: s for name in STUDENTS if (s := student(results / name)) is not None},
        "seconds": round(args.seconds),
    }
    if args.consensus:
        scores = _read(Path(args.consensus))
        if scores is None:
            ap.error(f"--consensus {args.consensus}: not a readable JSON file (scripts/consensus_quality.py writes it)")
        summary["consensus"] = scores
    if args.apo_positive:
        summary["apo_positive"] = args.apo_positive
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
