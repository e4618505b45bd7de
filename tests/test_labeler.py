"""apo.evaluation.labeler: mentions, negation, uncertainty, scope, No Finding, laterality, refusals; validation on
IU reports."""

import importlib.util
from pathlib import Path

import pytest

from apo.constants import OBSERVATIONS
from apo.evaluation.labeler import is_refusal, label, label_many, laterality


def pos(text):
    """The observations a text labels, without the None ones."""
    return {k: v for k, v in label(text).items() if v is not None}


@pytest.mark.parametrize(
    "text, obs, want",
    [
        # synonyms
        ("Small right pleural effusion.", "Pleural Effusion", 1),
        ("Blunting of the left costophrenic angle.", "Pleural Effusion", 1),
        ("Enlarged heart.", "Cardiomegaly", 1),
        ("The heart size is mildly enlarged.", "Cardiomegaly", 1),
        ("Cardiomegaly.", "Cardiomegaly", 1),
        ("Moderate left pneumothorax.", "Pneumothorax", 1),
        ("Bibasilar atelectasis.", "Atelectasis", 1),
        ("Volume loss in the left lower lobe.", "Atelectasis", 1),
        ("Right lower lobe consolidation.", "Consolidation", 1),
        ("Patchy airspace disease at the right base.", "Lung Opacity", 1),
        ("Pulmonary vascular congestion.", "Edema", 1),
        ("Mild interstitial edema.", "Edema", 1),
        ("Left lower lobe pneumonia.", "Pneumonia", 1),
        ("Right upper lobe infiltrate.", "Lung Opacity", 1),
        ("A 1 cm nodule in the left upper lobe.", "Lung Lesion", 1),
        ("Right hilar mass.", "Lung Lesion", 1),
        ("Healed left rib fractures.", "Fracture", 1),
        ("Endotracheal tube 4 cm above the carina.", "Support Devices", 1),
        ("Right internal jugular catheter tip in the SVC.", "Support Devices", 1),
        ("Dual-chamber pacemaker.", "Support Devices", 1),
        ("Sternotomy wires are intact.", "Support Devices", 1),
        ("Left PICC line in place.", "Support Devices", 1),
        ("Widened mediastinum.", "Enlarged Cardiomediastinum", 1),
        ("Apical pleural thickening.", "Pleural Other", 1),
        # negation
        ("No pleural effusion or pneumothorax.", "Pneumothorax", 0),
        ("No pleural effusion or pneumothorax.", "Pleural Effusion", 0),
        ("Lungs are clear without focal consolidation, effusion, or pneumothorax.", "Consolidation", 0),
        ("Free of pneumothorax.", "Pneumothorax", 0),
        ("Negative for pneumonia.", "Pneumonia", 0),
        ("The pneumothorax has resolved.", "Pneumothorax", 0),
        ("No evidence of edema.", "Edema", 0),
        ("The lungs are clear of consolidation.", "Consolidation", 0),
        ("Pneumothorax is not seen.", "Pneumothorax", 0),
        ("The heart is not enlarged.", "Cardiomegaly", 0),
        ("The heart is not significantly enlarged.", "Cardiomegaly", 0),
        ("Normal heart size.", "Cardiomegaly", 0),
        ("The cardiomediastinal silhouette is within normal limits.", "Enlarged Cardiomediastinum", 0),
        ("The lungs are clear.", "Lung Opacity", 0),
        ("The costophrenic angles are sharp.", "Pleural Effusion", 0),
        ("Tubes and lines have been removed.", "Support Devices", 0),
        # pseudo-negation: the finding is there
        ("No change in the small left pleural effusion.", "Pleural Effusion", 1),
        # uncertainty
        ("Opacity may represent early pneumonia.", "Pneumonia", -1),
        ("Cannot exclude a small left pneumothorax.", "Pneumothorax", -1),
        ("A small pneumothorax cannot be excluded.", "Pneumothorax", -1),
        ("Possible small left effusion.", "Pleural Effusion", -1),
        ("Findings suggestive of pulmonary edema.", "Edema", -1),
        ("Likely atelectasis.", "Atelectasis", -1),
        ("Atelectasis versus pneumonia at the right base.", "Pneumonia", -1),
        ("Question of a right upper lobe nodule.", "Lung Lesion", -1),
        ("Heart size is upper limits of normal.", "Cardiomegaly", -1),
        ("Borderline cardiomegaly.", "Cardiomegaly", -1),
        ("Pneumonia?", "Pneumonia", -1),
        # "may represent" qualifies what follows it, not the opacity before it
        ("Right basilar opacity which may represent atelectasis.", "Lung Opacity", 1),
        ("Right basilar opacity which may represent atelectasis.", "Atelectasis", -1),
        # scope: negation ends at "but", "however", ";"
        ("No pneumothorax, but there is a small right effusion.", "Pleural Effusion", 1),
        ("No pneumothorax; small right effusion.", "Pleural Effusion", 1),
        ("There is no effusion, however there is mild cardiomegaly.", "Cardiomegaly", 1),
        ("No pneumothorax. Left lower lobe atelectasis.", "Atelectasis", 1),
        ("Stable cardiomegaly without pulmonary edema.", "Cardiomegaly", 1),
        ("Stable cardiomegaly without pulmonary edema.", "Edema", 0),
        # aggregation: positive beats negative across sentences
        ("No effusion on the right. Small left pleural effusion.", "Pleural Effusion", 1),
        ("Possible effusion. No definite effusion.", "Pleural Effusion", -1),
    ],
)
def test_label(text, obs, want):
    assert label(text)[obs] == want, (text, pos(text))


