"""Stage 3 data: preference groups {t+, teacher negatives} (`apo build-pairs`).

One group per case: {"case_id", "prompt", "images" (absolute), "positive": t+, "negatives": [tau^u...], "teachers":
[u...] aligned with negatives}. Negatives are the teachers' own trajectories ("conflicting teacher negatives"), minus
what cannot be a negative: empty ones, duplicates (after whitespace normalisation), those equal to t+, and the vote's
source teacher (t+ *is* that trajectory). `--negatives conflicting` keeps only those whose labeler labels disagree
with t+'s on at least one observation. Nothing is lost silently: every dropped case and negative is counted and
listed with its reason in `<out>.dropped.jsonl`.

`--dpo-out` writes the pairwise rows of the published recipe (ms-swift DPO format), one per (t+, negative):
{"messages": [{"role": "user", "content": "<image>"*n + prompt}, {"role": "assistant", "content": t+}],
 "images": [...], "rejected_response": negative}.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from apo.consensus import load_consensus
from apo.constants import OBSERVATIONS
from apo.data import add_data_arguments, cases_from_args
from apo.errors import ApoError
from apo.evaluation import labeler
from apo.io.jobs import check_outputs
from apo.io.resumable import write_json_atomic, write_jsonl_atomic
from apo.model.chat import swift_user_content

NEGATIVE_MODES = ("all", "conflicting")


def normalise(text: str) -> str:
    return " ".join(text.split())


def conflicts(labels_a: dict, labels_b: dict) -> bool:
    return any(labels_a.get(o) != labels_b.get(o) for o in OBSERVATIONS)


def build_groups(cases, consensus: dict, negatives: str = "all", max_negatives: int | None = None, label=None):
    """-> (groups, dropped). `consensus`: {case_id: consensus record}. `dropped` lists every case that produced no
    group ({"case_id", "what": "case", "reason"}) and every trajectory that did not become a negative
    ({"case_id", "what": "negative", "teacher", "reason"}). Negatives keep teacher order; max_negatives keeps the
    first K that survive."""
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
    if negatives == "conflicting" and label is None:
        label = labeler.label
    groups, dropped = [], []
    for case in cases:
        rec = consensus.get(case.case_id)
        if rec is None:
            dropped.append({"case_id": case.case_id, "what": "case", "reason": "no_consensus"})
            continue
        positive = rec.get("text") or ""
        if not positive.strip():
            dropped.append({"case_id": case.case_id, "what": "case", "reason": "empty_positive"})
            continue
        pos_key = normalise(positive)
        pos_labels = label(positive) if negatives == "conflicting" else None
        source = rec.get("source_teacher")
        kept, teachers, seen = [], [], set()
        for t in case.trajectories:
            key = normalise(t.text)
            if not key:
                reason = "empty"
            elif source is not None and t.teacher == source:
                reason = "source_teacher"
            elif key == pos_key:
                reason = "equals_positive"
            elif key in seen:
                reason = "duplicate"
            elif pos_labels is not None and not conflicts(label(t.text), pos_labels):
                reason = "not_conflicting"
            elif max_negatives is not None and len(kept) >= max_negatives:
                reason = "over_max_negatives"
            else:
                reason = None
            seen.add(key)
            if reason:
                dropped.append({"case_id": case.case_id, "what": "negative", "teacher": t.teacher, "reason": reason})
                continue
            kept.append(t.text)
            teachers.append(t.teacher)
        if not kept:
            dropped.append({"case_id": case.case_id, "what": "case", "reason": "no_negatives"})
            continue
        groups.append(
            {
                "case_id": case.case_id,
                "prompt": case.prompt,
                "images": list(case.images),
                "positive": positive,
                "negatives": kept,
                "teachers": teachers,
            }
        )
    return groups, dropped


def dpo_rows(groups) -> list[dict]:
    """ms-swift DPO rows: one per (positive, negative)."""
    return [
        {
            "messages": [
                {"role": "user", "content": swift_user_content(len(g["images"]), g["prompt"])},
                {"role": "assistant", "content": g["positive"]},
            ],
            "images": list(g["images"]),
            "rejected_response": neg,
        }
        for g in groups
        for neg in g["negatives"]
    ]


def statistics(groups, dropped, n_cases, extra_consensus=0) -> dict:
    sizes = [len(g["negatives"]) for g in groups]
    return {
        "cases": n_cases,
        "groups": len(groups),
        "mean_negatives": round(sum(sizes) / len(sizes), 3) if sizes else 0.0,
        "negatives": sum(sizes),
        "negatives_per_group": dict(sorted(Counter(sizes).items())),
        "dropped_cases": dict(Counter(d["reason"] for d in dropped if d["what"] == "case")),
        "dropped_negatives": dict(Counter(d["reason"] for d in dropped if d["what"] == "negative")),
        "teachers": dict(Counter(t for g in groups for t in g["teachers"])),
        "consensus_not_in_dataset": extra_consensus,
    }


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--consensus", required=True, help="output of `apo consensus`")
    parser.add_argument("--out", required=True, help="groups JSONL (one group per case)")
    parser.add_argument(
        "--negatives",
        choices=NEGATIVE_MODES,
        default="all",
        help="all teacher trajectories, or only those whose labels conflict with t+",
    )
    parser.add_argument("--max-negatives", type=int, default=None, help="keep at most K negatives per group")
    parser.add_argument("--dpo-out", default=None, help="also write ms-swift DPO rows (one per positive/negative)")


def run(args) -> int:
    if args.max_negatives is not None and args.max_negatives < 1:
        raise ApoError("--max-negatives must be at least 1")
    check_outputs(
        {"--out": args.out, "--dpo-out": args.dpo_out},
        {"--dataset": args.dataset, "--consensus": args.consensus},
    )
    if args.dpo_out and Path(args.dpo_out).resolve() == Path(args.out).resolve():
        raise ApoError(f"--dpo-out {args.dpo_out}: is also --out")
    cases = cases_from_args(args, rejects_default=f"{args.out}.rejects.jsonl")
    consensus = load_consensus(args.consensus, args.skip_bad, f"{args.out}.consensus_rejects.jsonl")
    known = {c.case_id for c in cases}
    extra = sum(k not in known for k in consensus)
    groups, dropped = build_groups(cases, consensus, args.negatives, args.max_negatives)
    stats = statistics(groups, dropped, len(cases), extra)
    write_jsonl_atomic(args.out, groups)
    dropped_path = Path(f"{args.out}.dropped.jsonl")
    write_jsonl_atomic(dropped_path, dropped)
    write_json_atomic(f"{args.out}.stats.json", stats)
    if args.dpo_out:
        rows = dpo_rows(groups)
        write_jsonl_atomic(args.dpo_out, rows)
        print(f"wrote {len(rows)} DPO rows to {args.dpo_out}")
    print(
        f"build-pairs: {stats['groups']} groups from {stats['cases']} cases, mean {stats['mean_negatives']} "
        f"negatives (N distribution {stats['negatives_per_group']})"
    )
    if stats["dropped_cases"]:
        print(f"  cases dropped: {stats['dropped_cases']}")
    if stats["dropped_negatives"]:
        print(f"  negatives dropped: {stats['dropped_negatives']}")
    if extra:
        print(f"  {extra} consensus record(s) name cases not in this dataset (ignored)")
    print(f"  wrote {args.out}; reasons in {dropped_path}; statistics in {args.out}.stats.json")
    if not groups:
        raise ApoError("no preference group could be built; see " + str(dropped_path))
    return 0
