"""apo.evaluation.metrics: NLG scores equal pycocoevalcap's own scorers; clinical efficacy on a hand-checked example."""

import logging
import shutil

import pytest

from apo.errors import ApoError
from apo.evaluation.metrics import NLG_KEYS, chexbert_labeler, clinical_efficacy, nlg_scores, simple_tokenize

REFS = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Cardiomegaly with mild pulmonary edema. No focal consolidation.",
    "Right lower lobe consolidation, concerning for pneumonia.",
]
HYPS = [
    "Heart size is normal. There is no pleural effusion.",
    "Left pleural effusion and atelectasis at the left base.",
    "The heart is enlarged with pulmonary edema.",
    "",
]

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer and METEOR need Java"
)


@needs_java
def test_nlg_scores_equal_pycocoevalcap_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    both = PTBTokenizer().tokenize(
        {
            **{f"g{i}": [{"caption": r}] for i, r in enumerate(REFS)},  # one JVM start
            **{f"r{i}": [{"caption": h}] for i, h in enumerate(HYPS)},
        }
    )
    gts = {i: both[f"g{i}"] for i in range(len(REFS))}
    res = {i: both[f"r{i}"] for i in range(len(HYPS))}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    want = dict(zip(NLG_KEYS[:4], bleu))
    want["METEOR"] = Meteor().compute_score(gts, res)[0]
    want["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    want["CIDEr"] = Cider().compute_score(gts, res)[0]
    got = nlg_scores(REFS, HYPS)
    assert set(got) == set(NLG_KEYS)
    for k in NLG_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert 0 < got["BLEU-1"] < 1 and got["BLEU-4"] < got["BLEU-1"] and got["METEOR"] > 0  # HYPS[3] is empty


def test_nlg_identical_and_empty(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # the Java-free path: fast, same scorers
    same = nlg_scores(REFS, REFS)
    assert same["BLEU-1"] == pytest.approx(1.0) and same["ROUGE-L"] == pytest.approx(1.0)
    empty = nlg_scores(REFS[:2], ["", None])  # must not crash
    assert all(empty[k] == 0 for k in NLG_KEYS if k != "METEOR")
    assert nlg_scores([], []) == dict.fromkeys(NLG_KEYS)
    with pytest.raises(ApoError):
        nlg_scores(REFS, HYPS[:2])


def test_nlg_without_java(monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="apo.evaluation.metrics"):
        s = nlg_scores(REFS, HYPS)
    assert s["METEOR"] is None and "java not found" in caplog.text
    assert 0 < s["BLEU-1"] < 1 and s["ROUGE-L"] > 0 and s["CIDEr"] > 0


def test_simple_tokenize_matches_ptb_on_plain_text():
    assert simple_tokenize("Small LEFT effusion; no pneumothorax...") == "small left effusion no pneumothorax"
    assert simple_tokenize("Right-sided (PICC) line.") == "right sided picc line"


def test_clinical_efficacy_hand_checked():
    R = {"Pleural Effusion": 1, "Atelectasis": -1, "Cardiomegaly": 0}
    H = {"Pleural Effusion": 1, "Atelectasis": 1, "Edema": 1}
    # uncertain -> positive: PE tp, Atelectasis tp, Edema fp. No Finding absent on both sides: nothing.
    ce = clinical_efficacy([R], [H])
    assert ce["micro"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    per = ce["per_observation"]
    assert per["Atelectasis"]["tp"] == 1 and per["Edema"]["fp"] == 1 and per["Edema"]["f1"] == 0
    # macro over all 14, undefined counting 0: F1 = (1 + 1 + 0) / 14
    assert ce["macro"]["f1"] == pytest.approx(2 / 14)
    # uncertain -> negative (R2Gen): Atelectasis becomes a false positive
    ce = clinical_efficacy([R], [H], uncertain="negative")
    assert ce["micro"] == pytest.approx({"precision": 1 / 3, "recall": 1.0, "f1": 0.5})
    # ignore: the Atelectasis pair is left out
    ce = clinical_efficacy([R], [H], uncertain="ignore")
    assert ce["micro"]["precision"] == pytest.approx(1 / 2) and ce["per_observation"]["Atelectasis"]["support"] == 0
    with pytest.raises(ApoError):
        clinical_efficacy([R], [H], uncertain="maybe")


def test_clinical_efficacy_on_texts():
    refs = ["Small right pleural effusion. No pneumothorax.", "Cardiomegaly. Lungs are clear."]
    hyps = ["Right pleural effusion and a left pneumothorax.", "The heart size is normal."]
    ce = clinical_efficacy(refs, hyps)
    per = ce["per_observation"]
    assert (per["Pleural Effusion"]["tp"], per["Pneumothorax"]["fp"], per["Cardiomegaly"]["fn"]) == (1, 1, 1)
    # No Finding: ref 2 has cardiomegaly (0), hyp 2 says normal heart (1) -> a No Finding false positive
    assert per["No Finding"]["fp"] == 1 and ce["n"] == 2
    assert ce["micro"]["precision"] == pytest.approx(1 / 3) and ce["micro"]["recall"] == pytest.approx(1 / 2)


def test_chexbert_hook_never_downloads(tmp_path):
    with pytest.raises(ApoError, match="no such file"):
        chexbert_labeler(tmp_path / "chexbert.pth")
    (tmp_path / "chexbert.pth").write_bytes(b"")
    with pytest.raises(ApoError, match="vocab.txt"):
        chexbert_labeler(tmp_path / "chexbert.pth")


def test_chexbert_hook_loads_user_weights(tmp_path):
    """A tiny random CheXbert-shaped checkpoint loads and labels all 14 observations with CheXbert's classes."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "effusion", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    state = {f"module.bert.{k}": v for k, v in BertModel(cfg, add_pooling_layer=False).state_dict().items()}
    for i in range(14):
        head = torch.nn.Linear(32, 4 if i < 13 else 2)
        state[f"module.linear_heads.{i}.weight"], state[f"module.linear_heads.{i}.bias"] = head.weight, head.bias
    torch.save({"model_state_dict": state}, tmp_path / "chexbert.pth")
    lab = chexbert_labeler(tmp_path / "chexbert.pth")
    out = lab("No pleural effusion.")
    assert len(out) == 14 and all(v in (1, 0, -1, None) for v in out.values())
    assert out["No Finding"] in (1, None)  # its head has two classes: blank or positive
    ce = clinical_efficacy(["No pleural effusion."], ["No pleural effusion."], labeler=lab)
    assert ce["micro"]["precision"] in (0.0, 1.0)
