"""Score consensus strategies against the ground truth: is t+ closer to the truth than the best single teacher?

    .venv/bin/python scripts/consensus_quality.py --dataset runs/demo/data/cxrmax_train.jsonl \\
        --consensus vote=runs/demo/apo/consensus.jsonl self-vote=runs/demo/self-vote.jsonl --out results/consensus.json

Each --consensus is NAME=PATH, PATH what `apo consensus` wrote. Per strategy: exact (share of cases whose positive
findings and their sides are exactly the truth's; a refusal is not exact), exact_findings (sides aside), f1,
hallucination, omission, wrong_side, hedge, refusal (fractions, the definitions of `apo drift`), over the cases every
strategy answered; plus the best teacher's exact on those cases.
The demo passes the result to scripts/demo_summary.py (summary.json's "consensus").
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--consensus {item!r}: expected NAME=PATH (e.g. vote=runs/demo/apo/consensus.jsonl)")
        if name in out:
            raise ValueError(f"--consensus: {name!r} given twice")
        out[name] = path
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="the cases the consensus was built for (CXR-MAX JSONL)")
    ap.add_argument("--consensus", nargs="+", required=True, metavar="NAME=PATH")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    try:
        paths = parse_pairs(args.consensus)
    except ValueError as e:
        ap.error(str(e))

    from apo.consensus import load_consensus
    from apo.data import load_cases
    from apo.errors import ApoError
    from apo.evaluation.drift import consensus_quality
    from apo.io.resumable import write_json_atomic

    try:
        cases = load_cases(args.dataset, verify_images="none")
        strategies = {name: {k: r["text"] for k, r in load_consensus(p).items()} for name, p in paths.items()}
        scores = consensus_quality(cases, strategies)
        if not scores["n_cases"]:
            raise ApoError(f"{args.dataset}: no case is answered by every strategy ({', '.join(paths)})")
    except ApoError as e:
        print(f"consensus_quality: {e}", file=sys.stderr)
        return 2
    write_json_atomic(Path(args.out), scores)
    exact = ", ".join(f"{name} {scores[name]['exact']:.3f}" for name in paths)
    print(
        f"t+ exact (findings and sides) on {scores['n_cases']} cases: {exact}; best teacher {scores['best_teacher']} "
        f"{scores['best_teacher_exact']:.3f} (all scores: {args.out})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
