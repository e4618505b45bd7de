"""Does a model see? Scores a model on images no pretraining or benchmark run drew, against their ground truth.

    describe  finding F1 and side accuracy of its descriptions (the labeler reads them, `apo.evaluation.labeler`)
    compare   Top-1 on MS-CXR-T-format pairs asked with `apo eval-mscxrt`'s prompt, per finding and averaged
    ask       a question naming one finding (apo.world.pretrain's ask task): is the yes/no right, and the side of a
              lateral finding that is there? Does the model read the question's words?
    merge     exact match (every finding and its side) of what it writes from one image and 7 noisy descriptions of it
              (apo.world.pretrain.noisy_description) in `apo consensus --strategy model`'s prompt, beside one noisy
              description's exact match and the labeler vote's (apo.consensus.vote): can it read N answers?

Image classes, not report labels: consolidation and pneumonia are drawn alike, so a mention of either, or of an
airspace opacity, counts as the one "airspace" class; Lung Opacity's other children are their own classes.
Side accuracy: over the true lateral findings an answer reports, the share whose stated side is the true one (a
reported finding with no side counts as wrong). Grade accuracy: over the true graded findings (effusion,
pneumothorax, cardiomegaly, edema) an answer reports with a size word, the share whose word is the true grade
(comparing two studies by their sizes needs it); grade_majority is what always naming the commonest grade scores.
Used by `scripts/check_base.py` and by the demo's summary.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from apo.constants import MSCXRT_CLASSES, MSCXRT_FINDINGS
from apo.evaluation.labeler import label, laterality
from apo.evaluation.mscxrt import PROMPT as MSCXRT_PROMPT
from apo.evaluation.mscxrt import finding_name, parse_progression
from apo.world.pretrain import DESCRIBE_PROMPTS, compare_pair, draw_masks
from apo.world.synth import _sample_truth
from apo.world.synth import images as draw
from apo.world.synth.reports import MENTIONS, severity_word, split_sentences

HELD_OUT = 0x7E57  # second key of every held-out stream; pretraining streams use (seed, task < 5, ...)
MERGE_K = 7  # descriptions per held-out merge case: as many as CXR-MAX's teachers
CLASSES = ("Pleural Effusion", "Cardiomegaly", "Pneumothorax", "Atelectasis", "Airspace", "Edema", "Support Devices")
AIRSPACE = ("Consolidation", "Pneumonia", "Lung Opacity")
LATERAL = ("Pleural Effusion", "Pneumothorax", "Atelectasis", "Airspace")
GRADED = ("Pleural Effusion", "Pneumothorax", "Cardiomegaly", "Edema")
# the base's size words and the grade each names (cardiomegaly and edema say mild / marked / severe)
GRADE_WORDS = {
    "small": "small",
    "mild": "small",
    "moderate": "moderate",
    "large": "large",
    "marked": "large",
    "severe": "large",
}
_GRADE = re.compile(r"\b(" + "|".join(GRADE_WORDS) + r")\b")


def _rng(seed, *key):
    from apo.world.pretrain import NS

    return np.random.default_rng([NS, HELD_OUT, int(seed), *[int(k) for k in key]])


def _classes(found: dict) -> dict:
    """{class: side or None} from labeler output (positives only) and laterality."""
    lab, sides = found["labels"], found["sides"]
    out = {}
    for c in CLASSES:
        members = AIRSPACE if c == "Airspace" else (c,)
        hits = [m for m in members if lab.get(m) == 1]
        if hits:
            out[c] = next((sides[m] for m in hits if m in sides), None)
    return out


def truth_classes(truth: dict) -> dict:
    out = {}
    for obs, f in truth.items():
        c = "Airspace" if obs in ("Consolidation", "Pneumonia") else obs
        out[c] = f.get("side") if c in LATERAL else None
    return out


def stated_grade(text: str, obs: str) -> str | None:
    """The grade (small / moderate / large) of the first size word in the first sentence naming `obs`, if any."""
    for sentence in split_sentences(text.lower()):
        if re.search(MENTIONS[obs], sentence) and not sentence.startswith("no "):
            word = _GRADE.search(sentence)
            return GRADE_WORDS[word.group(1)] if word else None
    return None


def score_descriptions(truths: list[dict], texts: list[str]) -> dict:
    tp = fp = fn = side_n = side_ok = 0
    graded = []  # (stated grade, true grade) of every true graded finding reported with a size word
    for truth, text in zip(truths, texts):
        want = truth_classes(truth)
        said = _classes({"labels": label(text), "sides": laterality(text)})
        tp += len(set(want) & set(said))
        fp += len(set(said) - set(want))
        fn += len(set(want) - set(said))
        for c in set(want) & set(said) & set(LATERAL):
            side_n += 1
            side_ok += said[c] == want[c]
        for obs in GRADED:
            stated = stated_grade(text, obs) if obs in truth and obs in said else None
            if stated:
                graded.append((stated, severity_word(float(truth[obs].get("severity", 0.5)))))
    return {
        "finding_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "side_accuracy": side_ok / side_n if side_n else None,
        "n_images": len(texts),
        "lateral_reported": side_n,
        "grade_accuracy": sum(s == t for s, t in graded) / len(graded) if graded else None,
        "graded_reported": len(graded),
        "grade_majority": max(Counter(t for _, t in graded).values()) / len(graded) if graded else None,
    }


def exact_match(truth: dict, text: str) -> bool:
    """Every finding of `truth` and nothing else, each lateral one on its true side."""
    return _classes({"labels": label(text), "sides": laterality(text)}) == truth_classes(truth)


def merge_cases(singles: list, seed: int, n: int) -> list[tuple]:
    """(image path, truth, MERGE_K noisy descriptions) for the first `n` held-out images."""
    from apo.world.pretrain import noisy_description

    return [
        (path, truth, [noisy_description(truth, _rng(seed, 5, i, k)) for k in range(MERGE_K)])
        for i, (path, truth) in enumerate(singles[:n])
    ]


def score_merges(cases: list[tuple], answers: list[str]) -> dict:
    from apo.consensus import vote

    exact = [exact_match(t, a) for (_, t, _), a in zip(cases, answers)]
    single = [np.mean([exact_match(t, d) for d in texts]) for _, t, texts in cases]
    voted = [exact_match(t, texts[vote(texts, label, laterality)[0]]) for _, t, texts in cases]
    return {
        "merge_exact": float(np.mean(exact)) if cases else None,
        "merge_single_exact": float(np.mean(single)) if cases else None,
        "merge_vote_exact": float(np.mean(voted)) if cases else None,
        "n_merges": len(cases),
    }


def ask_cases(singles: list, seed: int, n: int) -> list[tuple]:
    """(image path, truth, asked finding, question) for the first `n` held-out images."""
    from apo.world.pretrain import ASK_NAMES, ASK_PROMPTS, ask_pick

    out = []
    for i, (path, truth) in enumerate(singles[:n]):
        obs = ask_pick(truth, _rng(seed, 6, i))
        out.append((path, truth, obs, ASK_PROMPTS[i % len(ASK_PROMPTS)].format(name=ASK_NAMES[obs])))
    return out


def score_asks(cases: list[tuple], answers: list[str]) -> dict:
    """ask_accuracy: the answer's yes/no is the truth's; ask_side_accuracy: over asked lateral findings that are on
    the image and answered yes, the share whose side for that finding is the true one. An answer starting with the
    word "yes" or "no" is read by it; any other answer (another style, a whole description) by the labeler: yes when
    it reports the asked finding (for airspace opacity, consolidation, pneumonia or lung opacity) as present."""
    from apo.world.pretrain import AIRSPACE_OBS

    right = sides = side_ok = 0
    for (_, truth, obs, _), answer in zip(cases, answers):
        asked = AIRSPACE if obs in AIRSPACE_OBS else (obs,)
        there = any(o in truth for o in asked)
        first = re.match(r"\s*(yes|no)\b", answer, flags=re.IGNORECASE)
        said_yes = first.group(1).lower() == "yes" if first else any(label(answer).get(o) == 1 for o in asked)
        right += said_yes == there
        found = next((o for o in truth if o in asked), None)
        if there and said_yes and truth[found].get("side") in ("right", "left", "bilateral"):
            sides += 1
            stated = {v for o, v in laterality(answer).items() if o in asked}
            side_ok += stated == {truth[found]["side"]}
    return {
        "ask_accuracy": right / len(cases) if cases else None,
        "ask_side_accuracy": side_ok / sides if sides else None,
        "n_asks": len(cases),
    }


def held_out_set(folder, seed: int, n_images: int, n_pairs: int) -> tuple[list, list]:
    """Write held-out images under `folder`: ([(path, truth)], [(prev_path, cur_path, finding, class)])."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    masks = draw.usable_masks(draw_masks(), _rng(seed, 0))
    singles, pairs = [], []
    for i in range(n_images):
        truth = _sample_truth(_rng(seed, 1, i))
        anatomy = draw.make_anatomy(masks[(i * 7 + 3) % len(masks)], _rng(seed, 2, i))
        path = folder / f"image_{i:04d}.jpg"
        draw.save_jpeg(draw.render(anatomy, truth, _rng(seed, 3, i)), path)
        singles.append((str(path), truth))
    plan = [(f, c) for f in MSCXRT_FINDINGS for c in MSCXRT_CLASSES]
    for j in range(n_pairs):
        finding, cls = plan[j % len(plan)]
        (prev, cur), _ = compare_pair(_rng(seed, 4, j), masks, j * 11 + 5, finding, cls)
        paths = [folder / f"pair_{j:04d}_{k}.jpg" for k in ("previous", "current")]
        for p, im in zip(paths, (prev, cur)):
            draw.save_jpeg(im, p)
        pairs.append((str(paths[0]), str(paths[1]), finding, cls))
    return singles, pairs