def test_list_style_answers():
    """How chat models write: headings name a topic without asserting it; "X: absent" is a negation."""
    text = (
        "**Findings supporting atelectasis:**\n- Linear opacity in the left lower lobe\n- Mild volume loss\n\n"
        "**Pleural effusion:**\n- No blunting of the costophrenic angles; no effusion."
    )
    out = label(text)
    assert out["Atelectasis"] == 1 and out["Pleural Effusion"] == 0
    out = label("Pleural effusion: absent. Pneumothorax - none. Cardiomegaly: present. Edema: possible.")
    assert (out["Pleural Effusion"], out["Pneumothorax"], out["Cardiomegaly"], out["Edema"]) == (0, 0, 1, -1)
    assert (
        label("Lungs: clear.")["Lung Opacity"] == 0 and label("Findings: small left effusion.")["Pleural Effusion"] == 1
    )


def test_all_fourteen_keys_and_not_mentioned():
    out = label("Left lower lobe consolidation.")
    assert tuple(out) == OBSERVATIONS
    assert out["Pneumothorax"] is None and out["Fracture"] is None


def test_no_finding_rule():
    # No Finding = 1 when nothing but Support Devices is positive or uncertain ...
    assert label("No acute cardiopulmonary abnormality. The lungs are clear.")["No Finding"] == 1
    assert label("Endotracheal tube in place. No pneumothorax.")["No Finding"] == 1
    # ... and 0 as soon as one is positive or uncertain
    assert label("Small left pleural effusion. Otherwise normal.")["No Finding"] == 0
    assert label("Possible left lower lobe pneumonia.")["No Finding"] == 0
    # CheXpert: "heart failure" / CHF also make cardiomegaly uncertain
    out = label("Findings of congestive heart failure.")
    assert out["Edema"] == 1 and out["Cardiomegaly"] == -1 and out["No Finding"] == 0


