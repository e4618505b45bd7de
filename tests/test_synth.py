"""The synthetic CXR-MAX benchmark: deterministic, in the layout the loader reads, and with the drift it promises."""

import csv
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from apo.constants import MSCXRT_CLASSES, MSCXRT_FINDINGS, OBSERVATIONS, TEACHERS
from apo.errors import ApoError
from apo.evaluation.labeler import is_refusal
from apo.world.synth import MSCXRT_COLUMNS, MSCXRT_CSV, generate
from apo.world.synth.reports import LATERAL, adapt_side, labels_of, tag
from apo.world.synth.teachers import measure


def _hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"cxrmax_{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A set of its own (not the shared fixture), big enough to measure rates: 120 cases, ~5 s."""
    out = tmp_path_factory.mktemp("synth120") / "data"
    summary = generate(out, cases=120, seed=3, temporal_pairs=15)
    return out, summary


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, synth_dir):
    again = tmp_path / "again"
    generate(again, cases=40, seed=0)  # the shared fixture's arguments
    a, b = _hashes(Path(synth_dir)), _hashes(again)
    assert a == b and len(a) > 40
    other = tmp_path / "other"
    generate(other, cases=40, seed=1)
    assert _hashes(other)["cxrmax_train.jsonl"] != a["cxrmax_train.jsonl"]


def test_regenerating_into_an_earlier_output_replaces_it(tmp_path):
    out = tmp_path / "d"
    generate(out, cases=12, seed=0, temporal_pairs=15)
    first = _hashes(out)
    generate(out, cases=6, seed=0, temporal_pairs=15)  # fewer cases: no stale images may survive
    second = _hashes(out)
    assert len([k for k in second if k.startswith("files/")]) == 6 + 30
    assert len([k for k in first if k.startswith("files/")]) == 12 + 30
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ApoError, match="not empty"):
        generate(tmp_path / "busy", cases=2)


def test_layout_fields_and_ids(synth_dir):
    root = Path(synth_dir)
    train, test = _rows(root, "train"), _rows(root, "test")
    assert len(train) + len(test) == 40 * len(TEACHERS)
    cases = defaultdict(list)
    for r in train + test:
        assert set(r) == {
            "case_id",
            "subject_id",
            "study_id",
            "dicom_id",
            "image",
            "question",
            "model",
            "response",
            "labels",
            "sides",
            "report",
        }
        assert re.fullmatch(r"1\d{7}", r["subject_id"]) and re.fullmatch(r"5\d{7}", r["study_id"])
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", r["dicom_id"]) and len(r["dicom_id"]) == 44
        assert r["image"] == f"files/p{r['subject_id'][:2]}/p{r['subject_id']}/s{r['study_id']}/{r['dicom_id']}.jpg"
        assert "<image>" not in r["question"] and r["question"].rstrip().endswith(("?", "."))
        assert set(r["labels"]) == set(OBSERVATIONS) and set(r["labels"].values()) <= {1, 0, -1, None}
        cases[r["case_id"]].append(r)
    # Split by case: every case has its 7 teachers in one file.
    assert not {r["case_id"] for r in train} & {r["case_id"] for r in test}
    assert len(test) == 8 * len(TEACHERS)  # test_fraction 0.2 of 40
    for rows in cases.values():
        assert [r["model"] for r in rows] == list(TEACHERS)
        assert len({json.dumps([r["image"], r["labels"], r["report"], r["question"]]) for r in rows}) == 1
    with Image.open(root / train[0]["image"]) as im:
        assert im.size == (224, 224) and im.mode == "L" and im.format == "JPEG"


