"""Evaluation: the answer parser, MS-CXR-T end to end on the tiny model, eval-report's predictions and metrics."""

import json

import numpy as np
import pytest
from PIL import Image

from apo.cli import main
from apo.data import Case
from apo.errors import DataError
from apo.evaluation.mscxrt import parse_progression, read_pairs, score
from apo.evaluation.report import drift_metrics, parse_mimic_report
from apo.io.mimic import mimic_image_path

ANSWERS = [
    ("Improving", "improving"),
    ("Better.", "improving"),
    ("resolving", "improving"),
    ("Decreased", "improving"),
    ("The effusion has improved since the prior study.", "improving"),
    ("The pneumothorax is smaller", "improving"),
    ("Stable", "stable"),
    ("unchanged", "stable"),
    ("No change.", "stable"),
    ("no significant interval change", "stable"),
    ("It is the same", "stable"),
    ("Without change", "stable"),
    ("Worse", "worsening"),
    ("Worsening.", "worsening"),
    ("increased", "worsening"),
    ("Progressed", "worsening"),
    ("The edema has progressed since the prior.", "worsening"),
    (" WORSENED ", "worsening"),
    # negations: a denied direction means no change, unless another class is stated
    ("not worsening", "stable"),
    ("It has not improved.", "stable"),
    ("hasn't improved", "stable"),
    ("no progression", "stable"),
    ("not worse", "stable"),
    ("neither worsening nor improving", "stable"),
    ("Stable, no worsening.", "stable"),
    ("Not worsening but improving", "improving"),
    ("Worsening. It has increased.", "worsening"),
    ("Improving rather than worsening", "improving"),
    # nothing usable
    ("not stable", None),
    ("", None),
    (None, None),
    ("I cannot tell from these images.", None),
    ("Lungs", None),
]


@pytest.mark.parametrize("answer,expected", ANSWERS)
def test_parse_progression(answer, expected):
    assert parse_progression(answer) == expected


def test_score_is_macro_over_findings():
    items = [
        {"case_id": str(i), "finding": f, "label": "stable"} for i, f in enumerate(["edema"] * 3 + ["pneumothorax"])
    ]
    recs = {
        "0": {"prediction": "stable"},
        "1": {"prediction": None},
        "2": {"prediction": "worsening"},
        "3": {"prediction": "stable"},
    }
    s = score(items, recs)
    assert s["per_finding"] == {"edema": pytest.approx(1 / 3), "pneumothorax": 1.0}
    assert s["average"] == pytest.approx(2 / 3) and s["micro"] == 0.5 and s["unparsed"] == 1
    assert s["n"] == {"edema": 3, "pneumothorax": 1}


def write_mscxrt(root, bad=None):
    """A small MS-CXR-T-format CSV over MIMIC-CXR-JPG-layout images. Row 3 has no previous_study_id (looked up)."""
    rng = np.random.default_rng(1)
    header = [
        "dicom_id",
        "previous_dicom_id",
        "study_id",
        "previous_study_id",
        "subject_id",
        "consolidation_progression",
        "edema_progression",
        "pleural_effusion_progression",
        "pneumonia_progression",
        "pneumothorax_progression",
    ]
    rows = []
    for i in range(4):
        subj, st, prev_st = f"1000000{i}", f"5000000{i}", f"5100000{i}"
        for study, dicom in ((st, f"cur{i}"), (prev_st, f"prev{i}")):
            p = mimic_image_path(root, subj, study, dicom)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((96 + 8 * i, 112)) * 255).astype("uint8")).save(p)
        labels = ["", "", "", "", ""]
        labels[i % 5] = ["improving", "stable", "worsening"][i % 3]
        if i == 1:
            labels[4] = "worsening"  # two findings labelled on one pair: two questions
        rows.append([f"cur{i}", f"prev{i}", st, "" if i == 3 else prev_st, subj, *labels])
    if bad:
        rows.append(bad)
    path = root / "MS_CXR_T_temporal_image_classification_v1.0.0.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def test_read_pairs_and_bad_rows(tmp_path):
    csv_path = write_mscxrt(tmp_path)
    items, rejects = read_pairs(csv_path, tmp_path)
    assert len(items) == 5 and not rejects
    assert items[-1]["images"][0].endswith("s51000003/prev3.jpg")  # found without previous_study_id
    for bad, reason in [
        (["x", "prev0", "5", "", "1", "better", "", "", "", ""], "unknown class 'better'"),
        (["", "prev0", "5", "", "1", "stable", "", "", "", ""], "missing dicom_id"),
        (["cur0", "prev0", "50000000", "51000000", "10000000", "", "", "", "", ""], "no <finding>"),
        (["nope", "prev0", "50000000", "51000000", "10000000", "stable", "", "", "", ""], "current image not found"),
    ]:
        csv_path = write_mscxrt(tmp_path, bad)
        with pytest.raises(DataError, match=rf"v1.0.0.csv:6: .*{reason}"):
            read_pairs(csv_path, tmp_path)
        items, rejects = read_pairs(csv_path, tmp_path, skip_bad=True)
        assert len(items) == 5 and rejects[0]["record"] == 6 and reason in rejects[0]["reason"]


