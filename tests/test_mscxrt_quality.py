"""MS-CXR-T's label-quality columns: reading, --label-quality, per-class / class-balanced / per-quality scores, and
the synthetic CSV's quality columns (a fixed distribution on a stream of its own)."""

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from test_eval import write_mscxrt

import apo.world.synth as synth
from apo.cli import main
from apo.constants import MSCXRT_FINDINGS
from apo.errors import ApoError, DataError
from apo.evaluation.mscxrt import LABEL_QUALITIES, read_pairs, score, select_quality
from apo.world.synth import MSCXRT_COLUMNS, MSCXRT_CSV, MSCXRT_LABEL_QUALITY, generate


def _item(i, finding, label, quality):
    return {"case_id": str(i), "finding": finding, "label": label, "label_quality": quality}


def test_score_per_class_macro_and_by_quality():
    # edema: 4 stable (3 right), 1 worsening (wrong) -> plain 3/5, class-balanced (3/4 + 0/1) / 2 = 0.375
    items = [_item(i, "edema", "stable", "one_expert") for i in range(4)]
    items += [_item(4, "edema", "worsening", "disagreement"), _item(5, "pneumothorax", "improving", "one_expert")]
    preds = ["stable", "stable", "stable", "improving", "stable", "improving"]
    s = score(items, {str(i): {"prediction": p} for i, p in enumerate(preds)})
    assert s["per_finding"] == {"edema": 0.6, "pneumothorax": 1.0} and s["average"] == 0.8
    assert s["per_class"] == {"edema": {"stable": 0.75, "worsening": 0.0}, "pneumothorax": {"improving": 1.0}}
    assert s["per_finding_macro"] == {"edema": 0.375, "pneumothorax": 1.0} and s["average_macro"] == 0.6875
    assert set(s["by_label_quality"]) == {"one_expert", "disagreement"}
    one, dis = s["by_label_quality"]["one_expert"], s["by_label_quality"]["disagreement"]
    assert one["per_finding"] == {"edema": 0.75, "pneumothorax": 1.0} and one["n"] == {"edema": 4, "pneumothorax": 1}
    assert dis["per_finding"] == {"edema": 0.0} and dis["average_macro"] == 0.0
    assert "by_label_quality" not in one  # one level only
    # no quality column at all: no per-quality breakdown
    plain = [dict(it, label_quality=None) for it in items]
    assert score(plain, {str(i): {"prediction": p} for i, p in enumerate(preds)})["by_label_quality"] == {}


def _add_quality(csv_path, qualities, bad=None):
    """Give the test CSV `<finding>_label_quality` columns: row k's labelled findings get qualities[k]."""
    rows = list(csv.DictReader(open(csv_path, newline="")))
    cols = list(rows[0]) + [f"{f}_label_quality" for f in MSCXRT_FINDINGS]
    for r, q in zip(rows, qualities):
        for f in MSCXRT_FINDINGS:
            r[f"{f}_label_quality"] = q if r[f"{f}_progression"] else ""
    if bad:
        rows[-1]["pneumothorax_label_quality"] = bad
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return csv_path


def test_read_pairs_reads_quality_and_previous_study(tmp_path):
    path = _add_quality(write_mscxrt(tmp_path), ["one_expert", "multiple_experts", "disagreement", "one_expert"])
    items, _ = read_pairs(path, tmp_path)
    assert [it["label_quality"] for it in items] == [
        "one_expert",
        "multiple_experts",
        "multiple_experts",  # row 2 rates two findings
        "disagreement",
        "one_expert",
    ]
    assert items[0]["previous_study_id"] == "51000000" and items[-1]["previous_study_id"] is None
    assert [it["case_id"] for it in select_quality(items, ["disagreement", "one_expert"], path)] == [
        items[0]["case_id"],
        items[3]["case_id"],
        items[4]["case_id"],
    ]
    _add_quality(path, ["one_expert"] * 4, bad="two_experts")
    with pytest.raises(DataError, match=r"v1.0.0.csv:5: unknown label quality 'two_experts' in pneumothorax_label"):
        read_pairs(path, tmp_path)
    plain = write_mscxrt(tmp_path / "plain")
    items, _ = read_pairs(plain, tmp_path / "plain")
    assert all(it["label_quality"] is None for it in items)
    with pytest.raises(ApoError, match="no <finding>_label_quality column"):
        select_quality(items, ["one_expert"], plain)


