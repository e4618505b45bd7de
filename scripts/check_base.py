"""Check that a model sees: finding F1, side accuracy and synthetic MS-CXR-T Top-1 on held-out images.

    .venv/bin/python scripts/check_base.py --model runs/cache/base-seed0 [--seed 1000] [--images 200] [--pairs 150]

Prints the scores as JSON and, with --targets, exits 1 unless the issue's targets hold (finding F1 >= 0.85, side
accuracy >= 0.90, MS-CXR-T average >= 0.60; chance is 0.33). Images come from a seed no pretraining run uses.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

TARGETS = {"finding_f1": 0.85, "side_accuracy": 0.90, "mscxrt_average": 0.60}
SCORING_VERSION = 4  # 2: descriptions also scored for the size words (grade_accuracy); 3: merge scores; 4: ask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--seed", type=int, default=1000, help="held-out images drawn from this seed")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument(
        "--merges", type=int, default=100, help="held-out merge cases (one image + 7 noisy descriptions); 0: none"
    )
    ap.add_argument("--asks", type=int, default=200, help="held-out ask cases (a question naming one finding); 0: none")
    ap.add_argument("--targets", action="store_true", help="exit 1 unless the seeing targets hold")
    ap.add_argument("--out", default=None, help="also write the scores to this JSON file")
    ap.add_argument(
        "--reuse", action="store_true", help="if --out already holds scores of these weights and settings, print them"
    )
    args = ap.parse_args()
    if min(args.images, args.pairs, args.merges, args.asks) < 0:
        ap.error("--images, --pairs, --merges and --asks must not be negative")
    from apo.world.pretrain import weights_digest

    key = {
        "scoring": SCORING_VERSION,  # scores of an older scoring are recomputed, not reused
        "weights_sha256": weights_digest(Path(args.model)),
        "adapter": args.adapter,
        "seed": args.seed,
        "images": args.images,
        "pairs": args.pairs,
        "merges": args.merges,
        "asks": args.asks,
    }
    previous = _read(args.out) if args.reuse and args.out else None
    if previous and previous.get("scored") == key:
        print(json.dumps(previous, indent=2))
        return _verdict(previous) if args.targets else 0

    from apo.model.generation import load_model
    from apo.world.seeing import evaluate

    model, processor = load_model(args.model, adapter=args.adapter, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        scores = evaluate(
            model,
            processor,
            tmp,
            seed=args.seed,
            n_images=args.images,
            n_pairs=args.pairs,
            n_merges=min(args.merges, args.images),
            n_asks=min(args.asks, args.images),
        )
    scores["scored"] = key
    text = json.dumps(scores, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return _verdict(scores) if args.targets else 0


def _verdict(scores: dict) -> int:
    missed = [f"{k} {scores[k]} < {v}" for k, v in TARGETS.items() if scores[k] is None or scores[k] < v]
    for m in missed:
        print(f"check_base: target missed: {m}", file=sys.stderr)
    return 1 if missed else 0


def _read(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