def test_eval_mscxrt_end_to_end(tmp_path, tiny_model_dir, capsys):
    csv_path = write_mscxrt(tmp_path / "mimic", bad=["x", "p", "5", "", "1", "better", "", "", "", ""])
    args = [
        "eval-mscxrt",
        "--model",
        str(tiny_model_dir),
        "--csv",
        str(csv_path),
        "--image-root",
        str(tmp_path / "mimic"),
        "--max-new-tokens",
        "5",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2  # a bad row stops the run, naming file and row
    assert "v1.0.0.csv:6" in capsys.readouterr().err
    assert main([*args, "--skip-bad", "--batch-size", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--skip-bad", "--batch-size", "1", "--out", str(tmp_path / "b")]) == 0
    preds_a = (tmp_path / "a" / "mscxrt_predictions.jsonl").read_bytes()
    assert preds_a == (tmp_path / "b" / "mscxrt_predictions.jsonl").read_bytes()  # batched == one by one, and greedy
    recs = [json.loads(l) for l in preds_a.decode().splitlines()]
    assert len(recs) == 5 and all(set(r) == {"case_id", "finding", "label", "answer", "prediction"} for r in recs)
    result = json.loads((tmp_path / "a" / "mscxrt.json").read_text())
    assert result["n"] == {"consolidation": 1, "edema": 1, "pleural_effusion": 1, "pneumonia": 1, "pneumothorax": 1}
    assert result["unparsed"] == sum(r["prediction"] is None for r in recs)
    assert len((tmp_path / "a" / "unparsed.jsonl").read_text().splitlines()) == result["unparsed"]
    expect = score(read_pairs(csv_path, tmp_path / "mimic", skip_bad=True)[0], {r["case_id"]: r for r in recs})
    assert result.pop("pixel_budget") == {"min_pixels": 3136, "max_pixels": 401408}  # recorded with the output
    assert result == expect and 0 <= result["average"] <= 1
    assert "better" in (tmp_path / "a" / "mscxrt_rejects.jsonl").read_text()


def test_parse_mimic_report_and_drift_metrics():
    report = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  Cough.

 FINDINGS:

 Small left pleural effusion.  No pneumothorax.

 IMPRESSION:

 Left effusion.
"""
    assert parse_mimic_report(report) == "Small left pleural effusion. No pneumothorax. Left effusion."
    assert parse_mimic_report("no sections at all") is None
    labels = {o: None for o in ["Pleural Effusion", "Cardiomegaly", "Pneumothorax"]}
    labels["Pleural Effusion"] = 1
    cases = [Case(str(i), [], "q", [], dict(labels), {"sides": {"Pleural Effusion": "left"}}) for i in range(4)]
    preds = [
        "Small left pleural effusion.",
        "Right pleural effusion and cardiomegaly.",
        "I cannot provide a diagnosis.",
        "No acute findings.",
    ]
    d = drift_metrics(cases, preds)
    assert d["refusal_rate"] == 0.25 and d["hallucination_rate"] == pytest.approx(1 / 3)
    assert d["omission_rate"] == pytest.approx(1 / 3)  # of the 3 answers that label something, one misses it
    assert d["side_accuracy"] == 0.5 and d["side_n"] == 2 and d["recall"] == pytest.approx(2 / 3)


def write_report_cases(root):
    rng = np.random.default_rng(2)
    rows = []
    for i in range(4):
        Image.fromarray((rng.random((112, 100)) * 255).astype("uint8")).save(root / f"{i}.png")
        rows.append(
            {
                "case_id": f"r{i}",
                "image": f"{i}.png",
                "question": "Describe the findings.",
                "report": [
                    "Small left pleural effusion.",
                    "No acute cardiopulmonary process.",
                    "Cardiomegaly with mild edema.",
                    "Right pneumothorax.",
                ][i],
                "labels": {"Pleural Effusion": 1 if i == 0 else None},
                "sides": {"Pleural Effusion": "left"} if i == 0 else {},
            }
        )
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "test.jsonl"


def test_eval_report_writes_predictions_and_metrics(tmp_path, tiny_model_dir, monkeypatch):
    data = write_report_cases(tmp_path)
    args = ["eval-report", "--model", str(tiny_model_dir), "--dataset", str(data), "--max-new-tokens", "8"]
    assert main([*args, "--out", str(tmp_path / "e"), "--batch-size", "4"]) == 0
    preds = [json.loads(l) for l in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert [p["case_id"] for p in preds] == ["r0", "r1", "r2", "r3"]
    assert preds[3]["reference"] == "Right pneumothorax." and all(isinstance(p["prediction"], str) for p in preds)
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n"] == 4 and {"BLEU-1", "ROUGE-L", "CIDEr"} <= set(m["nlg"]) and m["clinical"] and m["drift"]
    # a rerun generates nothing (all cases done) and ends with the same files
    import apo.evaluation.metrics
    import apo.model.generation

    monkeypatch.setattr(
        apo.model.generation, "generate", lambda *a, **k: pytest.fail("a finished case was regenerated")
    )
    monkeypatch.setattr(
        apo.evaluation.metrics, "nlg_scores", lambda r, h: m["nlg"]
    )  # METEOR's JVM costs ~15 s; checked above
    before = (tmp_path / "e" / "predictions.jsonl").read_bytes()
    assert main([*args, "--out", str(tmp_path / "e"), "--batch-size", "4"]) == 0
    assert (tmp_path / "e" / "predictions.jsonl").read_bytes() == before
    assert json.loads((tmp_path / "e" / "metrics.json").read_text()) == m


def test_the_synthetic_mscxrt_csv_reads_clean(synth_dir):
    items, rejects = read_pairs(synth_dir / "mscxrt" / "MS_CXR_T_temporal_image_classification_v1.0.0.csv", synth_dir)
    assert items and not rejects
    assert {it["label"] for it in items} == {"improving", "stable", "worsening"}


def test_generate_batched_equals_one_by_one_in_input_order(tmp_path, tiny_model_dir):
    import torch

    from apo.model.generation import generate
    from apo.model.loading import load_model

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(112, 112), (200, 150), (84, 140)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((rng.random((h, w)) * 255).astype("uint8")).save(paths[-1])
    requests = [
        ([paths[0]], "Is there an effusion?"),
        ([paths[1], paths[2]], "Compare the two studies, please."),
        ([], "No image here."),
        ([paths[2]], "Describe the findings in detail, with their sides."),
        ([paths[1]], "x"),
    ]
    model, processor = load_model(tiny_model_dir)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    batched = generate(model, processor, requests, max_new_tokens=10, batch_size=3, progress=False)
    again = generate(model, processor, requests, max_new_tokens=10, batch_size=3, progress=False)
    single = [generate(model, processor, [r], max_new_tokens=10, batch_size=1, progress=False)[0] for r in requests]
    assert batched == again == single and len(set(batched)) > 1  # greedy, padding-invariant, and input order
    assert generate(model, processor, requests[::-1], max_new_tokens=10, batch_size=2, progress=False) == batched[::-1]


def test_load_model_puts_the_adapter_on_top(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from apo.errors import ApoError
    from apo.model.loading import load_model

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )  # random B: the adapter changes the outputs
    lora.save_pretrained(tmp_path / "adapter")
    plain, processor = load_model(tiny_model_dir)
    tuned, _ = load_model(tiny_model_dir, adapter=tmp_path / "adapter")
    ids = processor.tokenizer("left pleural effusion", return_tensors="pt")
    with torch.no_grad():
        a, b = plain(**ids).logits, tuned(**ids).logits
        c = lora.eval()(**ids).logits
    assert not torch.allclose(a, b) and torch.allclose(b, c, atol=1e-4)  # merged adapter == PEFT forward
    with pytest.raises(ApoError, match="adapter_config.json"):
        load_model(tiny_model_dir, adapter=tmp_path)
    with pytest.raises(ApoError, match="no such folder"):
        load_model(tmp_path / "missing")