def evaluate(
    model,
    processor,
    folder,
    seed: int = 1000,
    n_images: int = 200,
    n_pairs: int = 150,
    batch_size: int = 16,
    n_merges: int = 0,
    n_asks: int = 0,
) -> dict:
    """Describe, compare (and, with n_merges / n_asks <= n_images, merge and ask) scores of a loaded model on a fresh
    held-out set drawn under `folder`."""
    from apo.consensus import consensus_prompt
    from apo.model.generation import generate

    singles, pairs = held_out_set(folder, seed, n_images, n_pairs)
    texts = generate(
        model,
        processor,
        [([p], DESCRIBE_PROMPTS[0]) for p, _ in singles],
        max_new_tokens=64,
        batch_size=batch_size,
        desc="describe",
    )
    out = score_descriptions([t for _, t in singles], texts)
    answers = generate(
        model,
        processor,
        [([a, b], MSCXRT_PROMPT.format(finding=finding_name(f))) for a, b, f, _ in pairs],
        max_new_tokens=16,  # as apo eval-mscxrt
        batch_size=batch_size,
        desc="compare",
    )
    per = {f: [0, 0] for f in MSCXRT_FINDINGS}
    for (_, _, f, cls), ans in zip(pairs, answers):
        per[f][0] += parse_progression(ans) == cls
        per[f][1] += 1
    top1 = {f: ok / n for f, (ok, n) in per.items() if n}
    out["mscxrt_per_finding"] = top1
    out["mscxrt_average"] = float(np.mean(list(top1.values()))) if top1 else None
    out["n_pairs"] = len(pairs)
    if n_merges:
        merges = merge_cases(singles, seed, n_merges)
        answers = generate(
            model,
            processor,
            [([p], consensus_prompt(DESCRIBE_PROMPTS[0], texts)) for p, _, texts in merges],
            max_new_tokens=64,
            batch_size=batch_size,
            desc="merge",
        )
        out.update(score_merges(merges, answers))
    if n_asks:
        asks = ask_cases(singles, seed, n_asks)
        answers = generate(
            model, processor, [([p], q) for p, _, _, q in asks], max_new_tokens=32, batch_size=batch_size, desc="ask"
        )
        out.update(score_asks(asks, answers))
    out["examples"] = [{"truth": truth_classes(t), "description": d} for (_, t), d in zip(singles[:5], texts[:5])]
    return out
