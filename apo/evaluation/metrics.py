"""Report-generation metrics: NLG (pycocoevalcap) and clinical efficacy (CheXpert labels of the texts).

`nlg_scores(references, hypotheses)` -> {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}: the pycocoevalcap 1.2
scorers the report-generation literature uses (R2Gen and followers), corpus-level, after the PTB tokenizer (lower
case, punctuation removed). Both PTBTokenizer and METEOR run on Java. Without `java` on PATH: METEOR is None (a
warning says why) and the tokenizer falls back to `simple_tokenize` (lower case, the PTB punctuation tokens split
off and dropped, whitespace split); BLEU/ROUGE-L/CIDEr then differ slightly from the Java numbers.

`clinical_efficacy(refs, hyps, uncertain="positive")` -> micro/macro precision/recall/F1 over the 14 CheXpert
observations of the labels of the hypotheses against those of the references (texts are labelled with
`apo.evaluation.labeler.label`, or pass label dicts; `labeler=` swaps in another labeler, e.g.
`chexbert_labeler(path)`).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from apo.constants import OBSERVATIONS
from apo.errors import ApoError
from apo.evaluation.labeler import label

log = logging.getLogger(__name__)

NLG_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# ----------------------------------------------------------------------------- NLG

# pycocoevalcap's PTBTokenizer drops these tokens after tokenising.
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_SIMPLE_TOKEN = re.compile(r"\.\.\.|--|[.?!,:;`'()\[\]{}-]|[^\s.?!,:;`'()\[\]{}-]+")


def simple_tokenize(text: str) -> str:
    """The Java-free fallback for PTBTokenizer: lower-case, split punctuation off words, drop PTB's punctuation
    tokens and brackets, join with single spaces. "Small left effusion." -> "small left effusion"."""
    toks = _SIMPLE_TOKEN.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in toks if t not in _PTB_PUNCT and t not in "()[]{}")


def _as_refs(r) -> list[str]:
    return [r] if isinstance(r, str) else list(r)


def nlg_scores(references: list, hypotheses: list[str]) -> dict:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr of `hypotheses` against `references` (one string, or a list of
    strings, per hypothesis). Empty hypotheses score 0; None counts as empty."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(hypotheses):
        raise ApoError(f"nlg_scores: {len(references)} references but {len(hypotheses)} hypotheses")
    if not hypotheses:
        return dict.fromkeys(NLG_KEYS)
    gts = {i: [{"caption": t or ""} for t in _as_refs(r)] for i, r in enumerate(references)}
    res = {i: [{"caption": h or ""}] for i, h in enumerate(hypotheses)}
    java = shutil.which("java") is not None
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        both = PTBTokenizer().tokenize(
            {
                **{("g", k): v for k, v in gts.items()},  # one JVM for both sides
                **{("r", k): v for k, v in res.items()},
            }
        )
        gts = {k: both[("g", k)] for k in gts}
        res = {k: both[("r", k)] for k in res}
    else:
        log.warning(
            "java not found on PATH: METEOR is not computed (None) and the PTB tokenizer is replaced by "
            "apo.evaluation.metrics.simple_tokenize (install a JRE, e.g. openjdk-17-jre-headless, for the exact "
            "numbers)"
        )
        gts = {k: [simple_tokenize(c["caption"]) for c in v] for k, v in gts.items()}
        res = {k: [simple_tokenize(c["caption"]) for c in v] for k, v in res.items()}
    out = dict.fromkeys(NLG_KEYS)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update(zip(NLG_KEYS[:4], map(float, bleu)))
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if java:
        out["METEOR"] = _meteor(gts, res)
    return out


def _meteor(gts, res) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    try:
        return float(m.compute_score(gts, res)[0])
    finally:  # do not leave a JVM per call behind
        m.meteor_p.stdin.close()
        m.meteor_p.kill()
        m.meteor_p.wait()


# ----------------------------------------------------------------------------- clinical efficacy

UNCERTAIN_POLICIES = ("positive", "negative", "ignore")


def _labels(x, labeler) -> dict:
    if isinstance(x, dict):
        return x
    return labeler(x or "")


def _binary(v, uncertain: str):
    """1 / 0, or None when the pair is to be ignored. Unmentioned (None) is negative, as in R2Gen and CheXbert F1."""
    if v == -1:
        return {"positive": 1, "negative": 0, "ignore": None}[uncertain]
    return 1 if v == 1 else 0


def _prf(tp, fp, fn) -> tuple[float, float, float]:
    # sklearn's zero_division=0: an undefined precision/recall/F1 counts as 0 (R2Gen's compute_ce reports these).
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def clinical_efficacy(
    refs: list, hyps: list, uncertain: str = "positive", labeler=None, observations=OBSERVATIONS
) -> dict:
    """Clinical efficacy (CE): precision/recall/F1 of the hypotheses' CheXpert labels against the references'.

    `refs`, `hyps`: texts (labelled with `labeler`, default `apo.evaluation.labeler.label`) or label dicts
    {obs: 1|0|-1|None}.
    Per observation, a report counts as positive when its label is 1; unmentioned (None) and negative (0) count as
    negative; uncertain (-1) follows `uncertain`:
      "positive" (default)  -1 -> 1. The convention of the CheXbert-based CE / F1-CheXbert used in the report
                            generation literature since Miura et al. 2021 ("Improving factual completeness and
                            consistency of image-to-text radiology report generation"), e.g. `f1chexbert`'s
                            `get_label(mode="rrg")`, which maps CheXbert's "uncertain" class to 1.
      "negative"            -1 -> 0. R2Gen's `compute_ce.py` (Chen et al. 2020, and the many papers reusing it)
                            fills blanks and -1 with 0 before sklearn's scores: pass this to compare with those.
      "ignore"              a (report, observation) pair where either side is -1 is left out of the counts.
    micro: pooled TP/FP/FN over all (report, observation) pairs; macro: the mean over `observations` (all 14,
    No Finding included, as R2Gen does) of per-observation scores, an undefined score counting 0 (sklearn's
    zero_division=0). `per_observation` gives each one's precision/recall/F1/support/TP/FP/FN.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ApoError(f"clinical_efficacy: uncertain must be one of {UNCERTAIN_POLICIES}, not {uncertain!r}")
    if len(refs) != len(hyps):
        raise ApoError(f"clinical_efficacy: {len(refs)} references but {len(hyps)} hypotheses")
    labeler = labeler or label
    counts = {o: [0, 0, 0, 0] for o in observations}  # tp, fp, fn, support
    for r, h in zip(refs, hyps):
        rl, hl = _labels(r, labeler), _labels(h, labeler)
        for o in observations:
            t, p = _binary(rl.get(o), uncertain), _binary(hl.get(o), uncertain)
            if t is None or p is None:
                continue
            c = counts[o]
            c[0] += t and p
            c[1] += p and not t
            c[2] += t and not p
            c[3] += t
    per = {}
    for o, (tp, fp, fn, sup) in counts.items():
        p, r, f = _prf(tp, fp, fn)
        per[o] = {"precision": p, "recall": r, "f1": f, "support": sup, "tp": tp, "fp": fp, "fn": fn}
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    micro = dict(zip(("precision", "recall", "f1"), _prf(tp, fp, fn)))
    macro = {k: sum(v[k] for v in per.values()) / max(len(per), 1) for k in ("precision", "recall", "f1")}
    return {"micro": micro, "macro": macro, "per_observation": per, "uncertain": uncertain, "n": len(refs)}


# ----------------------------------------------------------------------------- optional CheXbert

CHEXBERT_CONDITIONS = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)


