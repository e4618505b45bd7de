"""Seven simulated teachers, named like CXR-MAX's, each drifting in its own documented way.

Every teacher sees the case's truth and the question, and writes a reasoning trajectory: a few sentences on the
imaging basis of each finding it reports, a pertinent negative or two, then a conclusion. Before writing, the
teacher's drift profile perturbs what it will say:

  GPT-5-nano             terse and precise; omits minor findings (support devices, atelectasis, small findings)
  Gemini-2.5-flash-lite  puts lateral findings on the wrong side
  Claude-Sonnet-4        verbose; hedges ("may represent", "cannot be excluded"), i.e. uncertain where truth is certain
  Grok-4                 confident; hallucinates a finding the image does not have
  Qwen-VL-Max            structured and mostly right, but drifts late: the longer the answer, the likelier a finding
                         the image lacks is appended after the conclusion
  GLM-4.5V               omits findings, any of them
  Moonshot-v1            refuses a fraction of questions ("I cannot provide a medical diagnosis ...")

Each error is drawn independently per teacher, so a teacher is wrong in its own way while the majority of teachers is
right on almost every finding: a vote recovers the truth, and SFT on all seven inherits every teacher's drift.
Rates are parameters (`DEFAULT_PROFILES`, written to `teachers.json`); `measure()` re-derives them from the text.
"""

from __future__ import annotations

import copy
import re

from apo.constants import TEACHERS
from apo.evaluation.labeler import is_refusal
from apo.world.synth.reports import LATERAL, severity_word, split_sentences, tag

RATES = ("omit", "omit_minor", "wrong_side", "hedge", "hallucinate", "late_add_base", "late_add_per_sentence", "refuse")

DEFAULT_PROFILES = {
    "GPT-5-nano": {
        "style": "terse",
        "negatives": 1,
        "omit_minor": 0.6,
        "drift": "terse and precise; omits minor findings (support devices, atelectasis, small findings)",
    },
    "Gemini-2.5-flash-lite": {
        "style": "plain",
        "negatives": 1,
        "wrong_side": 0.45,
        "drift": "wrong side (left/right) on lateral findings",
    },
    "Claude-Sonnet-4": {
        "style": "verbose",
        "negatives": 3,
        "hedge": 0.45,
        "drift": "verbose; hedges findings with uncertainty (may represent, cannot be excluded)",
    },
    "Grok-4": {
        "style": "confident",
        "negatives": 1,
        "hallucinate": 0.45,
        "drift": "hallucinates an extra finding the image does not show",
    },
    "Qwen-VL-Max": {
        "style": "structured",
        "negatives": 2,
        "late_add_base": 0.0,
        "late_add_per_sentence": 0.06,
        "drift": "mostly correct, drifts late in long answers: appends a finding after the conclusion",
    },
    "GLM-4.5V": {"style": "plain", "negatives": 1, "omit": 0.35, "drift": "omits findings"},
    "Moonshot-v1": {
        "style": "brief",
        "negatives": 1,
        "refuse": 0.35,
        "drift": "refuses a fraction of questions (no medical diagnosis)",
    },
}
assert tuple(DEFAULT_PROFILES) == TEACHERS


