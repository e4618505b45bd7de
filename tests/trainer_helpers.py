"""Small APO groups for the trainer tests: a few noise images and groups.jsonl in the build-pairs format."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

POSITIVE = "the heart size is normal. there is a small left pleural effusion. no pneumothorax."
NEGATIVES = [
    ("GPT-5-nano", "there is a small right pleural effusion."),
    ("Claude-Sonnet-4", "the lungs are clear. no effusion. edema and consolidation support the diagnosis."),
    ("Grok-4", "bilateral atelectasis, right effusion, findings support diagnosis of edema."),
]


def make_images(directory, n=2, seed=0, size=(112, 112)) -> list[str]:
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = directory / f"img{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p.resolve()))
    return paths


def make_groups(directory, n_groups=4, n_negatives=(3, 1, 2, 3), seed=0) -> Path:
    """groups.jsonl with varying group sizes; one image per case, the same prompt style as the pipeline."""
    directory = Path(directory)
    images = make_images(directory / "images", n=n_groups, seed=seed)
    path = directory / "groups.jsonl"
    with open(path, "w") as fh:
        for i in range(n_groups):
            negs = NEGATIVES[: n_negatives[i % len(n_negatives)]]
            fh.write(
                json.dumps(
                    {
                        "case_id": f"c{i}",
                        "prompt": "what findings support the diagnosis of effusion?",
                        "images": [images[i]],
                        "positive": POSITIVE,
                        "negatives": [t for _, t in negs],
                        "teachers": [n for n, _ in negs],
                    }
                )
                + "\n"
            )
    return path
