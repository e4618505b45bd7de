"""Report language: the real Indiana University reports, a small rule tagger, and ground-truth reports.

torchxrayvision ships 3,955 IU chest X-ray reports (`NLMCXR_reports.tgz`, CC BY-NC-ND 4.0). We read them from the
installed package at run time (never copied into the repo), split them into sentences and keep the ones a tagger can
fully account for: a sentence is usable for a case only if every finding it names agrees with the case's truth.
The same tagger measures the teachers' drift, so "what the text says" is defined in one place.

Side words follow the radiology convention: "right" is the patient's right (the left of the image).
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from collections import Counter

from apo.constants import OBSERVATIONS
from apo.errors import ApoError

# Findings that can sit on one side; the others are central (heart) or diffuse.
LATERAL = ("Pleural Effusion", "Pneumothorax", "Atelectasis", "Consolidation", "Pneumonia", "Lung Lesion")
# Findings whose presence implies CheXpert's parent "Lung Opacity".
OPACITY_CHILDREN = ("Atelectasis", "Consolidation", "Pneumonia", "Edema", "Lung Lesion")

# Surface forms. Order matters only for readability; every pattern is matched on lower-case text.
MENTIONS = {
    "Pleural Effusion": r"(?<!pericardial )\beffusions?\b",
    "Pneumothorax": r"\bpneumothora(?:x|ces)\b",
    "Cardiomegaly": r"\bcardiomegaly\b|\b(?:heart|cardiac silhouette|cardiac size|heart size)\b[a-z ]{0,30}\benlarged\b"
    r"|\benlarged (?:heart|cardiac silhouette)\b",
    "Enlarged Cardiomediastinum": r"\bwidened mediastinum\b|\bmediastin\w* (?:is )?widen",
    "Lung Opacity": r"\bopacit(?:y|ies)\b|\binfiltrates?\b|\bair ?space disease\b",
    "Lung Lesion": r"\bnodules?\b|\bmass(?:es)?\b|\blung lesion\b",
    "Edema": r"\bedema\b",
    "Consolidation": r"\bconsolidat\w*",
    "Pneumonia": r"\bpneumonia\b",
    "Atelectasis": r"\batelecta\w*",
    "Pleural Other": r"\bpleural thickening\b",
    "Fracture": r"\bfractures?\b",
    "Support Devices": r"\bcatheter\b|\bpacemaker\b|\bpicc\b|\bendotracheal tube\b|\btracheostomy tube\b"
    r"|\bcentral (?:venous )?line\b|\bsupport devices?\b|\bdefibrillator\b",
}
_MENTIONS = {k: re.compile(v) for k, v in MENTIONS.items()}
# Normal-heart and no-acute-disease phrasings are negative statements without a negation word.
_NORMAL_HEART = re.compile(
    r"\b(?:heart|cardiac|cardiomediastinal)\b[a-z ,]{0,40}\b(?:normal|within normal limits|"
    r"unremarkable|not (?:significantly )?enlarged)\b|\bnormal (?:heart|cardiac) size\b"
)
_NORMAL_MEDIASTINUM = re.compile(
    r"\b(?:cardiomediastinal|mediastin\w*)\b[a-z ,]{0,40}\b(?:normal|within normal limits|"
    r"unremarkable)\b|\bnormal heart size and mediastinal\b"
)
_NO_FINDING = re.compile(
    r"\bno acute (?:cardiopulmonary|cardiothoracic|intrathoracic|pulmonary|radiographic)\b"
    r"|\bno active (?:cardiopulmonary )?disease\b|\bno acute (?:disease|abnormalit\w*|findings?)\b"
    r"|\bnormal chest\b"
)
_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|absence of)\b")
_UNCERTAIN = re.compile(
    r"\b(?:may|might|possibl[ey]|probabl[ey]|likely|cannot be excluded|cannot exclude|"
    r"can not be excluded|not (?:be )?excluded|questionable|suspicious|"
    r"suggest\w*|concerning for|worrisome|could|versus|vs|differential)\b"
)
# "The right pneumothorax is not seen" / "... has resolved": negation after the mention.
_POST_NEGATION = re.compile(
    r"^[a-z ]{0,12}\b(?:is|are|has|have)? ?(?:not (?:seen|appreciated|identified|visualized|"
    r"present)|resolved|absent)\b"
)
_BREAK = re.compile(r"\b(?:but|however|although|though|whereas|except)\b|;")
_SIDE = re.compile(r"\b(right|left|bilateral|bilaterally|both|bibasilar|bibasal)\b")
_CHUNK = re.compile(r",|;|\band\b|\bwith\b|\bwithout\b")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _side_of(chunk: str | None) -> str | None:
    words = {m.group(1) for m in _SIDE.finditer(chunk)}
    if not words:
        return None
    if words & {"bilateral", "bilaterally", "both", "bibasilar", "bibasal"} or {"right", "left"} <= words:
        return "bilateral"
    return words.pop()


@functools.lru_cache(maxsize=65536)
def tag(text: str) -> dict[str, dict]:
    """What a text asserts: {observation: {"label": 1|0|-1, "side": str|None, "sent": index of first mention}}.
    Cached: treat the result as read-only.

    Per sentence: a mention after a negation cue (without a "but"/"however" in between) is negative, a mention in a
    sentence with a hedge word is uncertain, otherwise positive. Across sentences positive beats uncertain beats
    negative (CheXpert's aggregation). "No acute cardiopulmonary abnormality" gives No Finding only when the text
    asserts no finding at all.
    """
    out: dict[str, dict] = {}
    rank = {1: 3, -1: 2, 0: 1}
    no_finding_said = False
    for i, sent in enumerate(split_sentences(text.lower())):
        hedged = bool(_UNCERTAIN.search(sent))
        found = []
        for obs, pat in _MENTIONS.items():
            for m in pat.finditer(sent):
                found.append((m.start(), m.end(), obs))
        if _NORMAL_HEART.search(sent) and not _MENTIONS["Cardiomegaly"].search(sent):
            found.append((-1, -1, "Cardiomegaly*"))
        if _NORMAL_MEDIASTINUM.search(sent):
            found.append((-1, -1, "Enlarged Cardiomediastinum*"))
        no_finding_said |= bool(_NO_FINDING.search(sent))
        for start, end, obs in sorted(found):
            if obs.endswith("*"):  # a "normal" phrase: negative by construction
                label, side, obs = 0, None, obs[:-1]
            else:
                before = sent[:end]  # up to the mention's end: "the heart is not enlarged"
                neg = list(_NEGATION.finditer(before))
                negated = bool(neg) and not _BREAK.search(before[neg[-1].end() :])
                negated = negated or bool(_POST_NEGATION.search(sent[end:]))
                label = 0 if negated else (-1 if hedged else 1)
                lo = max([m.end() for m in _CHUNK.finditer(sent[:start])], default=0)
                hi = min([m.start() + end for m in _CHUNK.finditer(sent[end:])], default=len(sent))
                side = _side_of(sent[lo:hi]) or _side_of(sent)  # the chunk's side, else the sentence's
            prev = out.get(obs)
            if prev is None or rank[label] > rank[prev["label"]]:
                out[obs] = {"label": label, "side": side if label != 0 else None, "sent": i}
            elif label == prev["label"] == 1 and prev["side"] is None and side:
                prev["side"] = side
    if no_finding_said and not any(v["label"] == 1 for k, v in out.items() if k != "Support Devices"):
        out["No Finding"] = {"label": 1, "side": None, "sent": 0}
    return out


def labels_of(text: str) -> dict[str, int | None]:
    """The 14 CheXpert labels a text asserts (1/0/-1/None)."""
    t = tag(text)
    return {obs: (t[obs]["label"] if obs in t else None) for obs in OBSERVATIONS}


# ----------------------------------------------------------------------------------------------------------------
# The IU corpus


def package_data(name: str) -> str:
    """A data file shipped inside the installed torchxrayvision package."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ApoError("torchxrayvision is not installed; `apo synth` reads its IU reports and lung masks")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", name)