def test_labels_sides_and_reports_agree(synth_dir):
    root = Path(synth_dir)
    seen_pos = defaultdict(int)
    for r in _rows(root, "train")[:: len(TEACHERS)] + _rows(root, "test")[:: len(TEACHERS)]:
        pos = {o for o, v in r["labels"].items() if v == 1}
        for o in pos:
            seen_pos[o] += 1
        # Every lateral finding has its side; sides only for findings present.
        assert set(r["sides"]) == pos & set(LATERAL)
        assert set(r["sides"].values()) <= {"left", "right", "bilateral"}
        # The report asserts exactly the positive findings, on their sides, and nothing uncertain.
        said = tag(r["report"])
        said_pos = {o for o, v in said.items() if v["label"] == 1} - {"No Finding", "Lung Opacity"}
        assert said_pos == pos - {"No Finding", "Lung Opacity"}
        assert all(v["label"] != -1 for v in said.values())
        for o, side in r["sides"].items():
            assert said[o]["side"] == side, (o, r["report"])
        assert (r["labels"]["No Finding"] == 1) == (not pos - {"No Finding", "Support Devices"})
        assert r["report"].startswith("FINDINGS: ") and " IMPRESSION: " in r["report"]
        if pos - {"No Finding", "Support Devices"}:
            names = [o.lower() for o in pos if o not in ("No Finding", "Support Devices", "Lung Opacity", "Edema")]
            assert all(n in r["question"].lower() for n in names), (names, r["question"])
        else:
            assert "no acute cardiopulmonary abnormality" in r["question"]
    assert seen_pos["No Finding"] > 0 and sum(seen_pos[o] for o in LATERAL) > 10


def test_each_teacher_drifts_its_own_way_and_the_majority_is_right(small):
    out, summary = small
    m = summary["measured"]
    # Each teacher shows its own error and (almost) none of the others'.
    own = {
        "GPT-5-nano": "omission",
        "Gemini-2.5-flash-lite": "wrong_side",
        "Claude-Sonnet-4": "hedge",
        "Grok-4": "hallucination",
        "Qwen-VL-Max": "late_addition",
        "GLM-4.5V": "omission",
        "Moonshot-v1": "refusal",
    }
    kinds = ("omission", "wrong_side", "hedge", "hallucination", "refusal")
    for teacher, kind in own.items():
        assert m[teacher][kind] >= 0.1, (teacher, kind, m[teacher])
        for other in kinds:
            if other != kind and not (teacher == "Qwen-VL-Max" and other == "hallucination"):
                assert m[teacher][other] <= 0.03, (teacher, other, m[teacher])
    # Qwen's extra finding comes at the end; Grok's does not.
    assert m["Qwen-VL-Max"]["late_addition"] == m["Qwen-VL-Max"]["hallucination"] > 0
    assert m["Grok-4"]["late_addition"] < 0.5 * m["Grok-4"]["hallucination"]
    # GLM omits anything; GPT-5-nano only the minor findings.
    assert m["GLM-4.5V"]["omission"] > m["GPT-5-nano"]["omission"] * 0.8
    # Style: Claude is the most verbose, GPT-5-nano the tersest.
    words = {t: m[t]["mean_words"] for t in TEACHERS}
    assert max(words, key=words.get) == "Claude-Sonnet-4" and min(words, key=words.get) == "GPT-5-nano"
    # The paper's premise: every teacher errs, the vote recovers the truth.
    assert m["majority_vote"]["exact"] >= 0.9
    assert m["majority_vote"]["exact"] > max(m[t]["exact"] for t in TEACHERS) + 0.1
    assert max(m[t]["exact"] for t in TEACHERS) < 0.85
    # teachers.json carries the set rates and the same measurement.
    tj = json.loads((out / "teachers.json").read_text())
    assert list(tj["teachers"]) == list(TEACHERS) and tj["measured"] == m
    assert tj["teachers"]["Moonshot-v1"]["refuse"] > 0 and "Moonshot-v1" in (out / "DATA_CARD.md").read_text()


def test_measure_reads_the_text_not_the_generator():
    truth = {"Pleural Effusion": {"side": "left", "severity": 0.5}}
    right = "There is a small left pleural effusion. These findings support the diagnosis of left pleural effusion."
    answers = {t: right for t in TEACHERS}
    answers["Gemini-2.5-flash-lite"] = "There is a small right pleural effusion."
    answers["Claude-Sonnet-4"] = "A left pleural effusion may be present."
    answers["Grok-4"] += " There is also a right pneumothorax."
    answers["GLM-4.5V"] = "The heart size is normal."
    refused = dict.fromkeys(TEACHERS, right) | {"Moonshot-v1": "I cannot provide a medical diagnosis."}
    m = measure([{"truth": truth, "answers": answers}, {"truth": truth, "answers": refused}])
    assert m["Gemini-2.5-flash-lite"]["wrong_side"] == 0.5 and m["Claude-Sonnet-4"]["hedge"] == 0.5
    assert m["Grok-4"]["hallucination"] == 0.5 and m["Grok-4"]["late_addition"] == 0.5
    assert m["Moonshot-v1"]["refusal"] == 0.5 and m["GLM-4.5V"]["omission"] == 0.5
    assert m["GPT-5-nano"]["exact"] == 1.0 and m["Moonshot-v1"]["exact"] == 0.5
    assert m["majority_vote"]["exact"] == 1.0  # 4 of 7 right in the first case, 6 of 6 answering in the second
    assert is_refusal(refused["Moonshot-v1"]) and not is_refusal(right)


