"""Is a finding's size in a model's vision features? A ridge read-out of the merged image tokens, held out.

    .venv/bin/python scripts/size_readout.py --model runs/cache/base-seed0

Draws held-out describe and compare examples (seed 1001 of the base's own data streams, which no pretraining run
with a seed below 1000 uses), runs the vision tower alone, and fits, per finding with a size (pleural effusion,
pneumothorax), a ridge regression from the image tokens to the drawn extent on one half of the images; prints the
other half's R² and how often the fitted extent falls in the true grade (small / moderate / large, the base's size
words) beside always naming the commonest grade. Flattened tokens keep position; mean-pooled ones do not. A
diagnostic for docs/seeing_base.md, not a test: a base that cannot encode size cannot compare two studies by it.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZED = ("Pleural Effusion", "Pneumothorax")


def readout(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[float, np.ndarray]:
    """Fit on the first half, predict the second: (R², predictions)."""
    h = len(y) // 2
    a = np.c_[x[:h], np.ones(h)]
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y[:h])
    p = np.c_[x[h:], np.ones(len(y) - h)] @ w
    r2 = 1 - ((p - y[h:]) ** 2).sum() / ((y[h:] - y[h:].mean()) ** 2).sum()
    return float(r2), p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seed", type=int, default=1001)
    ap.add_argument("--describe", type=int, default=1200, help="held-out one-image examples")
    ap.add_argument("--compare", type=int, default=300, help="held-out pairs (two images each)")
    ap.add_argument("--ridge", type=float, default=1.0)
    args = ap.parse_args()

    import torch

    from apo.model.generation import load_model
    from apo.world import pretrain
    from apo.world.synth.reports import severity_word

    model, processor = load_model(args.model, device="cpu", dtype="float32")
    tok = processor.tokenizer
    examples = pretrain.make_examples(args.seed, args.describe, args.compare, workers=1, progress=False)
    pretrain._encode(processor, examples, 1 + len(tok.encode("assistant\n", add_special_tokens=False)))
    flat, pooled, extent, finding = [], [], [], []
    with torch.no_grad():
        for ex in examples:
            tokens = model.model.visual(ex["pixel_values"], grid_thw=ex["grid"]).pooler_output
            n = tokens.shape[0] // len(ex["image_truths"])
            for k, truth in enumerate(ex["image_truths"]):
                for obs in SIZED:
                    if obs in truth:
                        t = tokens[k * n : (k + 1) * n]
                        flat.append(t.reshape(-1).numpy())
                        pooled.append(t.mean(0).numpy())
                        extent.append(float(truth[obs]["severity"]))
                        finding.append(obs)
    finding, extent, flat, pooled = map(np.array, (finding, extent, flat, pooled))
    out = {"model": args.model, "seed": args.seed, "ridge": args.ridge, "findings": {}}
    for obs in SIZED:
        m = finding == obs
        y = extent[m]
        truth_grades = [severity_word(v) for v in y[len(y) // 2 :]]
        row = {
            "images": int(m.sum()),
            "commonest_grade": round(max(map(truth_grades.count, set(truth_grades))) / len(truth_grades), 3),
        }
        for name, x in (("flat", flat[m]), ("mean_pooled", pooled[m])):
            r2, pred = readout(x, y, args.ridge)
            row[f"r2_{name}"] = round(r2, 3)
            row[f"grade_accuracy_{name}"] = round(
                float(np.mean([severity_word(p) == g for p, g in zip(pred, truth_grades)])), 3
            )
        out["findings"][obs] = row
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