@functools.lru_cache(maxsize=1)
def iu_reports() -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    """(report id, FINDINGS, IMPRESSION, MeSH <major> tags) for every IU report, in archive order."""
    rows = []
    with tarfile.open(package_data("NLMCXR_reports.tgz")) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if not m.isfile() or not m.name.endswith(".xml"):
                continue
            x = tf.extractfile(m).read().decode("utf-8", "replace")
            get = lambda label: (
                re.search(rf'<AbstractText Label="{label}">(.*?)</AbstractText>', x, re.S) or [None, ""]
            )[1]
            rows.append(
                (
                    os.path.basename(m.name)[:-4],
                    get("FINDINGS").strip(),
                    get("IMPRESSION").strip(),
                    tuple(re.findall(r"<major>(.*?)</major>", x)),
                )
            )
    return tuple(rows)


# Words that make a sentence unusable: anonymisation, numbers, comparison with priors (our cases have none), hedges,
# and findings we do not render (a sentence naming them would contradict the image). Matched as word prefixes.
_TEMPORAL = (
    r"xxxx|\d|[()/\[\]:]|\b(?:again|stable|unchanged|interval|previous|prior|compar|since|resolv|improv|"
    r"worse|increas|decreas|new|persist|redemonstrat|residual|remain|recurr|develop|clearing|today|current)"
)
_REJECT = re.compile(
    _TEMPORAL + r"|\b(?:otherwise|borderline|upper limit|top normal|slight|minimal|trace|tiny|"
    r"granulom|scar|fibros|emphysema|hyperinfla|hypoinfla|copd|degenerat|spondyl|osteophyt|scolio|kyphos|aort|tortuous|"
    r"calcif|hernia|sternotomy|surgical|clip|postoperative|wire|hila|lymph|adenopathy|thicken|pericard|diaphragm|"
    r"hemidiaphragm|bronch|lucen|cavit|bulla|bone|bony|osseous|skeletal|soft tissue|volume|crowding|lingul|"
    r"middle lobe|retrocardiac|fissure|hydropneumothorax|hemothorax|loculat|layering|posterior|lateral|anterior|view|"
    r"congesti|engorge|failure|tuberc|sarcoid|arter|hypervent|mass|nodul|tip|terminat|satisfactory|position|"
    r"tracheostomy|shunt|tubing|please|recommend|correlat|clinical|history|patient|given|either|or early|multifocal|"
    r"diffuse|dependent|ventricle|expanded and clear|the present|in addition|associated|extensive|irregular|"
    r"parenchymal|alveolar|mixed|pneumonitis|typical|early|show|fibronodular|vascular injury|glenohumeral|"
    r"dislocation|supine|underpenetrat|hypoventilat|perihilar|allowing|limited|portable|rotat)"
    r"|^no\b.*\bnormal\b"
)  # a garbled negation: "No heart size is normal."
# Two sentences run together: "... or The heart is normal."
_RUN_ON = re.compile(r"\s(?:The|There|No|Heart|Lungs)\s")
# A negative statement qualified like this ("no large effusion") leaves room for a small one.
_REJECT_NEG = re.compile(r"\b(?:large|definite|significant|sizable|sizeable|gross)")
_DEVICE_REJECT = re.compile(
    _TEMPORAL + r"|\b(?:inflammatory|may|possibl|grossly|recommend|retraction|limited|"
    r"the present|noted incidentally|abdom|midabdom|quadrant|neck|shoulder|humer|tubing|drainage|removed|"
    r"malposition|ng tube|heart|cardiomegaly)"
)
_SEVERITY = {
    "small": "small",
    "mild": "small",
    "mildly": "small",
    "moderate": "moderate",
    "moderately": "moderate",
    "large": "large",
    "marked": "large",
    "severe": "large",
}
_SEV_RE = re.compile(r"\b(small|mild|mildly|moderate|moderately|large|marked|severe)\b")
_ZONE_RE = re.compile(r"\b(upper|lower|base|basilar|basal|bases|bibasilar|bibasal|mid ?lung|midlung)\b")
# Devices we can draw, keyed by the word the sentence uses.
_DEVICE_RE = [
    ("pacemaker", re.compile(r"\bpacemaker\b|\bdefibrillator\b")),
    ("picc", re.compile(r"\bpicc\b")),
    ("central_line", re.compile(r"\bcatheter\b|\bcentral (?:venous )?line\b")),
    ("et_tube", re.compile(r"\bendotracheal tube\b")),
]
_DEVICE_OK = re.compile(
    r"^[a-z ,.-]*(?:pacemaker|defibrillator|picc|catheter|central (?:venous )?line|endotracheal tube)"
    r"[a-z ,.-]*$"
)