def profiles(overrides: dict | None = None) -> dict:
    """Default profiles with every rate present, updated by `overrides` {teacher: {key: value}}."""
    out = copy.deepcopy(DEFAULT_PROFILES)
    for name, p in out.items():
        for k in RATES:
            p.setdefault(k, 0.0)
        p.update((overrides or {}).get(name, {}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sentence material. {s}: side word, {sev}: small/moderate/large, {zone}: upper/mid/lower. Every sentence that
# reports a finding names it, so the tagger (and any CheXpert-style labeler) reads what the teacher meant.

BASIS = {
    "Pleural Effusion": {
        "lateral": [
            "There is blunting of the {s} costophrenic angle with a meniscus-shaped density at the {s} base, "
            "consistent with a {sev} {s} pleural effusion.",
            "Homogeneous density layers at the {s} lung base and obscures the {s} hemidiaphragm, in keeping "
            "with a {sev} {s} pleural effusion.",
            "The {s} costophrenic angle is blunted by a {sev} {s} pleural effusion with a meniscus sign.",
        ],
        "bilateral": [
            "Both costophrenic angles are blunted with meniscus-shaped densities at the bases, consistent "
            "with {sev} bilateral pleural effusions.",
            "Dense fluid layers at both lung bases and obscures the hemidiaphragms, in keeping with {sev} "
            "bilateral pleural effusions.",
        ],
        "terse": ["Blunted {s} costophrenic angle: {s} pleural effusion.", "{S} basal meniscus: {s} pleural effusion."],
        "hedged": [
            "Blunting of the {s} costophrenic angle may represent a {s} pleural effusion.",
            "A small {s} pleural effusion cannot be excluded given the blunted {s} costophrenic angle.",
        ],
    },
    "Pneumothorax": {
        "lateral": [
            "At the {s} apex a thin visceral pleural line is visible and lung markings are absent beyond it, "
            "indicating a {sev} {s} pneumothorax.",
            "A lucent rim devoid of vascular markings along the {s} apex and lateral chest wall, bounded by "
            "the pleural line, represents a {sev} {s} pneumothorax.",
        ],
        "bilateral": ["Thin pleural lines with absent lung markings at both apices indicate bilateral pneumothoraces."],
        "terse": ["{S} apical pleural line, absent markings beyond: {s} pneumothorax."],
        "hedged": [
            "A faint lucency at the {s} apex may represent a small {s} pneumothorax.",
            "A small {s} apical pneumothorax cannot be excluded.",
        ],
    },
    "Cardiomegaly": {
        "central": [
            "The cardiac silhouette is enlarged, with a cardiothoracic ratio above 0.5, consistent with cardiomegaly.",
            "The transverse diameter of the heart exceeds half of the thoracic diameter, indicating cardiomegaly.",
            "The heart is enlarged, with its left border extending toward the lateral chest wall, "
            "consistent with cardiomegaly.",
        ],
        "terse": ["Cardiothoracic ratio above 0.5: cardiomegaly.", "Enlarged cardiac silhouette: cardiomegaly."],
        "hedged": [
            "The cardiac silhouette appears prominent and may reflect mild cardiomegaly.",
            "Cardiomegaly is possible, although the projection limits assessment of heart size.",
        ],
    },
    "Atelectasis": {
        "lateral": [
            "A linear plate-like opacity at the {s} lung base with mild volume loss is consistent with {s} "
            "basilar atelectasis.",
            "Band-like opacity in the {s} lower zone indicates {s} basilar atelectasis.",
        ],
        "bilateral": ["Plate-like opacities at both lung bases are consistent with bibasilar atelectasis."],
        "terse": ["{S} basal linear opacity: {s} atelectasis."],
        "hedged": [
            "A linear opacity at the {s} base likely represents {s} basilar atelectasis.",
            "Streaky {s} basilar opacity may reflect atelectasis.",
        ],
    },
    "Consolidation": {
        "lateral": [
            "There is a patchy confluent opacity in the {s} {zone} lung zone, consistent with {s} {zone} "
            "lung consolidation.",
            "Airspace opacity with air bronchograms occupies the {s} {zone} zone, indicating {s} consolidation.",
        ],
        "bilateral": ["Patchy confluent opacities in both {zone} zones indicate bilateral consolidation."],
        "terse": ["{S} {zone} zone airspace opacity: {s} consolidation."],
        "hedged": [
            "Patchy opacity in the {s} {zone} zone may represent {s} consolidation.",
            "{S} {zone} zone consolidation cannot be excluded.",
        ],
    },
    "Pneumonia": {
        "lateral": [
            "There is a focal airspace opacity in the {s} {zone} lung zone, in keeping with {s} {zone} lung pneumonia.",
            "Patchy airspace opacity in the {s} {zone} zone indicates {s} pneumonia.",
        ],
        "bilateral": ["Patchy airspace opacities in both {zone} zones are in keeping with bilateral pneumonia."],
        "terse": ["{S} {zone} zone airspace opacity: {s} pneumonia."],
        "hedged": [
            "The {s} {zone} zone airspace opacity is suspicious for {s} pneumonia.",
            "{S} {zone} zone opacity could represent pneumonia.",
        ],
    },
    "Edema": {
        "central": [
            "There is bilateral perihilar haziness with indistinct vascular margins and septal lines at the "
            "bases, consistent with pulmonary edema.",
            "Perihilar airspace haziness in a bat-wing distribution with Kerley B lines indicates pulmonary edema.",
        ],
        "terse": ["Perihilar haze and Kerley B lines: pulmonary edema."],
        "hedged": [
            "Perihilar haziness may reflect mild pulmonary edema.",
            "Pulmonary edema cannot be excluded given the perihilar haziness.",
        ],
    },
    "Lung Lesion": {  # never drawn: only ever hallucinated
        "lateral": [
            "A well-circumscribed nodule projects over the {s} mid lung zone.",
            "There is a rounded nodule in the {s} mid lung.",
        ],
        "terse": ["{S} mid lung nodule."],
        "hedged": ["A rounded density in the {s} mid lung may represent a nodule."],
    },
}
DEVICES = {
    "central_line": "A {s} internal jugular central venous catheter projects with its tip over the superior vena cava.",
    "picc": "A {s} upper extremity PICC is present with its tip near the cavoatrial junction.",
    "pacemaker": "A {s} chest wall pacemaker is present with leads projecting over the right atrium and ventricle.",
    "et_tube": "An endotracheal tube is present with its tip above the carina.",
}
NEGATIVES = {
    "Pleural Effusion": [
        "There is no pleural effusion.",
        "The costophrenic angles are sharp, without pleural effusion.",
    ],
    "Pneumothorax": ["No pneumothorax is seen.", "There is no pneumothorax."],
    "Cardiomegaly": ["The heart size is normal.", "The cardiac silhouette is within normal limits."],
    "Consolidation": ["There is no focal consolidation.", "No consolidation is identified."],
    "Edema": ["There is no pulmonary edema.", "No pulmonary edema is seen."],
}
REFUSALS = [
    "I'm sorry, but I cannot provide a medical diagnosis from this image. Please consult a qualified radiologist or "
    "physician for an interpretation of this chest X-ray.",
    "I cannot provide medical diagnoses or interpret medical images for clinical decisions. A licensed radiologist "
    "should review this study.",
    "As an AI assistant, I cannot provide a medical diagnosis. Please seek the opinion of a qualified healthcare "
    "professional who can review the image in its clinical context.",
]
OPENERS = {
    "verbose": [
        "Reviewing this frontal chest radiograph systematically, I will describe the relevant findings.",
        "On this frontal chest radiograph, several features deserve attention.",
    ],
    "structured": ["Findings:"],
    "confident": ["The image is clear."],
}
HEDGED_ANY = [
    "There is a subtle density that may represent {name}.",
    "{Name} cannot be excluded.",
    "The appearance is equivocal, possibly reflecting {name}.",
]
FILLER = [
    "This finding is clearly visible on the frontal projection.",
    "This is a relevant observation for the stated diagnosis.",
    "The appearance is typical on a frontal view.",
]
HALLUCINATABLE = (
    "Pleural Effusion",
    "Pneumothorax",
    "Cardiomegaly",
    "Atelectasis",
    "Consolidation",
    "Edema",
    "Lung Lesion",
)
MINOR = ("Support Devices", "Atelectasis")


def finding_name(obs: str, side: str | None, zone: str | None = None) -> str:
    name = {
        "Pleural Effusion": "pleural effusion",
        "Pneumothorax": "pneumothorax",
        "Edema": "pulmonary edema",
        "Lung Lesion": "lung nodule",
    }.get(obs, obs.lower())
    if side == "bilateral":
        name = {"pleural effusion": "pleural effusions", "pneumothorax": "pneumothoraces"}.get(name, name)
    if obs in ("Consolidation", "Pneumonia") and zone:
        name = f"{zone} lung {name}"
    return f"{side} {name}" if side and obs in LATERAL else name


def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fill(template: str, side, f: dict) -> str:
    s = side or ""
    text = template.format(
        s=s, S=s.capitalize(), sev=severity_word(f.get("severity", 0.5)), zone=f.get("zone") or "lower"
    )
    return re.sub(r"\s+", " ", text)


def basis_sentence(obs: str, side, f: dict, mode: str, rng) -> str:
    """One sentence reporting `obs` in `mode` ("plain" | "terse" | "hedged")."""
    if obs == "Support Devices":
        return _fill(DEVICES[f.get("device", "central_line")], f.get("side") or "right", f)
    bank = BASIS[obs]
    if mode == "hedged" and side == "bilateral":  # the finding-specific hedges are written for one side
        name = finding_name(obs, side, f.get("zone"))
        return HEDGED_ANY[int(rng.integers(len(HEDGED_ANY)))].format(name=name, Name=name[0].upper() + name[1:])
    if mode in ("terse", "hedged") and mode in bank and (side != "bilateral" or obs not in LATERAL):
        pool = bank[mode]
    elif obs in LATERAL:
        pool = bank["bilateral"] if side == "bilateral" and "bilateral" in bank else bank["lateral"]
    else:
        pool = bank["central"]
    return _fill(pool[int(rng.integers(len(pool)))], side, f)


def _other_side(side, rng):
    if side == "right":
        return "left"
    if side == "left":
        return "right"
    return "right" if rng.random() < 0.5 else "left"


def answer(teacher: str, truth: dict, profile: dict, rng) -> tuple[str, dict]:
    """(trajectory text, events) for one teacher on one case. `truth`: {obs: {side, severity, zone, device}}."""
    p = profile
    if rng.random() < p["refuse"]:
        return REFUSALS[int(rng.integers(len(REFUSALS)))], {"refused": True}
    events = {"refused": False, "omitted": [], "wrong_side": [], "hedged": [], "hallucinated": [], "late_added": []}
    said = []  # (obs, side, f, mode)
    for obs, f in truth.items():
        minor = obs in MINOR or (obs != "Support Devices" and f.get("severity", 1.0) < 0.45)
        if rng.random() < p["omit"] or (minor and rng.random() < p["omit_minor"]):
            events["omitted"].append(obs)
            continue
        side = f.get("side")
        if obs in LATERAL and side and rng.random() < p["wrong_side"]:
            side = _other_side(side, rng)
            events["wrong_side"].append(obs)
        mode = "plain"
        if obs != "Support Devices" and rng.random() < p["hedge"]:
            mode = "hedged"
            events["hedged"].append(obs)
        said.append((obs, side, f, mode))

    def fake():  # a finding the image does not have (consolidation is too close to a pneumonia to count)
        absent = [o for o in HALLUCINATABLE if o not in truth and not (o == "Consolidation" and "Pneumonia" in truth)]
        obs = absent[int(rng.integers(len(absent)))]
        side = ("right", "left")[int(rng.integers(2))] if obs in LATERAL else None
        return obs, side, {"severity": float(rng.uniform(0.3, 0.6)), "zone": ("upper", "lower")[int(rng.integers(2))]}

    if rng.random() < p["hallucinate"]:
        obs, side, f = fake()
        said.insert(int(rng.integers(len(said) + 1)), (obs, side, f, "plain"))
        events["hallucinated"].append(obs)

    style = p["style"]
    sentences = list(OPENERS.get(style, []))
    if style in ("verbose", "structured") and len(sentences) > 1:
        sentences = [sentences[int(rng.integers(len(sentences)))]]
    for obs, side, f, mode in said:
        sentences.append(basis_sentence(obs, side, f, "terse" if style == "terse" and mode == "plain" else mode, rng))
        if style == "verbose" and mode == "plain" and obs != "Support Devices":
            sentences.append(FILLER[int(rng.integers(len(FILLER)))])
    reported = {o for o, *_ in said}
    negs = [o for o in NEGATIVES if o not in reported and o not in truth]
    for k in rng.permutation(len(negs))[: int(p["negatives"])]:
        pool = NEGATIVES[negs[k]]
        sentences.append(pool[int(rng.integers(len(pool)))])
    sentences.append(_conclusion(style, said, rng))
    # Late drift: the longer the answer, the likelier a finding is appended after the conclusion.
    p_late = p["late_add_base"] + p["late_add_per_sentence"] * len(sentences)
    if rng.random() < min(0.95, p_late):
        obs, side, f = fake()
        if obs not in reported:
            sentences.append(f"In addition, there is {_late_phrase(obs, side, f)}.")
            events["late_added"].append(obs)
    return " ".join(sentences), events


def _late_phrase(obs, side, f) -> str:
    sev = severity_word(f.get("severity", 0.5))
    name = finding_name(obs, side, f.get("zone"))
    return {
        "Cardiomegaly": "mild cardiomegaly",
        "Edema": "mild pulmonary edema",
        "Atelectasis": f"{side} basilar atelectasis",
    }.get(obs, f"a {sev} {name}")


def _conclusion(style, said, rng) -> str:
    pathologies = [(o, s, f, m) for o, s, f, m in said if o != "Support Devices"]
    if not pathologies:
        return {
            "terse": "Conclusion: no acute cardiopulmonary abnormality.",
            "verbose": "Taken together, these findings support the impression of no acute cardiopulmonary abnormality.",
            "structured": "Impression: the findings support no acute cardiopulmonary abnormality.",
        }.get(style, "These findings support the impression of no acute cardiopulmonary abnormality.")
    certain = [finding_name(o, s, f.get("zone")) for o, s, f, m in pathologies if m != "hedged"]
    hedged = [finding_name(o, s, f.get("zone")) for o, s, f, m in pathologies if m == "hedged"]
    if style == "terse":
        return f"Conclusion: {join(certain + hedged)}."
    if style == "verbose":
        text = "Taken together, these findings are consistent with " + (join(certain) if certain else "")
        if hedged:
            text += (", and possibly " if certain else "possible ") + join(hedged)
        return text + ", although correlation with the clinical history is recommended."
    if style == "structured":
        return f"Impression: these imaging features support the diagnosis of {join(certain + hedged)}."
    if style == "confident":
        return f"Diagnosis: {join(certain + hedged)}, with no doubt."
    return f"These findings support the diagnosis of {join(certain + hedged)}."


# ----------------------------------------------------------------------------------------------------------------
# Measuring drift from the text alone


def truth_items(truth: dict) -> set:
    """(obs, side) pairs a correct answer reports: lateral findings carry their side."""
    return {(o, f.get("side") if o in LATERAL else None) for o, f in truth.items()}


def said_items(text: str) -> set:
    """(obs, side) pairs a text asserts as certain (tagger label 1)."""
    t = tag(text)
    return {
        (o, v["side"] if o in LATERAL else None)
        for o, v in t.items()
        if v["label"] == 1 and o not in ("No Finding", "Lung Opacity", "Enlarged Cardiomediastinum")
    }


def measure(cases: list[dict]) -> dict:
    """Per-teacher drift rates measured on the texts, plus a majority vote against the truth.

    `cases`: [{"truth": {...}, "answers": {teacher: text}}]. Rates: omission and hedge per true finding, wrong side
    per lateral finding reported, hallucination and late addition per answered question, refusal per question;
    exact = the answer's certain (finding, side) set equals the truth's.
    """
    stats = {
        t: {
            k: 0
            for k in (
                "answers",
                "refused",
                "pos",
                "omitted",
                "hedged",
                "lateral",
                "wrong_side",
                "hallucinated",
                "late_added",
                "exact",
                "words",
            )
        }
        for t in TEACHERS
    }
    vote_exact = 0
    for c in cases:
        truth, want = c["truth"], truth_items(c["truth"])
        votes, voters = {}, 0
        for teacher, text in c["answers"].items():
            s = stats[teacher]
            s["answers"] += 1
            s["words"] += len(text.split())
            if is_refusal(text):
                s["refused"] += 1
                continue
            t = tag(text)
            for obs, f in truth.items():
                s["pos"] += 1
                lab = t.get(obs, {}).get("label")
                s["hedged"] += lab == -1
                s["omitted"] += lab not in (1, -1)
                if obs in LATERAL and lab in (1, -1) and t[obs]["side"]:
                    s["lateral"] += 1
                    s["wrong_side"] += t[obs]["side"] != f.get("side")
            got = said_items(text)
            extra = {o for o, _ in got} - set(truth)
            s["hallucinated"] += bool(extra)
            last = len(split_sentences(text)) - 1
            s["late_added"] += any(t[o]["sent"] == last for o in extra)
            s["exact"] += got == want
            voters += 1
            for item in got:
                votes[item] = votes.get(item, 0) + 1
        majority = {item for item, n in votes.items() if n > voters / 2}
        vote_exact += majority == want
    out = {}
    for teacher, s in stats.items():
        answered = max(1, s["answers"] - s["refused"])
        out[teacher] = {
            "answers": s["answers"],
            "mean_words": round(s["words"] / max(1, s["answers"]), 1),
            "refusal": round(s["refused"] / max(1, s["answers"]), 3),
            "omission": round(s["omitted"] / max(1, s["pos"]), 3),
            "hedge": round(s["hedged"] / max(1, s["pos"]), 3),
            "wrong_side": round(s["wrong_side"] / max(1, s["lateral"]), 3),
            "hallucination": round(s["hallucinated"] / answered, 3),
            "late_addition": round(s["late_added"] / answered, 3),
            "exact": round(s["exact"] / max(1, s["answers"]), 3),
        }
    out["majority_vote"] = {"exact": round(vote_exact / max(1, len(cases)), 3)}
    return out
