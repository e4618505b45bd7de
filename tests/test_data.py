"""Every loader layout, image resolution, and what happens to bad records."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from apo.constants import OBSERVATIONS
from apo.data import Case, load_cases, read_cases, write_cases
from apo.errors import ApoError, DataError
from apo.io.mimic import mimic_image_path

TEACHERS = ["GPT-5-nano", "Grok-4", "GLM-4.5V"]


def _img(path, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path, quality=90)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def root(tmp_path):
    for i in range(3):
        _img(mimic_image_path(tmp_path, f"1000000{i}", f"5000000{i}", f"d{i}"))
    return tmp_path


def long_rows(n=3):
    return [
        {
            "case_id": f"c{i}",
            "subject_id": f"1000000{i}",
            "study_id": f"5000000{i}",
            "dicom_id": f"d{i}",
            "image": f"files/p10/p1000000{i}/s5000000{i}/d{i}.jpg",
            "question": f"q{i}?",
            "model": t,
            "response": f"{t} says {i}.",
            "labels": {"Cardiomegaly": 1, "Pneumothorax": 0},
        }
        for i in range(n)
        for t in TEACHERS
    ]


def test_long_rows_group_into_cases(root):
    cases = load_cases(_jsonl(root / "d.jsonl", long_rows()))
    assert [c.case_id for c in cases] == ["c0", "c1", "c2"]
    c = cases[1]
    assert c.teachers == TEACHERS and c.prompt == "q1?"
    assert c.images == [str((root / "files/p10/p10000001/s50000001/d1.jpg").resolve())]
    assert c.labels["Cardiomegaly"] == 1 and c.labels["Pneumothorax"] == 0 and c.labels["Edema"] is None
    assert set(c.labels) == set(OBSERVATIONS)
    assert c.meta["dicom_id"] == "d1"


def test_mimic_layout_from_ids_alone(root):
    rows = [{k: v for k, v in r.items() if k != "image"} for r in long_rows(1)]
    cases = load_cases(_jsonl(root / "d.jsonl", rows))
    assert cases[0].images[0].endswith("files/p10/p10000000/s50000000/d0.jpg")


def test_image_root_and_dcm_suffix(tmp_path, root):
    rows = long_rows(1)
    for r in rows:
        r["image"] = r["image"].replace(".jpg", ".dcm")
    (tmp_path / "elsewhere").mkdir()
    data = _jsonl(tmp_path / "elsewhere" / "d.jsonl", rows)
    cases = load_cases(data, image_root=root)
    assert cases[0].images[0].endswith("d0.jpg")


def test_wide_canonical_swift_json_parquet_hf(root):
    wide = [
        {
            "case_id": "w0",
            "image": "files/p10/p10000000/s50000000/d0.jpg",
            "prompt": "q?",
            "trajectories": {t: f"{t} text" for t in TEACHERS},
        }
    ]
    ref = load_cases(_jsonl(root / "wide.jsonl", wide))
    assert ref[0].teachers == TEACHERS

    write_cases(ref, root / "canon.jsonl")
    assert load_cases(root / "canon.jsonl")[0] == ref[0]

    (root / "wide.json").write_text(json.dumps({"data": wide}))
    assert load_cases(root / "wide.json")[0] == ref[0]

    import datasets
    import pandas as pd

    flat = [
        {"case_id": "w0", "image": wide[0]["image"], "prompt": "q?", "model": t, "response": f"{t} text"}
        for t in TEACHERS
    ]
    pd.DataFrame(flat).to_parquet(root / "long.parquet")
    assert load_cases(root / "long.parquet")[0] == ref[0]

    datasets.Dataset.from_list(flat).save_to_disk(str(root / "hf"))
    assert load_cases(root / "hf", image_root=root)[0] == ref[0]

    swift = [
        {
            "messages": [{"role": "user", "content": "<image>q?"}, {"role": "assistant", "content": f"{t} text"}],
            "images": [ref[0].images[0]],
            "case_id": "w0",
            "teacher": t,
        }
        for t in TEACHERS
    ]
    assert load_cases(_jsonl(root / "swift.jsonl", swift))[0] == ref[0]


def test_teacher_filter(root):
    cases = load_cases(_jsonl(root / "d.jsonl", long_rows()), teachers=["Grok-4"])
    assert all(c.teachers == ["Grok-4"] for c in cases)
    with pytest.raises(ApoError, match="unknown teacher"):
        load_cases(root / "d.jsonl", teachers=["Nobody"])


BAD = [
    (lambda rows: rows[:2] + ["{not json"] + rows[2:], "invalid JSON"),
    (lambda rows: rows[:2] + [json.dumps({**json.loads(rows[2]), "response": "   "})] + rows[3:], "is empty"),
    (lambda rows: rows[:2] + [json.dumps({**json.loads(rows[2]), "response": 7})] + rows[3:], "must be a string"),
    (
        lambda rows: (
            rows[:2] + [json.dumps({k: v for k, v in json.loads(rows[2]).items() if k != "question"})] + rows[3:]
        ),
        "missing field prompt",
    ),
    (lambda rows: rows[:2] + [rows[1]] + rows[2:], "duplicate answer of teacher"),
    (
        lambda rows: rows[:2] + [json.dumps({**json.loads(rows[2]), "labels": {"Cardiomegaly": 2}})] + rows[3:],
        "must be 1, 0, -1 or null",
    ),
    (
        lambda rows: rows[:2] + [json.dumps({**json.loads(rows[2]), "image": "../../etc/passwd"})] + rows[3:],
        "leaves the image root",
    ),
]


@pytest.mark.parametrize("mutate,reason", BAD, ids=[b[1] for b in BAD])
def test_bad_record_names_file_line_reason(root, mutate, reason):
    lines = [json.dumps(r) for r in long_rows()]
    path = root / "bad.jsonl"
    mutated = mutate(lines)
    path.write_text("\n".join(mutated) + "\n")
    with pytest.raises(DataError) as e:
        read_cases(path, image_root=root)
    assert e.value.record == 3 and reason in e.value.reason and str(path) in str(e.value)
    # --skip-bad: that record alone is rejected, every good record kept
    cases, rejects = read_cases(path, image_root=root, skip_bad=True)
    assert [r["record"] for r in rejects] == [3] and reason in rejects[0]["reason"]
    assert sum(len(c.trajectories) for c in cases) == len(mutated) - 1


def test_non_utf8_line(root):
    path = root / "bad.jsonl"
    lines = [json.dumps(r).encode() for r in long_rows()]
    lines[4] = b'{"case_id": "\xff\xfe"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"bad.jsonl:5: not UTF-8"):
        read_cases(path)


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda p: p.unlink(), "not found"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"this is not a jpeg"), "cannot be decoded"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot be decoded"),
    ],
)
def test_bad_images_found_up_front(root, damage, reason):
    big = _img(mimic_image_path(root, "10000001", "50000001", "d1"), size=(256, 256))
    big.write_bytes(_noisy_jpeg())
    damage(big)
    path = _jsonl(root / "d.jsonl", long_rows())
    with pytest.raises(DataError, match=reason) as e:
        read_cases(path)
    assert e.value.record == 4  # the first row of case c1
    cases, rejects = read_cases(path, skip_bad=True)
    assert [c.case_id for c in cases] == ["c0", "c2"] and [r["record"] for r in rejects] == [4, 5, 6]


def _noisy_jpeg():
    import io

    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_duplicate_wide_case(root):
    row = {"case_id": "w0", "image": "files/p10/p10000000/s50000000/d0.jpg", "prompt": "q?", "trajectories": {"A": "x"}}
    with pytest.raises(DataError, match="duplicate case id 'w0' \\(first at 1\\)"):
        read_cases(_jsonl(root / "w.jsonl", [row, row]))


def test_case_roundtrip():
    c = Case("x", ["/a.jpg"], "q", [], {"Edema": 1}, {"report": "r"})
    assert Case.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_cli_error_is_one_line(root):
    path = root / "bad.jsonl"
    path.write_text("{broken\n")
    r = subprocess.run(
        [sys.executable, "-m", "apo.cli", "prepare-sft", "--dataset", str(path), "--out", str(root / "o.jsonl")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"apo prepare-sft: error: {path}:1: invalid JSON (Expecting property name "
        f"enclosed in double quotes at column 2)"
    ]
    assert "Traceback" not in r.stderr


def test_prepare_sft_rows_load_in_ms_swift(root, capsys):
    from apo.cli import main

    out = root / "sft.jsonl"
    assert main(["prepare-sft", "--dataset", str(_jsonl(root / "d.jsonl", long_rows())), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 cases -> 9 rows" in printed and "Grok-4" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9 and rows[0]["messages"][0]["content"] == "<image>q0?"

    from swift.dataset import load_dataset

    train, _ = load_dataset([str(out)], use_hf=True, num_proc=1, load_from_cache_file=False)
    assert len(train) == 9
    row = train[4]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][1]["content"] == rows[4]["messages"][1]["content"]
    imgs = row["images"]
    assert (imgs[0]["path"] if isinstance(imgs[0], dict) else imgs[0]) == rows[4]["images"][0]