def severity_word(v: float) -> str:
    return "small" if v < 0.55 else ("moderate" if v < 0.8 else "large")


class Sentence:
    """One mined sentence: what it asserts and what it rules out."""

    __slots__ = ("text", "pos", "neg", "sev", "zone", "device", "count", "normal")

    def __init__(self, text, tags, count):
        low = text.lower()
        self.text, self.count = text, count
        self.pos = {k: v["side"] for k, v in tags.items() if v["label"] == 1 and k != "No Finding"}
        self.neg = {k for k, v in tags.items() if v["label"] == 0}
        sev = _SEV_RE.search(low)
        self.sev = _SEVERITY[sev.group(1)] if sev else None
        z = _ZONE_RE.search(low)
        self.zone = None if not z else ("upper" if z.group(1) == "upper" else "mid" if "mid" in z.group(1) else "lower")
        self.device = next((name for name, pat in _DEVICE_RE if pat.search(low)), None)
        # "clear lungs" / "no acute disease" rule out whole groups without naming them.
        self.normal = set()
        if re.search(r"\blungs?\b[a-z ]{0,25}\bclear\b|\bclear lungs\b", low):
            self.normal |= {"Lung Opacity", "Consolidation", "Atelectasis", "Edema", "Pneumonia", "Lung Lesion"}
        if re.search(r"\bpleural spaces? (?:are|is) clear\b", low):
            self.normal |= {"Pleural Effusion", "Pneumothorax"}
        if "No Finding" in tags:
            self.normal |= set(OBSERVATIONS) - {"No Finding", "Support Devices"}


