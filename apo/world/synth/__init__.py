"""`apo synth`: a synthetic benchmark in CXR-MAX's format, deterministic by seed.

    OUT/cxrmax_train.jsonl, OUT/cxrmax_test.jsonl   one row per teacher answer (7 per case), split by case
    OUT/files/pXX/pSSSSSSSS/sTTTTTTTT/<dicom_id>.jpg MIMIC-CXR-JPG layout
    OUT/mscxrt/MS_CXR_T_temporal_image_classification_v1.0.0.csv   previous/current pairs, improving/stable/worsening
    OUT/teachers.json, OUT/DATA_CARD.md              drift profiles (set and measured), counts, licences

Each case: a ground-truth set of findings with sides and severities (`_sample_truth`), an image drawn around a real lung
mask (`images`), a ground-truth report from real IU report sentences (`reports`), a CXR-MAX-style question that names
the diagnosis and asks for its imaging basis, and seven teacher trajectories with their drift (`teachers`).
Every random choice comes from a generator seeded by (seed, stream, case), so a case does not depend on how many
others are generated and two runs with the same seed write byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np

from apo.constants import MSCXRT_CLASSES, MSCXRT_FINDINGS, OBSERVATIONS, TEACHERS
from apo.errors import ApoError
from apo.world.synth import images
from apo.world.synth import teachers as T
from apo.world.synth.reports import OPACITY_CHILDREN, build_report, device_side, sentence_bank, tag
from apo.world.synth.teachers import RATES, join

log = logging.getLogger(__name__)

MSCXRT_CSV = "mscxrt/MS_CXR_T_temporal_image_classification_v1.0.0.csv"
MSCXRT_COLUMNS = (
    "dicom_id",
    "previous_dicom_id",
    "study_id",
    "previous_study_id",
    "subject_id",
    *(f"{f}_progression" for f in MSCXRT_FINDINGS),
    *(f"{f}_label_quality" for f in MSCXRT_FINDINGS),
)
# MS-CXR-T's `<finding>_label_quality`: how many radiologists rated the pair and whether they agreed. Drawn for the
# rated finding of each synthetic pair with these fixed probabilities (a stream of its own, S_QUALITY: the other
# columns, the images and every other file are the same bytes as without it). The demo's labels are exact whatever
# the quality; the column lets `apo eval-mscxrt --label-quality` and `by_label_quality` run on it.
MSCXRT_LABEL_QUALITY = {"one_expert": 0.6, "multiple_experts": 0.3, "disagreement": 0.1}
MSCXRT_OBS = {
    "consolidation": "Consolidation",
    "edema": "Edema",
    "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
}
# How often each finding appears in an abnormal case (relative weights) and how its side is drawn.
FINDING_WEIGHTS = {
    "Pleural Effusion": 0.32,
    "Cardiomegaly": 0.26,
    "Atelectasis": 0.2,
    "Pneumothorax": 0.14,
    "Consolidation": 0.12,
    "Pneumonia": 0.12,
    "Edema": 0.1,
}
SIDE_WEIGHTS = {
    "Pleural Effusion": (0.4, 0.3, 0.3),
    "Pneumothorax": (0.5, 0.45, 0.05),
    "Atelectasis": (0.35, 0.35, 0.3),
    "Consolidation": (0.55, 0.45, 0.0),
    "Pneumonia": (0.55, 0.45, 0.0),
}
P_NORMAL = 0.25
MAX_MASKS = 96  # distinct lung shapes per run; decoding the 2000-px PNG masks is the slow part
QUESTIONS = (
    "What findings on this chest X-ray support the {what}?",
    "Which imaging findings on this chest radiograph support the {what}?",
    "Describe the radiographic evidence on this chest X-ray that supports the {what}.",
)
# Generator streams: (seed, stream, index) -> independent, order-free randomness.
S_TRUTH, S_ANATOMY, S_STUDY, S_REPORT, S_TEACHER, S_IDS, S_PAIR, S_QUALITY, S_PAD = range(9)
# Label-free reasoning sentences that lengthen a trajectory to CXR-MAX's few hundred words (`--answer-words`);
# tests/test_real_shapes.py checks that the labeler reads nothing in them.
REASONING = (
    "I start by checking the technical quality of the study, the projection and the degree of inspiration.",
    "The image is read systematically, region by region, from the top of the film to the bottom.",
    "Both sides are compared with each other before any conclusion is drawn.",
    "Each observation is weighed against the question that was asked about this image.",
    "The position of the patient and any rotation are taken into account when judging sizes and contours.",
    "I look again at the areas that are easy to overlook, behind the heart and at the bases.",
    "The reasoning so far is summarised before the final answer is given.",
    "Step by step, every structure on the frontal view is considered in turn.",
)


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# ----------------------------------------------------------------------------------------------------------------
# Identifiers shaped like MIMIC-CXR's


class _Ids:
    def __init__(self, seed):
        self.rng, self.seen = _rng(seed, S_IDS), set()

    def _unique(self, lo, hi):
        while True:
            v = int(self.rng.integers(lo, hi))
            if v not in self.seen:
                self.seen.add(v)
                return v

    def subject(self) -> int:
        return self._unique(10_000_000, 20_000_000)

    def study(self) -> int:
        return self._unique(50_000_000, 60_000_000)

    def dicom(self) -> str:
        return "-".join(f"{int(self.rng.integers(0, 2**32)):08x}" for _ in range(5))


def image_path(subject: int, study: int, dicom: str) -> str:
    s = str(subject)
    return f"files/p{s[:2]}/p{s}/s{study}/{dicom}.jpg"


# ----------------------------------------------------------------------------------------------------------------
# One case


def _sample_truth(rng) -> dict:
    """{obs: {side, severity, zone, seed[, device, text]}} for the positive findings of one case."""
    truth = {}
    if rng.random() >= P_NORMAL:
        k = 1 + int(rng.random() < 0.45) + int(rng.random() < 0.15)
        names = list(FINDING_WEIGHTS)
        w = np.array([FINDING_WEIGHTS[n] for n in names])
        for obs in rng.choice(names, size=k, replace=False, p=w / w.sum()):
            obs = str(obs)
            if obs in ("Consolidation", "Pneumonia") and ("Consolidation" in truth or "Pneumonia" in truth):
                continue  # one kind of airspace opacity per case
            f = {"severity": round(float(rng.uniform(0.3, 1.0)), 3), "seed": int(rng.integers(2**31))}
            if obs in SIDE_WEIGHTS:
                f["side"] = ("right", "left", "bilateral")[int(rng.choice(3, p=SIDE_WEIGHTS[obs]))]
            if obs in ("Consolidation", "Pneumonia"):
                f["zone"] = ("lower", "upper", "mid")[int(rng.choice(3, p=(0.5, 0.3, 0.2)))]
            truth[obs] = f
    if rng.random() < (0.22 if truth else 0.12):
        devices = sentence_bank()["pos:Support Devices"]
        s = devices[int(rng.integers(len(devices)))]
        truth["Support Devices"] = {"device": s.device, "side": device_side(s.text, s.device), "text": s.text}
    return {o: truth[o] for o in OBSERVATIONS if o in truth}  # fixed order


def question_for(truth: dict, rng) -> str:
    dx = [{"Edema": "pulmonary edema"}.get(o, o.lower()) for o in truth if o != "Support Devices"]
    what = f"diagnosis of {join(dx)}" if dx else "impression of no acute cardiopulmonary abnormality"
    return QUESTIONS[int(rng.integers(len(QUESTIONS)))].format(what=what)


def _report_and_labels(truth: dict, rng) -> tuple[str, dict, dict]:
    """A report whose tagged content agrees with the truth, and the CheXpert labels it implies."""
    want = set(truth)
    for _ in range(20):
        report, stats = build_report(truth, rng)
        t = tag(report)
        pos = {o for o, v in t.items() if v["label"] == 1} - {"Lung Opacity", "No Finding"}
        if pos == want and not any(v["label"] == -1 for v in t.values()):
            break
    else:  # pragma: no cover - never seen with the shipped corpus; fail loudly rather than write a wrong label
        raise RuntimeError(f"no consistent report for {sorted(want)}")
    labels = {o: (0 if t.get(o, {}).get("label") == 0 else None) for o in OBSERVATIONS}
    for o in truth:
        labels[o] = 1
    if want & set(OPACITY_CHILDREN):
        labels["Lung Opacity"] = 1
    if not want - {"Support Devices"}:
        labels["No Finding"] = 1
    return report, labels, stats


# ----------------------------------------------------------------------------------------------------------------


def _prepare(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not an earlier synth output; clear our own outputs."""
    if out.exists() and any(out.iterdir()):
        if not (out / "teachers.json").is_file():
            raise ApoError(
                f"{out} is not empty and holds no earlier `apo synth` output (teachers.json); "
                "choose an empty or new folder"
            )
        for name in ("files", "mscxrt"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("cxrmax_train.jsonl", "cxrmax_test.jsonl", "teachers.json", "DATA_CARD.md"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate(
    out_dir,
    cases: int = 200,
    seed: int = 0,
    test_fraction: float = 0.2,
    temporal_pairs: int | None = None,
    teachers: dict | None = None,
    image_size: tuple[int, int] | None = None,
    answer_words: int | None = None,
) -> dict:
    """Write the synthetic CXR-MAX-format benchmark to `out_dir`; returns a summary (counts, measured drift).

    image_size: (width, height) of the saved images (default 224 x 224): rendered at 224 and upscaled, e.g.
    (2544, 3056) for MIMIC-CXR-JPG's size. answer_words: lengthen every trajectory that has fewer words with
    label-free reasoning sentences (REASONING) to about this many (CXR-MAX: a few hundred). Defaults leave the
    output byte-identical to earlier versions.
    temporal_pairs: MS-CXR-T pairs (default: 15 * ceil(cases / 60), at least 15 = one per finding and class).
    teachers: per-teacher overrides of the drift rates, e.g. {"Grok-4": {"hallucinate": 0.8}}.
    """
    if cases < 1:
        raise ApoError("--cases must be at least 1")
    if not 0 <= test_fraction < 1:
        raise ApoError("--test-fraction must be in [0, 1)")
    unknown = set(teachers or {}) - set(TEACHERS)
    if unknown:
        raise ApoError(f"unknown teacher(s) {sorted(unknown)}; known: {list(TEACHERS)}")
    pairs = temporal_pairs if temporal_pairs is not None else 15 * max(1, math.ceil(cases / 60))
    out = Path(out_dir)
    _prepare(out)
    profiles = T.profiles(teachers)
    ids = _Ids(seed)
    masks = images.usable_masks(min(cases + pairs, MAX_MASKS), _rng(seed, S_ANATOMY))
    n_test = int(round(cases * test_fraction))
    test_idx = set(int(i) for i in _rng(seed, S_IDS, 1).permutation(cases)[:n_test])

    rows = {"train": [], "test": []}
    measured_input, sentence_stats = [], {"mined": 0, "template": 0}
    for i in range(cases):
        truth = _sample_truth(_rng(seed, S_TRUTH, i))
        subject, study, dicom = ids.subject(), ids.study(), ids.dicom()
        rel = image_path(subject, study, dicom)
        anatomy = images.make_anatomy(masks[i % len(masks)], _rng(seed, S_ANATOMY, i))
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        images.save_jpeg(images.resize(images.render(anatomy, truth, _rng(seed, S_STUDY, i)), image_size), out / rel)
        r = _rng(seed, S_REPORT, i)
        report, labels, stats = _report_and_labels(truth, r)
        for k in stats:
            sentence_stats[k] += stats[k]
        question = question_for(truth, r)
        sides = {o: f["side"] for o, f in truth.items() if "side" in f and o != "Support Devices"}
        answers = {}
        for t, name in enumerate(TEACHERS):
            answers[name], _ = T.answer(name, truth, profiles[name], _rng(seed, S_TEACHER, i, t))
            if answer_words:
                answers[name] = lengthen(answers[name], answer_words, _rng(seed, S_PAD, i, t))
        split = "test" if i in test_idx else "train"
        for name in TEACHERS:
            rows[split].append(
                {
                    "case_id": f"synth-{i:05d}",
                    "subject_id": str(subject),
                    "study_id": str(study),
                    "dicom_id": dicom,
                    "image": rel,
                    "question": question,
                    "model": name,
                    "response": answers[name],
                    "labels": labels,
                    "sides": sides,
                    "report": report,
                }
            )
        measured_input.append({"truth": truth, "answers": answers, "labels": labels})
    for split, rs in rows.items():
        with open(out / f"cxrmax_{split}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for row in rs:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    pair_counts = _write_mscxrt(out, pairs, seed, ids, masks, cases, image_size)
    measured = T.measure(measured_input)
    summary = {
        "out_dir": str(out),
        "seed": seed,
        "cases": cases,
        "train_cases": cases - n_test,
        "test_cases": n_test,
        "rows": {k: len(v) for k, v in rows.items()},
        "temporal_pairs": pairs,
        "mscxrt_counts": pair_counts,
        "report_sentences": sentence_stats,
        "measured": measured,
        "label_counts": _label_counts(measured_input),
    }
    (out / "teachers.json").write_text(
        json.dumps(
            {
                "teachers": {
                    n: {k: p[k] for k in ("drift", "style", "negatives", *T.RATES)} for n, p in profiles.items()
                },
                "measured": measured,
                "notes": "Rates are probabilities per finding (omit, omit_minor, wrong_side, hedge), per answer "
                "(hallucinate, refuse), or per sentence of the answer (late_add_per_sentence). `measured` re-derives "
                "them from the generated texts with apo.world.synth.reports.tag; see DATA_CARD.md.",
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (out / "DATA_CARD.md").write_text(_data_card(summary, profiles, test_fraction), encoding="utf-8")
    log.info(
        "wrote %d cases (%d train / %d test rows), %d MS-CXR-T pairs to %s",
        cases,
        len(rows["train"]),
        len(rows["test"]),
        pairs,
        out,
    )
    return summary


def _write_mscxrt(out: Path, n: int, seed: int, ids: _Ids, masks: list, offset: int, image_size=None) -> dict:
    """Balanced previous/current pairs: each finding x class equally often, the extent rendered smaller/equal/larger."""
    plan = [(f, c) for f in MSCXRT_FINDINGS for c in MSCXRT_CLASSES]
    plan = (plan * math.ceil(n / len(plan)))[:n]
    order = _rng(seed, S_PAIR).permutation(n)
    rows, counts = [], {f: {c: 0 for c in MSCXRT_CLASSES} for f in MSCXRT_FINDINGS}
    for j in order:
        finding, cls = plan[j]
        r = _rng(seed, S_PAIR, 1, int(j))
        obs = MSCXRT_OBS[finding]
        if cls == "worsening":
            v0 = float(r.uniform(0.2, 0.5))
            v1 = v0 + float(r.uniform(0.3, 0.45))
        elif cls == "improving":
            v1 = float(r.uniform(0.2, 0.5))
            v0 = v1 + float(r.uniform(0.3, 0.45))
        else:
            v0 = float(r.uniform(0.25, 0.85))
            v1 = v0 + float(r.uniform(-0.03, 0.03))
        f = {"seed": int(r.integers(2**31))}
        if obs in SIDE_WEIGHTS:
            f["side"] = ("right", "left")[int(r.integers(2))]
        if obs in ("Consolidation", "Pneumonia"):
            f["zone"] = ("lower", "upper", "mid")[int(r.integers(3))]
        background = {}
        if r.random() < 0.3:  # an unrated finding present in both studies, as in real follow-up films
            background = {"Cardiomegaly": {"severity": float(r.uniform(0.3, 0.9))}}
        anatomy = images.make_anatomy(masks[(offset + int(j)) % len(masks)], _rng(seed, S_PAIR, 2, int(j)))
        subject = ids.subject()
        row = {}
        for when, v in (("previous", v0), ("current", v1)):
            study, dicom = ids.study(), ids.dicom()
            findings = {**background, obs: {**f, "severity": v}}
            rel = image_path(subject, study, dicom)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            images.save_jpeg(
                images.resize(
                    images.render(anatomy, findings, _rng(seed, S_PAIR, 3 if when == "previous" else 4, int(j))),
                    image_size,
                ),
                out / rel,
            )
            row["previous_dicom_id" if when == "previous" else "dicom_id"] = dicom
            row["previous_study_id" if when == "previous" else "study_id"] = study
        row["subject_id"] = subject
        row[f"{finding}_progression"] = cls
        row.update(_label_quality(seed, int(j), finding))
        counts[finding][cls] += 1
        rows.append(row)
    path = out / MSCXRT_CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MSCXRT_COLUMNS, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return counts


def _label_quality(seed: int, j: int, finding: str) -> dict:
    """{"<finding>_label_quality": q} for pair j, q drawn from MSCXRT_LABEL_QUALITY on its own stream."""
    names, p = list(MSCXRT_LABEL_QUALITY), list(MSCXRT_LABEL_QUALITY.values())
    return {f"{finding}_label_quality": names[int(_rng(seed, S_QUALITY, j).choice(len(names), p=p))]}


def _label_counts(cases: list[dict]) -> dict:
    """Cases with each label = 1 (drawn findings, Lung Opacity when an opacity is drawn, No Finding when normal)."""
    counts = {o: 0 for o in OBSERVATIONS}
    for c in cases:
        for o, v in c["labels"].items():
            counts[o] += v == 1
    return counts


def _data_card(s: dict, profiles: dict, test_fraction: float) -> str:
    m = s["measured"]
    lines = [
        "# Synthetic CXR-MAX-format benchmark (`apo synth`)",
        "",
        f"Generated by `apo synth --out OUT --cases {s['cases']} --seed {s['seed']} --test-fraction {test_fraction} "
        f"--temporal-pairs {s['temporal_pairs']}`. Same seed, same bytes. Nothing here is patient data: images are "
        "drawn, reports are assembled from public report sentences, teachers are simulated.",
        "",
        "## Contents",
        "",
        f"- `cxrmax_train.jsonl` / `cxrmax_test.jsonl`: {s['train_cases']} / {s['test_cases']} cases, "
        f"{s['rows']['train']} / {s['rows']['test']} rows (one per teacher answer, {len(TEACHERS)} teachers). "
        "Fields: case_id, subject_id, study_id, dicom_id, image (relative to this folder, MIMIC-CXR-JPG layout), "
        "question, model, response, labels (14 CheXpert observations: 1 / 0 / -1 / null), sides (lateral findings: "
        "left / right / bilateral, the patient's side), report (ground-truth FINDINGS + IMPRESSION).",
        "- `files/`: 224x224 grayscale JPEGs (quality 90), one per case and two per MS-CXR-T pair.",
        f"- `{MSCXRT_CSV}`: {s['temporal_pairs']} previous/current pairs with the official columns "
        f"({', '.join(c for c in MSCXRT_COLUMNS if not c.endswith('_label_quality'))}); one finding rated per pair "
        "(other cells empty), classes balanced:",
        "",
        "| finding | " + " | ".join(MSCXRT_CLASSES) + " |",
        "|---|" + "---|" * len(MSCXRT_CLASSES),
    ]
    for f, c in s["mscxrt_counts"].items():
        lines.append(f"| {f} | " + " | ".join(str(c[k]) for k in MSCXRT_CLASSES) + " |")
    lines += ["", "Positive cases per observation (all splits):", "", "| observation | cases |", "|---|---|"]
    lines += [f"| {o} | {n} |" for o, n in s["label_counts"].items() if n]
    rs = s["report_sentences"]
    lines += [
        "",
        "## How it is made",
        "",
        "- **Images.** Lung fields are real: one of the 516 lung segmentation masks in torchxrayvision "
        "(`semantic_masks_v7labs_lungs.zip`, read from the installed package) per subject, resized onto the canvas. "
        "Body, mediastinum, trachea, heart, ribs, clavicles and hilar vessel markings are drawn around them. Findings: "
        "pleural effusion (dense base with a lateral meniscus, blunted angle), cardiomegaly (cardiothoracic ratio "
        "0.56-0.68 vs 0.40-0.47), pneumothorax (apical/lateral rim of air without markings and a pleural line), "
        "atelectasis (basal plate-like band), consolidation and pneumonia (patchy confluent opacity in one zone), "
        "edema (perihilar haze, Kerley B lines), support devices (central line, PICC, pacemaker, endotracheal tube). "
        "Severity scales extent. Patient's right = image left.",
        f"- **Reports.** Sentences of the 3,955 Indiana University reports in torchxrayvision (`NLMCXR_reports.tgz`), "
        "kept only when a rule tagger can account for every finding they name; side words are rewritten to the case's "
        f"side. {rs['mined']} report sentences are mined from IU, {rs['template']} come from templates (impressions "
        "and findings the corpus lacks for a side/severity). Labels: 1 for the drawn findings (Lung Opacity when an "
        "opacity is drawn, No Finding when nothing pathological is), 0 where the report negates an observation, "
        "null otherwise.",
        '- **Questions.** CXR-MAX style: the diagnosis is given, the imaging basis is asked ("What findings on this '
        'chest X-ray support the diagnosis of pleural effusion and cardiomegaly?"); normal cases ask about "no acute '
        'cardiopulmonary abnormality". No `<image>` tag in the text: the chat template adds the image.',
        "- **Teachers.** Each writes a reasoning trajectory (imaging basis of each finding, pertinent negatives, "
        "conclusion) after its drift profile perturbs what it says. Errors are drawn independently per teacher, so "
        "each is wrong in its own way while the majority is right.",
        "",
        "## Teachers: set rates and rates measured on the text",
        "",
        "Measured with `apo.world.synth.reports.tag` on the generated answers. omission / hedge: share of true "
        "findings not reported / reported as uncertain; wrong side: share of lateral findings reported on the wrong "
        "side; hallucination: share of answers asserting a finding the image lacks; late addition: share of answers "
        "whose extra finding first appears in the last sentence; refusal: share of questions refused; exact: share of "
        "answers whose certain (finding, side) set equals the truth.",
        "",
        "| teacher | drift | set rates | words | omission | hedge | wrong side | hallucination | late addition | "
        "refusal | exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in TEACHERS:
        p, r = profiles[name], m[name]
        set_rates = ", ".join(f"{k}={p[k]}" for k in RATES if p[k])
        lines.append(
            f"| {name} | {p['drift']} | {set_rates} | {r['mean_words']} | {r['omission']} | {r['hedge']} | "
            f"{r['wrong_side']} | {r['hallucination']} | {r['late_addition']} | {r['refusal']} | {r['exact']} |"
        )
    best = max(m[n]["exact"] for n in TEACHERS)
    lines += [
        "",
        f"Majority vote over the teachers that answered (a finding counts when more than half assert it, with the "
        f"same side): exact {m['majority_vote']['exact']} against {best} for the best single teacher. A consensus "
        "recovers the truth; SFT on all seven trajectories learns every teacher's drift.",
        "",
        "## Licences and sources",
        "",
        "- Indiana University chest X-ray reports (Demner-Fushman et al., 2016), CC BY-NC-ND 4.0, as shipped in "
        "torchxrayvision's package data; read at generation time, not redistributed by the repository. The generated "
        "reports quote its sentences: keep derived data non-commercial.",
        "- Lung masks: `semantic_masks_v7labs_lungs.zip` from torchxrayvision (V7 Labs COVID-19 X-ray lung "
        "annotations); only their shapes are used.",
        "- Teacher names follow CXR-MAX (CC BY-NC-SA 4.0); the texts are simulated, not outputs of those models.",
        "",
        "## Limits",
        "",
        "- The images are schematic: a model can learn the drawn findings, not real radiographs.",
        "- The tagger is a small rule system tuned to this text; it is not the CheXpert labeler.",
        "- MS-CXR-T here rates one finding per pair; the real set sometimes rates several.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def lengthen(text: str, words: int, rng) -> str:
    """`text` with REASONING sentences put in front until it has about `words` words (unchanged if it has)."""
    pad = []
    n = len(text.split())
    while n < words:
        sentence = REASONING[int(rng.integers(len(REASONING)))]
        pad.append(sentence)
        n += len(sentence.split())
    return " ".join([*pad, text]) if pad else text


def parse_size(value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ApoError(f"--image-size {value!r}: expected WIDTHxHEIGHT, e.g. 2544x3056") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise ApoError(f"--image-size {value}: each side must be 16..8192 pixels")
    return w, h


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an earlier synth output)")
    parser.add_argument("--cases", type=int, default=200, help="number of cases (7 teacher rows each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of cases in cxrmax_test.jsonl")
    parser.add_argument(
        "--temporal-pairs",
        type=int,
        default=None,
        help="MS-CXR-T previous/current pairs (default: 15 per 60 cases, at least 15)",
    )
    parser.add_argument(
        "--teachers",
        default=None,
        help="JSON file of drift-rate overrides {teacher: {rate: value}} (or a teachers.json)",
    )
    parser.add_argument(
        "--image-size",
        default=None,
        help="WIDTHxHEIGHT of the saved images (default 224x224); e.g. 2544x3056 for MIMIC-CXR-JPG's size "
        "(rendered at 224 and upscaled)",
    )
    parser.add_argument(
        "--answer-words",
        type=int,
        default=None,
        help="lengthen each trajectory to about this many words with label-free reasoning sentences "
        "(CXR-MAX's are a few hundred); default: as generated (~20-60 words)",
    )


def run(args) -> int:
    overrides = None
    if args.teachers:
        try:
            data = json.loads(Path(args.teachers).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ApoError(f"{args.teachers}: cannot read teacher overrides ({e})") from None
        overrides = data.get("teachers", data)
    s = generate(
        args.out,
        cases=args.cases,
        seed=args.seed,
        test_fraction=args.test_fraction,
        temporal_pairs=args.temporal_pairs,
        teachers=overrides,
        image_size=parse_size(args.image_size) if args.image_size else None,
        answer_words=args.answer_words,
    )
    m = s["measured"]
    print(
        f"wrote {s['cases']} cases ({s['rows']['train']} train / {s['rows']['test']} test rows) and "
        f"{s['temporal_pairs']} MS-CXR-T pairs to {s['out_dir']}"
    )
    print(
        f"majority-vote exact {m['majority_vote']['exact']} vs best teacher "
        f"{max(m[t]['exact'] for t in TEACHERS)}; see DATA_CARD.md"
    )
    return 0