def test_synthetic_csv_has_quality_columns(synth_dir):
    assert MSCXRT_COLUMNS[-5:] == tuple(f"{f}_label_quality" for f in MSCXRT_FINDINGS)
    with open(Path(synth_dir) / MSCXRT_CSV, newline="") as fh:
        for r in csv.DictReader(fh):
            for f in MSCXRT_FINDINGS:
                assert bool(r[f"{f}_progression"]) == bool(r[f"{f}_label_quality"])  # a quality per rated finding
                assert r[f"{f}_label_quality"] in ("", *LABEL_QUALITIES)


def test_synthetic_quality_follows_the_documented_distribution():
    assert sum(MSCXRT_LABEL_QUALITY.values()) == pytest.approx(1.0) and tuple(MSCXRT_LABEL_QUALITY) == LABEL_QUALITIES
    draws = Counter(next(iter(synth._label_quality(0, j, "edema").values())) for j in range(4000))
    for q, p in MSCXRT_LABEL_QUALITY.items():
        assert abs(draws[q] / 4000 - p) < 0.025, (q, draws)
    assert synth._label_quality(1, 7, "edema") == synth._label_quality(1, 7, "edema")  # deterministic by seed


def _hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_quality_columns_change_no_other_byte(tmp_path, monkeypatch):
    """Without the quality columns (the generator as it was) every file but the CSV is the same bytes, and the CSV
    is the same once its quality columns are dropped: the quality draws take no number from another stream."""
    generate(tmp_path / "with", cases=8, seed=4)
    base = tuple(c for c in MSCXRT_COLUMNS if not c.endswith("_label_quality"))
    monkeypatch.setattr(synth, "MSCXRT_COLUMNS", base)
    monkeypatch.setattr(synth, "_label_quality", lambda seed, j, finding: {})
    generate(tmp_path / "without", cases=8, seed=4)
    a, b = _hashes(tmp_path / "with"), _hashes(tmp_path / "without")
    assert a.keys() == b.keys() and {k for k in a if a[k] != b[k]} == {MSCXRT_CSV}
    read = lambda p: list(csv.DictReader(open(p, newline="")))
    stripped = [{k: v for k, v in r.items() if k in base} for r in read(tmp_path / "with" / MSCXRT_CSV)]
    assert stripped == read(tmp_path / "without" / MSCXRT_CSV)


def test_eval_mscxrt_label_quality_on_the_synthetic_set(synth_dir, tiny_model_dir, tmp_path, capsys):
    path = Path(synth_dir) / MSCXRT_CSV
    want = ["multiple_experts", "disagreement"]
    expected = sum(r[f"{f}_label_quality"] in want for r in csv.DictReader(open(path)) for f in MSCXRT_FINDINGS)
    out = tmp_path / "eval"
    args = ["eval-mscxrt", "--model", str(tiny_model_dir), "--csv", str(path), "--image-root", str(synth_dir)]
    assert main([*args, "--max-new-tokens", "3", "--label-quality", *want, "--out", str(out)]) == 0
    result = json.loads((out / "mscxrt.json").read_text())
    assert 0 < sum(result["n"].values()) == expected
    assert set(result["by_label_quality"]) <= set(want) and "average_macro" in result
    assert sum(sum(r["n"].values()) for r in result["by_label_quality"].values()) == expected
    assert "class-balanced (macro) average" in capsys.readouterr().out