@functools.lru_cache(maxsize=1)
def sentence_bank() -> dict[str, list[Sentence]]:
    """Usable IU sentences by slot: "neg" (pertinent negatives), "heart_normal", "impression_normal", "pos:<obs>"."""
    counts = Counter()
    for _, findings, impression, _ in iu_reports():
        for s in split_sentences(f"{findings} {impression}"):
            s = re.sub(r"\.+$", ".", s.strip())
            if s[:1].isupper() and s.endswith(".") and 3 <= len(s.split()) <= 16 and s.isascii():
                counts[s] += 1
    bank: dict[str, list[Sentence]] = {}
    for text, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        low = text.lower()
        tags = tag(text)
        if not tags or any(v["label"] == -1 for v in tags.values()):
            continue
        s = Sentence(text, tags, n)
        if s.device:  # device sentences: only simple ones naming a device we draw
            if (
                _DEVICE_OK.match(low)
                and not _UNCERTAIN.search(low)
                and not _DEVICE_REJECT.search(low)
                and set(s.pos) == {"Support Devices"}
                and not s.neg
            ):
                bank.setdefault("pos:Support Devices", []).append(s)
            continue
        if _REJECT.search(low) or _RUN_ON.search(text):
            continue
        if not s.pos:
            if _REJECT_NEG.search(low):
                continue
            if "No Finding" in tags and set(s.neg) <= {"Cardiomegaly"}:
                bank.setdefault("impression_normal", []).append(s)
            elif set(s.neg) <= {"Cardiomegaly", "Enlarged Cardiomediastinum"} and "Cardiomegaly" in s.neg:
                bank.setdefault("heart_normal", []).append(s)
            elif s.neg or s.normal:
                bank.setdefault("neg", []).append(s)
            continue
        if re.search(r"\bacute\b", low):  # "cardiomegaly without acute disease" denies the case's other findings
            continue
        main = [k for k in s.pos if k != "Lung Opacity"] or ["Lung Opacity"]
        if len(main) != 1 or s.neg & set(s.pos):
            continue
        obs = main[0]
        if (obs in LATERAL or obs == "Lung Opacity") and (s.pos[obs] is None or _side_of(low) != s.pos[obs]):
            continue  # no side, or two sides in one sentence: cannot be adapted to the case
        if obs in ("Atelectasis", "Consolidation", "Pneumonia") and "Lung Opacity" in s.pos:
            pass  # "airspace opacity ... consistent with pneumonia": fine, Lung Opacity is implied by truth
        elif "Lung Opacity" in s.pos and obs != "Lung Opacity":
            continue
        bank.setdefault(f"pos:{obs}", []).append(s)
    return bank


# ----------------------------------------------------------------------------------------------------------------
# Side adaptation