def chexbert_labeler(checkpoint, tokenizer_dir=None, device: str = "cpu"):
    """A labeler (text -> {obs: 1|0|-1|None}) from CheXbert weights the user supplies (Smit et al. 2020,
    stanfordmlgroup/CheXbert `chexbert.pth`); nothing is ever downloaded. `tokenizer_dir`: a bert-base-uncased
    tokenizer folder (vocab.txt), default: the checkpoint's folder. The BERT size is read off the weights.
    Pass the result as `clinical_efficacy(..., labeler=...)`."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ApoError(
            f"--chexbert {checkpoint}: no such file (CheXbert weights are never downloaded; get "
            "chexbert.pth from the CheXbert authors and pass its path)"
        )
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else path.parent
    if not (tok_dir / "vocab.txt").is_file():
        raise ApoError(
            f"--chexbert: no bert-base-uncased tokenizer (vocab.txt) in {tok_dir}; put one next to the "
            "checkpoint or pass its folder"
        )
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and dicts only: no code from a pickle
    state = state.get("model_state_dict", state)
    state = {k.replace("module.", ""): v for k, v in state.items()}
    words = state["bert.embeddings.word_embeddings.weight"]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("bert.encoder.layer."))
    hidden = words.shape[1]
    cfg = BertConfig(
        vocab_size=words.shape[0],
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state["bert.embeddings.position_embeddings.weight"].shape[0],
    )
    bert = BertModel(cfg, add_pooling_layer=False)
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, 4) for _ in range(13)] + [torch.nn.Linear(hidden, 2)])
    bert.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("bert.") and "pooler" not in k})
    heads.load_state_dict({k[len("linear_heads.") :]: v for k, v in state.items() if k.startswith("linear_heads.")})
    bert.to(device).eval()
    heads.to(device).eval()
    tokenizer = BertTokenizer.from_pretrained(str(tok_dir))
    classes = {0: None, 1: 1, 2: 0, 3: -1}  # CheXbert: blank, positive, negative, uncertain

    @torch.no_grad()
    def label(text: str) -> dict:
        ids = tokenizer(" ".join(text.split()), truncation=True, max_length=512, return_tensors="pt").to(device)
        cls = bert(**ids).last_hidden_state[:, 0]
        out = dict.fromkeys(OBSERVATIONS)
        for name, head in zip(CHEXBERT_CONDITIONS, heads):
            out[name] = classes[int(head(cls).argmax(-1))]
        return out

    return label