def test_mscxrt_csv_columns_values_and_images(synth_dir):
    root = Path(synth_dir)
    with open(root / MSCXRT_CSV, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == MSCXRT_COLUMNS
        rows = list(reader)
    assert len(rows) == 15
    per = defaultdict(int)
    for r in rows:
        rated = [(f, r[f"{f}_progression"]) for f in MSCXRT_FINDINGS if r[f"{f}_progression"]]
        assert len(rated) == 1 and rated[0][1] in MSCXRT_CLASSES
        per[rated[0]] += 1
        for dicom, study in ((r["dicom_id"], r["study_id"]), (r["previous_dicom_id"], r["previous_study_id"])):
            s = r["subject_id"]
            assert (root / f"files/p{s[:2]}/p{s}/s{study}/{dicom}.jpg").is_file()
        assert r["study_id"] != r["previous_study_id"] and r["dicom_id"] != r["previous_dicom_id"]
    assert len(per) == 15  # every finding x class once


def test_mscxrt_extent_follows_the_label(small):
    """Worsening pairs get brighter (effusion, consolidation, edema, pneumonia) or darker (pneumothorax) in the
    lungs."""
    import numpy as np

    out, _ = small
    with open(out / MSCXRT_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    checked = 0
    for r in rows:
        ((finding, cls),) = [(f, r[f"{f}_progression"]) for f in MSCXRT_FINDINGS if r[f"{f}_progression"]]
        if cls == "stable":
            continue
        s = r["subject_id"]
        load = lambda d, st: np.asarray(Image.open(out / f"files/p{s[:2]}/p{s}/s{st}/{d}.jpg"), np.float32)
        diff = load(r["dicom_id"], r["study_id"]) - load(r["previous_dicom_id"], r["previous_study_id"])
        # Pixels that changed beyond noise and exposure jitter: a pneumothorax darkens as it grows, the rest brighten.
        brighter, darker = int((diff > 15).sum()), int((diff < -15).sum())
        grew = darker > brighter if finding == "pneumothorax" else brighter > darker
        assert grew == (cls == "worsening") and max(brighter, darker) > 100, (finding, cls, brighter, darker)
        stable_like = min(brighter, darker)
        assert stable_like < 0.5 * max(brighter, darker), (finding, cls, brighter, darker)
        checked += 1
    assert checked == 10


def test_tagger_and_side_rewriting():
    assert labels_of("No pleural effusion or pneumothorax.")["Pleural Effusion"] == 0
    assert labels_of("The heart is not enlarged.")["Cardiomegaly"] == 0
    assert labels_of("Small right pleural effusion without pneumothorax.")["Pneumothorax"] == 0
    assert labels_of("Atelectasis cannot be excluded.")["Atelectasis"] == -1
    assert labels_of("No acute cardiopulmonary abnormality.")["No Finding"] == 1
    assert labels_of("Cardiomegaly. No acute cardiopulmonary abnormality.")["No Finding"] is None
    assert tag("There is a small left pleural effusion.")["Pleural Effusion"]["side"] == "left"
    assert tag("Mild bibasilar atelectasis.")["Atelectasis"]["side"] == "bilateral"
    assert adapt_side("Small right pleural effusion.", "right", "bilateral") == "Small bilateral pleural effusions."
    assert (
        adapt_side("There are small bilateral pleural effusions.", "bilateral", "left")
        == "There is small left pleural effusion."
    )
    assert adapt_side("Right upper lobe pneumonia.", "right", "left") == "Left upper lobe pneumonia."


def test_cli_writes_and_reports(tmp_path, capsys):
    from apo.cli import main

    assert main(["synth", "--out", str(tmp_path / "o"), "--cases", "3", "--seed", "2", "--temporal-pairs", "15"]) == 0
    assert "majority-vote exact" in capsys.readouterr().out
    assert (tmp_path / "o" / "DATA_CARD.md").is_file()
    assert main(["synth", "--out", str(tmp_path / "o2"), "--cases", "0"]) == 2