def _case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _swap(pattern: str, repl: str, text: str) -> str:
    """re.sub that keeps a capital first letter."""
    return re.sub(pattern, lambda m: _case(repl, m.group(0)), text, flags=re.I)


def adapt_side(text: str, have: str, want: str) -> str | None:
    """Rewrite a sentence's side words from `have` to `want`; None where the grammar would not survive."""
    if have == want:
        return text
    if re.search(r"\bboth\b|\bbilaterally\b|\bgreater than\b|\bsided\b|-sided\b", text, re.I):
        return None
    if want in ("left", "right") and have in ("left", "right"):
        return _swap(r"\b(?:right|left)\b", want, text)
    if want == "bilateral":  # "small right pleural effusion" -> "small bilateral pleural effusions"
        out = _swap(r"\b(?:right|left)\b", "bilateral", text)
        out = re.sub(r"\beffusion\b", "effusions", out)
        out = re.sub(r"\bpneumothorax\b", "pneumothoraces", out)
        if re.search(r"effusions|pneumothoraces", out):
            out = _swap(r"\bthere is\b", "there are", _swap(r"\bthere is an?\b", "there are", out))
            out = re.sub(r"\b(effusions|pneumothoraces) is\b", r"\1 are", out)
        out = re.sub(r"\bbilateral (base|lung base)\b", r"bilateral \1s", out)
        return out if out.lower().count("bilateral") == 1 else None
    # bilateral -> one side
    out = _swap(r"\bbibasilar\b", f"{want} basilar", text)
    out = _swap(r"\bbilateral\b", want, out)
    out = re.sub(r"\beffusions\b", "effusion", out)
    out = re.sub(r"\bpneumothoraces\b", "pneumothorax", out)
    out = re.sub(r"\bbases\b", "base", out)
    if re.search(r"\b(effusion|pneumothorax|base)\b", out):
        out = _swap(r"\bthere are\b", "there is", out)
        out = re.sub(r"\b(effusion|pneumothorax|base) are\b", r"\1 is", out)
    return out if out != text else None


# ----------------------------------------------------------------------------------------------------------------
# Ground-truth report for one case

# Fallback templates, used only where the corpus has no usable sentence for the case's finding/side/severity.
TEMPLATES = {
    "Pleural Effusion": "There is a {sev} {side} pleural effusion.",
    "Pneumothorax": "There is a {sev} {side} apical pneumothorax.",
    "Cardiomegaly": "The heart is {sevadv} enlarged.",
    "Atelectasis": "There is {side} basilar atelectasis.",
    "Consolidation": "There is {side} {zone} lung consolidation.",
    "Pneumonia": "There is {side} {zone} lung airspace opacity consistent with pneumonia.",
    "Edema": "There is {sevadj} pulmonary edema.",
    "Support Devices": "A right internal jugular central venous catheter is present.",
}
SEV_ADJ = {"small": "mild", "moderate": "moderate", "large": "severe"}
SEV_ADV = {"small": "mildly", "moderate": "moderately", "large": "markedly"}


def fill_template(obs: str, f: dict) -> str:
    side = f.get("side") or ""
    sev = severity_word(f.get("severity", 0.5))
    text = TEMPLATES[obs].format(
        sev=sev, side=side, zone=f.get("zone") or "lower", sevadj=SEV_ADJ[sev], sevadv=SEV_ADV[sev]
    )
    if side == "bilateral":
        text = re.sub(
            r"There is a (\w+) bilateral pleural effusion\.", r"There are \1 bilateral pleural effusions.", text
        )
        text = text.replace("bilateral apical pneumothorax", "bilateral apical pneumothoraces")
    return re.sub(r"\s+", " ", text)


def device_side(text: str, device: str) -> str:
    """Where to draw a device a sentence describes: the side word that qualifies the device, else the usual side."""
    m = re.search(
        r"\b(right|left)(?:-sided)?\s+(?:[a-z-]+\s+){0,3}?(?:picc|catheter|pacemaker|ij|internal jugular|"
        r"subclavian|upper extremity|venous|chest wall|mediport|tunneled|cardiac|biventricular)",
        text.lower(),
    )
    if m:
        return m.group(1)
    return {"pacemaker": "left"}.get(device, "right")