def test_refusals_and_empty_give_all_none():
    for text in [
        "I cannot provide a diagnosis.",
        "I'm sorry, but I cannot provide a medical diagnosis from this image. Please consult a qualified radiologist.",
        "As an AI, I am unable to interpret medical images.",
        "",
        "   ",
        None,
    ]:
        assert all(v is None for v in label(text).values()), text
    assert is_refusal("I cannot provide a diagnosis. Please consult a radiologist.")
    assert not is_refusal("Small left pleural effusion.")
    # a hedge that still reports findings keeps them
    out = label("I cannot provide a definitive diagnosis, but there is a large right pleural effusion.")
    assert out["Pleural Effusion"] == 1 and out["No Finding"] == 0


def test_laterality():
    assert laterality("Small right pleural effusion.") == {"Pleural Effusion": "right"}
    assert laterality("Blunting of the left costophrenic angle.") == {"Pleural Effusion": "left"}
    assert laterality("Bilateral pleural effusions.") == {"Pleural Effusion": "bilateral"}
    assert laterality("Pleural effusions, right greater than left.") == {"Pleural Effusion": "bilateral"}
    assert laterality("Small right effusion. Small left effusion.") == {"Pleural Effusion": "bilateral"}
    assert laterality("Opacity in the left lower lobe.") == {"Lung Opacity": "left"}
    assert laterality("Bibasilar atelectasis.") == {"Atelectasis": "bilateral"}
    got = laterality("Right pneumothorax and left lower lobe consolidation.")
    assert got["Pneumothorax"] == "right" and got["Consolidation"] == "left"
    # negated or side-less findings have no side; cardiomegaly is never lateral
    assert laterality("No left pneumothorax. Cardiomegaly.") == {}
    assert laterality("Possible small left effusion.") == {"Pleural Effusion": "left"}  # uncertain counts


def test_label_many_and_speed():
    import time

    texts = ["No pleural effusion or pneumothorax.", "Small right pleural effusion.", "Cardiomegaly."]
    assert label_many(texts) == [label(t) for t in texts]
    # 10k sentences/s order: unique sentences, so the per-sentence cache does not help
    sents = [
        f"There is a {i} mm nodule in the right upper lobe, possibly a granuloma, but no effusion." for i in range(2000)
    ]
    t0 = time.perf_counter()
    label_many(sents)
    assert len(sents) / (time.perf_counter() - t0) > 1500  # ~8k/s here; a generous floor for a loaded CI box


def _validate_module():
    path = Path(__file__).resolve().parents[1] / "scripts" / "validate_labeler.py"
    spec = importlib.util.spec_from_file_location("validate_labeler", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mesh_mapping():
    v = _validate_module()
    truth, sides = v.tags_to_truth(
        [
            "Pleural Effusion/right/small",
            "Cardiomegaly/borderline",
            "Opacity/lung/base/left",
            "Calcified Granuloma/lung",
        ]
    )
    assert truth["Pleural Effusion"] == 1 and sides["Pleural Effusion"] == "right"
    assert truth["Cardiomegaly"] is None  # borderline: uncertain, left out
    assert truth["Lung Opacity"] == 1 and sides["Lung Opacity"] == "left"
    assert truth["Lung Lesion"] == 0 and truth["No Finding"] == 0
    truth, _ = v.tags_to_truth(["normal"])
    assert truth["No Finding"] == 1 and sum(truth[o] for o in OBSERVATIONS) == 1


def test_validation_on_real_iu_reports():
    """The validation function runs on the first real IU reports and the labeler agrees with their MeSH tags."""
    v = _validate_module()
    reports = v.read_iu_reports(limit=200)
    assert len(reports) == 200 and all("text" in r and "tags" in r for r in reports)
    res = v.validate(reports)
    assert res["n_reports"] > 180
    rows = res["rows"]
    assert rows["No Finding"]["support"] > 80
    assert rows["No Finding"]["f1"] > 0.9 and rows["Cardiomegaly"]["f1"] > 0.85 and res["micro"]["f1"] > 0.85
    table = v.markdown_table(res)
    assert table.count("\n| ") >= 16 and "| Pleural Effusion |" in table