def present_set(truth: dict) -> set:
    """Observations positive in a case, with CheXpert's implied parent Lung Opacity."""
    return set(truth) | ({"Lung Opacity"} if set(truth) & set(OPACITY_CHILDREN) else set())


def compatible(s: Sentence, truth: dict) -> bool:
    """A sentence may be used if it rules out nothing the case has and asserts nothing it lacks."""
    present = present_set(truth)
    return not ((s.neg | s.normal) & present) and set(s.pos) <= present


def positive_sentence(obs: str, f: dict, truth: dict, bank, rng) -> tuple[str, bool]:
    """A sentence asserting `obs` as the case has it: (text, mined from IU?)."""
    sev = severity_word(f.get("severity", 0.5))
    choices = []
    for s in bank.get(f"pos:{obs}", []):
        if s.sev not in (None, sev) or not compatible(s, truth):
            continue
        if obs in ("Consolidation", "Pneumonia", "Lung Opacity") and s.zone not in (None, f.get("zone")):
            continue
        if obs == "Atelectasis" and s.zone != "lower":
            continue
        text = s.text
        if obs in LATERAL or obs == "Lung Opacity":
            text = adapt_side(text, s.pos[obs], f["side"])
            if text is None or tag(text).get(obs, {}).get("side") != f["side"]:
                continue
        choices.append(text)
    if choices:
        return choices[int(rng.integers(len(choices)))], True
    if obs == "Lung Opacity":
        return "", False
    return fill_template(obs, f), False


def pick(sentences, rng):
    return sentences[int(rng.integers(len(sentences)))]


def impression_of(truth: dict) -> str:
    parts = []
    for obs in OBSERVATIONS:
        if obs not in truth or obs == "Support Devices":
            continue
        side, zone = truth[obs].get("side"), truth[obs].get("zone")
        name = {
            "Pleural Effusion": "pleural effusion" + ("s" if side == "bilateral" else ""),
            "Pneumothorax": "pneumothora" + ("ces" if side == "bilateral" else "x"),
            "Edema": "pulmonary edema",
        }.get(obs, obs.lower())
        if obs in ("Consolidation", "Pneumonia") and zone:
            name = f"{zone} lung {name}"
        parts.append(f"{side} {name}" if side else name)
    text = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return text[0].upper() + text[1:] + "."


def build_report(truth: dict, rng) -> tuple[str, dict]:
    """FINDINGS + IMPRESSION for a case whose positive findings are `truth` {obs: {side, severity, zone, ...}}.

    Support Devices carry the mined sentence that chose the device ("text"). Returns (report, counts of mined and
    template sentences).
    """
    bank = sentence_bank()
    stats = {"mined": 0, "template": 0}
    findings = []

    def add(text, mined):
        if text:
            findings.append(text)
            stats["mined" if mined else "template"] += 1

    if "Support Devices" in truth:
        dev = truth["Support Devices"]
        add(dev.get("text") or fill_template("Support Devices", dev), bool(dev.get("text")))
    if "Cardiomegaly" in truth:
        add(*positive_sentence("Cardiomegaly", truth["Cardiomegaly"], truth, bank, rng))
    else:
        add(pick([s for s in bank["heart_normal"] if compatible(s, truth)], rng).text, True)
    for obs in ("Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pleural Effusion", "Pneumothorax"):
        if obs not in truth:
            continue
        if obs in ("Consolidation", "Pneumonia") and rng.random() < 0.5:  # IU's "airspace disease" wording first
            add(*positive_sentence("Lung Opacity", truth[obs], truth, bank, rng))
        add(*positive_sentence(obs, truth[obs], truth, bank, rng))
    # One or two pertinent negatives that agree with the case.
    negs = [s for s in bank["neg"] if compatible(s, truth)]
    said: set = set()
    for _ in range(2):
        fresh = [s for s in negs if not (s.neg | s.normal) <= said]
        if not fresh:
            break
        s = pick(fresh, rng)
        add(s.text, True)
        said |= s.neg | s.normal
    if not [o for o in truth if o != "Support Devices"]:
        impression = pick(bank["impression_normal"], rng).text
        stats["mined"] += 1
    else:
        impression = impression_of(truth)
        stats["template"] += 1
    return f"FINDINGS: {' '.join(findings)} IMPRESSION: {impression}", stats
