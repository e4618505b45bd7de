"""Rule-based CheXpert labeler: free text -> {observation: 1 | 0 | -1 | None} for the 14 CheXpert observations.

In the spirit of the CheXpert labeler (Irvin et al. 2019, built on NegBio), with regular expressions in place of
a dependency parse, so it labels ~10k sentences/s and has no model to download:

1. split the text into sentences, and each sentence into clauses at scope breakers ("but", "however", ";",
   "which", ...): negation and uncertainty never reach across a clause; clauses that refuse ("I cannot provide a
   diagnosis") are dropped;
2. find mentions: per observation, regexes for the finding ("pleural effusion", "blunting of the costophrenic
   angle", "heart size is enlarged") and for statements of normality ("normal heart size", "lungs are clear");
3. classify each finding mention, in CheXpert's order: uncertainty phrased with a negation word first ("cannot
   exclude", "not ruled out", "no new"), then negation ("no", "without", "free of", "has resolved"), then
   uncertainty ("may represent", "possible", "likely", "versus", "X or Y");
4. aggregate mentions per observation as CheXpert does: positive > uncertain > negative; "heart failure" / "CHF"
   also make Cardiomegaly uncertain (CheXpert's exception);
5. No Finding = 1 when no observation other than Support Devices is positive or uncertain, else 0. A text with
   nothing to label (empty, or a refusal) gets None everywhere.

`laterality(text)` gives the side ("left" | "right" | "bilateral") of positive/uncertain lateral findings.
Validated against the MeSH tags of 3,955 Indiana University reports: `scripts/validate_labeler.py`.
"""

from __future__ import annotations

import re
from functools import lru_cache

from apo.constants import OBSERVATIONS

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

# ----------------------------------------------------------------------------- text -> sentences -> clauses

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)|\n+|(?<=\.)(?=[a-z]{2,})")  # "clear.No effusion" happens in IU text
_CLAUSE_BREAK = re.compile(
    r";|\b(?:but|however|although|though|whereas|except|apart from|aside from|other than|which|"
    r"and there|there is|there are|there has been|otherwise|with the exception of|in addition|additionally|"
    r"also|while)\b"
)

REFUSAL = re.compile(
    r"\b(?:i(?:'m| am)? (?:cannot|can ?not|can't|am unable to|unable to|am not able to|not able to|won't|"
    r"will not|do not|don't) (?:provide|offer|give|make|render|interpret|diagnose|analy[sz]e|read|review|"
    r"assess|evaluate|determine|view|see|help with)|as an ai\b|i'm an ai\b|i am an ai\b|"
    r"i'm (?:unable|not able) to|i am (?:unable|not able) to|"
    r"(?:cannot|can't|unable to) (?:provide|offer|give) (?:a |any )?(?:medical |definitive |clinical )?"
    r"(?:diagnos[ie]s|interpretation|medical advice|opinion)|not a substitute for (?:professional )?medical|"
    r"(?:please )?consult (?:a|an|your|with a) (?:qualified |licensed |board.certified )?"
    r"(?:radiologist|doctor|physician|healthcare|health care|medical)|seek (?:professional )?medical)"
)

# ----------------------------------------------------------------------------- cues

_GAP = r"(?:[\s,:]+[\w/']+){0,%d}?[\s,:]+"  # up to N words (commas allowed) between two parts of one statement

# Uncertainty phrased with a negation word: checked before negation, like CheXpert's pre-negation uncertainty.
_UNC_NEG_PRE = re.compile(
    r"\b(?:cannot|can ?not|could not|can't|unable to|difficult to|not possible to) (?:be )?(?:entirely |completely |"
    r"definitely |totally )?(?:excluded?|ruled? out|rule out|exclude|distinguish(?:ed)?|differentiate[ds]?)\b|"
    r"\bno new\b|\bnot (?:entirely |completely |totally |definitely )?(?:excluded|ruled out)\b|"
    r"\bno (?:evidence|sign) to (?:rule out|exclude)\b|\bnot (?:well )?(?:seen|visualized) (?:but|however)\b"
)
_UNC_NEG_POST = re.compile(
    r"^" + _GAP % 5 + r"(?:(?:is|are|was|were|could|can|may) )?(?:not|cannot|can ?not|could not|can't) "
    r"(?:be )?(?:entirely |completely |totally |definitely )?(?:excluded|ruled out)\b"
)

_NEG_PRE = re.compile(
    r"\b(?:no|not|without|nor|neither|never|free of|negative for|absence of|resolved|resolution of|"
    r"removal of|removed|clear of|rather than|instead of|no evidence of|no signs? of|no findings? (?:of|to suggest)|"
    r"no radiographic evidence of|w/o)\b"
)
# "no change in the effusion" affirms the effusion: a pseudo-negation, like NegBio's.
_PSEUDO_NEG = re.compile(
    r"^(?:no|not) (?:\w+ ){0,2}?(?:change|changed|increase[ds]?|decrease[ds]?|improve[ds]?|improvement|"
    r"worsen\w*|progression|progress\w*|significant(?:ly)? (?:changed?|different)|only|just|well|excluded|"
    r"ruled out|certain|clear whether|otherwise)\b|^not\b(?= (?:\w+ )?(?:seen|visualized|"
    r"identified) on (?:the )?(?:frontal|lateral|pa))"
)
_NEG_POST = re.compile(
    r"^" + _GAP % 6 + r"(?:(?:is|are|was|were|has|have|has been|have been|appears?|seems?) )?(?:(?:also|again|now) )?"
    r"(?:not (?:(?:well|clearly|definitely|definitively|convincingly) )?(?:seen|identified|present|visuali[sz]ed|"
    r"appreciated|evident|demonstrated|noted|detected|visible|apparent|shown|found|enlarged|"
    r"confirmed)|absent|resolved|removed|cleared|no longer (?:\w+ )?(?:seen|present|visuali[sz]ed|evident|"
    r"identified|visible|appreciated|demonstrated)|been removed|been resolved|disappeared|gone|"
    r"withdrawn|excluded|ruled out|(?:may|might|will|would) not be (?:seen|demonstrated|visible|detected|"
    r"identified|apparent|evident))\b"
)

_NEG_POST_NORMAL = re.compile(
    r"^(?:\s+\w+){0,2}?\s+(?:is|are|appears?|remains?|seems?) (?:\w+ )?(?:normal|unremarkable|"
    r"within (?:the )?(?:normal limits|limits of normal))\b"
)

# List-style answers: "Pleural effusion: absent", "Edema - no", "Cardiomegaly: possible".
_COLON = r"^\s*\**\s*(?::|-|\u2013)\s*\**\s*"
_NEG_COLON = re.compile(
    _COLON + r"(?:no|none|absent|negative|nil|normal|unremarkable|not (?:present|seen|identified|"
    r"visuali[sz]ed|evident|appreciated|detected|demonstrated))\b"
)
_UNC_COLON = re.compile(
    _COLON + r"(?:possible|possibly|likely|probable|questionable|equivocal|indeterminate|uncertain|"
    r"suspected|borderline|cannot be (?:excluded|ruled out)|may be present)\b"
)
_HEADING = re.compile(r"[\s*#_>-]*[^:]*:[\s*#_]*")  # "**Pleural effusion:**" names a topic, asserts nothing

_UNC_PRE = re.compile(
    r"\b(?:may|might|could|possible|possibly|possibility|probable|probably|likely|unlikely|presumabl[ey]|"
    r"suspect\w*|suspicious|suspicion|concern|concerning|worrisome|question|questionable|questionably|suggest\w*|"
    r"versus|vs|differential|consider|considered|alternatively|equivocal|indeterminate|uncertain|borderline|"
    r"unclear|cannot|can't|perhaps|apparently|appears? to represent|favou?r|favou?red|favou?ring|raises|raising|"
    r"vs|and/or|either|(?:upper|high|top)(?:[\s-]+(?:limits?|range|end|levels?)(?: of)?)?[\s-]+normal|"
    r"mildly prominent|prominent but|evaluate for|eval for|r/o|rule out|to exclude|correlat\w+|"
    r"undetermined|would be|cannot be excluded|appropriate clinical (?:setting|context))\b|\?"
)
_UNC_POST = re.compile(
    r"^" + _GAP % 4 + r"(?:(?:is|are|was|were|remains?|seems?|appears?) (?:\w+ )?(?:(?:also|again|not|most|more) )?"
    r"(?:possible|possibly|likely|suspected|questioned|questionable|probable|uncertain|unclear|equivocal|"
    r"(?:a|another) consideration|favou?red|suggested|considered)|(?:may|might|could) (?:also )?(?:be|have) "
    r"(?:present|seen|noted|developing|superimposed|an?|early|mild|small|some|slight|minimal)|not (?:clearly|"
    r"definitely|definitively) (?:seen|identified|excluded)|difficult to (?:exclude|assess|evaluate)|"
    r"would be a consideration|(?:is|are) (?:also )?(?:in|within) the differential)\b|^(?:\s+\w+)?\s*(?:or|versus|vs|"
    r"and/or|/)\s|^\s*\?"
)
_UNC_ALT_PRE = re.compile(r"\s(?:or|versus|vs|and/or)\s+(?:\w+\s+){0,2}$")  # "atelectasis or [infiltrate]"

# ----------------------------------------------------------------------------- mention patterns

# Heart: CheXpert's "heart size", "cardiac silhouette", ... are mentions only with a descriptor.
_HEART = (
    r"(?:heart|cardiac (?:size|silhouette|shadow|contours?|diameter|dimensions)|cardiac|"
    r"cardiopericardial silhouette)(?: size| shadow| silhouette| contours?)?"
)
_MEDIAST = (
    r"(?:(?:cardio)?mediastin(?:um|al)(?: (?:contours?|silhouettes?|width|size|shadow|configuration|"
    r"structures?))?|cardio ?mediastinal (?:contours?|silhouettes?|width|size|shadow)|hil(?:a|um|ar) "
    r"(?:contours?|structures?|shadows?)|hila|superior mediastinum|aortic knob)"
)
_ENLARGED = r"(?:enlarge\w*|large|increased|prominen\w+|widen\w*|big|expanded|globular)"
_NORMAL = (
    r"(?:normal|within (?:the )?(?:normal (?:limits|range)|limits of normal)|wnl|unremarkable|unchanged and normal|"
    r"not enlarged|stable and normal|grossly normal|upper limits of normal|top normal|high normal|"
    r"upper normal|borderline)"
)
_SIDE_TOKEN = (
    r"(?:right|left|bilateral|bilaterally|both (?:lungs?|bases|lower|upper|mid|sides|hemithora\w+|apices|"
    r"hila)|bibasilar|bibasal|bibasalar|biapical|lingula\w*|rll|rml|rul|lll|lul)"
)

_FINDINGS = {
    "Enlarged Cardiomediastinum": [
        r"\bmediastinal (?:widening|enlargement|prominence|lymphadenopathy|mass)\b",
        r"\benlarged cardiomediastin\w+\b",
        r"\bwidened mediastinum\b",
        r"\bhilar (?:enlargement|prominence|adenopathy|lymphadenopathy|fullness)\b",
    ],
    "Cardiomegaly": [
        r"\bcardiomegaly\b",
        r"\bcardiac enlargement\b",
        r"\bcardiomyopathy\b",
        r"\bborderline (?:\w+ )?(?:heart|cardiac)\b",
    ],
    "Lung Opacity": [
        r"\bopaci\w+",
        r"\binfiltra\w+",
        r"\bair ?space (?:disease|opacit\w+|process|filling|consolidation)",
        r"\b(?:increased|patchy|hazy|ill defined|streaky|linear|reticular|airspace|air space|alveolar|confluent|"
        r"focal|parenchymal|pulmonary|lung|basilar|bibasilar|perihilar|interstitial|retrocardiac|lingular) "
        r"(?:\w+ )?densit(?:y|ies)\b",
        r"\bdensit(?:y|ies) (?:\w+ ){0,2}?(?:in|at|within|of) (?:the )?(?:\w+ ){0,3}?"
        r"(?:lungs?|lobes?|bases?|lingula|apex|apices|midlung|lung zone)\b",
        r"\binterstitial (?:\w+ )?(?:markings?|patterns?|lung disease|disease|opacit\w+|prominence|thickening|"
        r"changes?|process|abnormalit\w+|infiltrat\w+)",
        r"\breticul\w+",
        r"(?<!pleural )(?<!pleural based )(?<!pleural-based )(?<!pleuroparenchymal )"
        r"(?<!pleural parenchymal )\bscar(?:s|ring|red)?\b",
        r"\bperibronchial (?:thickening|cuffing)",
        r"\bbronchial wall thickening",
        r"\bhaz(?:e|iness|y)\b",
        r"\b(?:increased|coarse|prominent) (?:\w+ )?(?:lung |interstitial |pulmonary )?markings\b",
        r"\bfibro(?:sis|tic)\b",
        r"\bparenchymal (?:disease|abnormalit\w+|process)",
    ],
    "Lung Lesion": [
        r"\bnodul\w+",
        r"\bmass(?:es)?\b(?! effect)",
        r"\bneoplas\w+",
        r"\btumou?rs?\b",
        r"\bcarcinoma\w*",
        r"\bmalignan\w+",
        r"\bcancer\w*",
        r"\bmetasta\w+",
        r"\blump\b",
        r"(?<!bony )(?<!bone )(?<!lytic )(?<!sclerotic )(?<!blastic )(?<!osseous )(?<!skin )(?<!rib )"
        r"(?<!lucent )\blesions?\b",
        r"\bcavit(?:ary|ation|ating)\b",
    ],
    "Edema": [
        r"(?<!soft tissue )(?<!subcutaneous )\boedema|(?<!soft tissue )(?<!subcutaneous )\bedema\b",
        r"\b(?:vascular|venous|pulmonary|hilar|interstitial) (?:\w+ )?congestion\b",
        r"\bcongestive\b",
        r"\bcongestion\b",
        r"\bheart failure\b",
        r"\bchf\b",
        r"\bcephalization\b",
        r"\bkerley\b",
        r"\b(?:fluid|volume) overload\b",
        r"\bvascular (?:prominence|engorgement|redistribution|indistinctness)\b",
        r"\bindistinct\w* (?:\w+ )?vascula\w+",
        r"\b(?:pulmonary )?vascula(?:ture|rity|r markings) (?:\w+ ){0,2}?(?:is |are )?(?:\w+ )?(?:prominent|increased|"
        r"engorged|congested|indistinct|cephali[sz]ed|redistributed)",
        r"\b(?:prominent|increased|engorged|congested|indistinct) (?:\w+ )?(?:pulmonary )?(?:vascula\w+|vessels)\b",
        r"\bpulmonary (?:xxxx|vessels) (?:are |is )?(?:\w+ )?(?:engorged|congested|indistinct|cephali[sz]ed)",
    ],
    "Consolidation": [r"\bconsolidat\w+", r"\bair bronchogram\w*"],
    "Pneumonia": [r"\bpneumonia\w*", r"\bbronchopneumonia\b", r"\binfect\w+", r"\bpna\b", r"\bpneumonitis\b"],
    "Atelectasis": [
        r"\batelecta\w+",
        r"(?<!vertebral )(?<!body )(?<!compression )\bcollapse[ds]?\b",
        r"\bvolume loss\b",
    ],
    "Pneumothorax": [
        r"pneumothora(?:x|ces|xes)\b",
        r"\bptx\b",
        r"\bpneumo thorax\b",
        r"\bpleural air\b",
        r"\bair (?:\w+ ){0,6}?(?:within|in) the pleural space",
    ],
    "Pleural Effusion": [
        r"(?<!pericardial )(?<!joint )(?<!pericardial or pleural )\beffusions?\b",
        r"\bpleural fluid\b",
        r"\bhydro ?thorax\b",
        r"hydropneumothora\w+",
        r"\bhemothorax\b",
        r"\bfluid (?:in|within|tracking (?:into|along)) (?:the )?(?:\w+ )?(?:fissures?|pleural\w*|pleura)",
        r"\b(?:layering|loculated|subpulmonic) fluid\b",
    ],
    "Pleural Other": [
        r"\bpleural (?:\w+ )?(?:thickening|scar\w*|plaques?|calcification\w*|fibrosis|reaction|lesion)",
        r"\bthickening of the (?:\w+ )?pleura",
        r"\bpleuroparenchymal (?:\w+ )?(?:scar\w*|thickening|opacit\w+)",
        r"\bpleural[\s-](?:based|parenchymal) (?:\w+ )?(?:scar\w*|thickening|opacit\w+)",
        r"\bfibrothorax\b",
        r"\bapical (?:pleural )?(?:thickening|capping|caps?)\b",
        r"\bpleuro-?pericardial scar",
    ],
    "Fracture": [r"\bfractur\w+", r"\bfx\b", r"\bdeformit\w+ of (?:the )?(?:\w+ )?ribs?\b"],
    "Support Devices": [
        r"\btubes?\b",
        r"\bcatheters?\b",
        r"\bpacemakers?\b",
        r"\bpacers?\b",
        r"\bpicc\b",
        r"\baicd\b",
        r"\bicd\b",
        r"\bdefibrillator\w*",
        r"\bstimulator\b",
        r"\btip (?:\w+ ){0,2}?(?:projects?|projecting|overl\w+|"
        r"terminat\w+|at the|in the|within the|near the|is in|is at)\b",
        r"\b(?:picc|central|venous|arterial|ij|jugular|subclavian|dialysis|hickman|port|"
        r"midline|swan ganz|swan-ganz|pulmonary artery|femoral) (?:\w+ )?(?:lines?|catheters?)\b",
        r"\blines? (?:and|or|/) tubes?\b",
        r"\btubes? (?:and|or|/) lines?\b",
        r"\bwires?\b",
        r"\bstents?\b",
        r"\bport(?:a ?cath|-a-cath)?s?\b(?! of)",
        r"\bmediport\b",
        r"\bhardware\b",
        r"\bprosthe\w+",
        r"\b(?:valve (?:replacement|prosthesis)|prosthetic valve|avr|mvr|annuloplasty)\b",
        r"\bleads?\b(?! to)",
        r"\belectrodes?\b",
        r"\bdrains?\b",
        r"\bcoils?\b",
        r"\bdevices?\b",
        r"\b(?:intra-?aortic )?balloon pump\b",
        r"\biabp\b",
        r"\blvad\b",
        r"\bfilter\b",
        r"\barthroplast\w+",
        r"\bscrews?\b",
        r"\bplates?\b(?! ?like| atelecta)",
        r"\bcannula\w*",
        r"\bapparatus\b",
        r"\bgenerator\b",
        r"\bkyphoplasty\b",
        r"\bvertebroplasty\b",
    ],
}

# Signs that imply a finding ("the heart is enlarged", "blunted costophrenic angle"): mentions too, but a sentence
# that also names the finding itself is labelled by that ("blunting ... may represent an effusion" is uncertain).
_EVIDENCE = {
    "Enlarged Cardiomediastinum": [
        rf"\b{_MEDIAST}{_GAP % 3}(?:is |are |appears? |remains? )?(?:\w+ )?{_ENLARGED}\b",
        rf"\b{_ENLARGED} (?:(?!calcified)\w+ )?{_MEDIAST}\b",
        r"\b(?:prominen\w+|widening|enlargement|fullness) of (?:the )?(?:\w+ )?(?:mediastin\w+|hila|hilum|hilar \w+)",
        r"\bbi ?hilar (?:prominence|enlargement|fullness|adenopathy)",
    ],
    "Cardiomegaly": [
        rf"\b{_HEART}{_GAP % 5}(?:is |are |appears? |remains? |seems? )?(?:\w+ )?(?:enlarged|large|increased|"
        r"prominent|enlargement|globular)\b(?! (?:hiatal|hiatus|hernia))",
        rf"\b(?:enlarged|large|increased|prominent|globular|enlargement of the) (?:\w+ )?{_HEART}\b(?! failure)",
    ],
    "Pleural Effusion": [
        r"\bblunt\w* (?:of )?(?:the )?(?:\w+ ){0,2}?(?:costophrenic|cp|costodiaphragmatic) (?:angles?|sulc[iu]s?|"
        r"recess\w*|xxxx)",
        r"\b(?:costophrenic|cp) (?:angles?|sulc[iu]s?|recess\w*|xxxx)" + _GAP % 3 + r"(?:is |are )?(?:\w+ )?blunt\w*",
        r"\bmeniscus\b",
    ],
}

# Surgical clips, sutures, staples and a sternotomy alone are postsurgical material, not support devices: CheXpert
# does not count them either (its support-device phrases: tubes, lines, catheters, pacers, valves, hardware, ...).

# Statements of normality: a negative label on their own ("normal heart size", "the lungs are clear").
_NORMALS = {
    "Enlarged Cardiomediastinum": [
        rf"\b{_MEDIAST}{_GAP % 6}(?:is |are |appears? |remains? )?(?:\w+ )?{_NORMAL}",
        rf"\bnormal (?:\w+ )?{_MEDIAST}",
        rf"\b{_MEDIAST} (?:and \w+ )?(?:is |are )?(?:stable and )?normal",
    ],
    "Cardiomegaly": [
        rf"\b{_HEART}{_GAP % 6}(?:is |are |appears? |remains? )?(?:\w+ )?{_NORMAL}",
        rf"\bnormal[\s-](?:sized? )?(?:\w+ )?{_HEART}",
        rf"\b{_HEART} (?:and \w+ )?(?:is |are )?(?:stable and )?normal",
        r"\bcardiomediastinal (?:silhouette|contours?)(?: and \w+)?" + _GAP % 4 + rf"(?:\w+ )?{_NORMAL}",
        r"\bnormal cardiomediastinal",
    ],
    "Lung Opacity": [
        r"\blungs? (?:\w+ ){0,3}?(?:is |are |appears? |remains? )?(?:otherwise |grossly |now |again |"
        r"both )?(?:\w+ and )?clear\b",
        r"\bclear (?:\w+ )?lungs?\b",
        r"\blungs?\s*:\s*(?:\w+ )?clear\b",
        r"\blung fields? (?:\w+ )?(?:are |is )?clear\b",
        r"\blungs? (?:are |is )?(?:\w+ )?normal\b",
    ],
    "Pleural Effusion": [
        r"\b(?:costophrenic|cp) (?:angles?|sulc[iu]s?|recess\w*|xxxx)"
        + _GAP % 3
        + r"(?:is |are )?(?:\w+ )?(?:sharp|clear|preserved|normal|well.defined)",
        r"\bsharp (?:\w+ )?(?:costophrenic|cp) ",
        r"\bpleural spaces? (?:\w+ )?(?:are |is )?clear\b",
    ],
    "Pneumothorax": [r"\bpleural spaces? (?:\w+ )?(?:are |is )?clear\b"],
    "Edema": [
        r"\b(?:pulmonary )?vascula(?:ture|rity)" + _GAP % 4 + rf"(?:\w+ )?{_NORMAL}",
        r"\bnormal (?:pulmonary )?vascula",
    ],
    "Fracture": [
        r"\b(?:bony|osseous|bone|skeletal) (?:\w+ ){0,2}?(?:structures?|thorax|skeleton|findings|elements)?\s*"
        r"(?:is |are |appear )?(?:\w+ )?(?:intact|unremarkable|normal)\b",
        r"\bno (?:acute |displaced )?(?:bony|osseous|skeletal) (?:abnormalit\w+|injur\w+|findings?|lesions?)",
    ],
}

# Mentions that are another observation's, not this one's (matched first, their span blanked for this observation).
_NOT_MENTIONS = {
    "Lung Opacity": [
        r"\b(?:meniscus shaped|layering|homogeneous|fluid) densit\w+|\bdensit\w+ (?:\w+ )?layer\w*",
        r"\bopacit\w+ (?:\w+ )?(?:of|in) (?:the )?(?:\w+ )?(?:ribs?|spine|bones?|breasts?|soft tissues?|nipples?)",
    ],
    "Support Devices": [
        r"\bline (?:of|up)\b",
        r"\bport of\b",
        r"\btubes? (?:of|in) the (?:\w+ )?(?:lungs?|airways?)",
        r"\bleads? to\b",
        r"\bfusion of\b",
        r"\bdevice of\b",
    ],
    "Lung Lesion": [
        r"\blesions? (?:\w+ ){0,3}?(?:of|in|within|involving) (?:the )?"
        r"(?:\w+ ){0,3}?(?:ribs?|humer\w+|clavicle|scapula|spine|vertebra\w*|bones?|shoulder|breast|skin)\b"
    ],
    "Pneumonia": [
        r"\b(?:granulomatous|prior|old|previous|remote|past|healed) (?:\w+ ){0,2}?infect\w+",
        r"\binfect\w+ (?:\w+ )?(?:control|precautions)",
    ],
}

_HEART_OBS = ("Cardiomegaly", "Enlarged Cardiomediastinum")
# Cheap keyword gates: an observation's (slower) patterns run only on clauses that contain one of its words.
_TRIGGERS = {
    "Enlarged Cardiomediastinum": r"mediastin|hil[aiu]|aortic knob",
    "Cardiomegaly": r"cardi|heart",
    "Lung Opacity": r"opaci|infiltra|space|densit|interstiti|reticul|scar|peribronch|bronchial|haz|marking|fibro|"
    r"parenchym|lung",
    "Lung Lesion": r"nodul|mass|neoplas|tumo|carcinom|malignan|cancer|metasta|lump|lesion|cavit",
    "Edema": r"edema|congest|failure|chf|cephali|kerley|overload|vascul|vessel|xxxx",
    "Consolidation": r"consolidat|bronchogram",
    "Pneumonia": r"pneumon|infect|pna",
    "Atelectasis": r"atelecta|collaps|volume loss",
    "Pneumothorax": r"pneumo ?thora|ptx|air|pleural space",
    "Pleural Effusion": r"effusion|fluid|hydro|hemothorax|blunt|costophrenic|cp |meniscus|pleural space",
    "Pleural Other": r"pleur|fibrothorax|apical",
    "Fracture": r"fractur|fx|deformit|bony|osseous|bone|skelet",
    "Support Devices": r"tube|catheter|pace|picc|icd|defib|stimul|tip|line|wire|stent|port|hardware|prosthe|"
    r"valve|avr|mvr|annulo|lead|electrode|drain|coil|device|pump|iabp|lvad|"
    r"filter|arthroplast|screw|plate|cannula|apparatus|generator|kyphoplast|vertebroplast",
}
_TRIGGERS_RE = {obs: re.compile(p) for obs, p in _TRIGGERS.items()}

_CHF = re.compile(r"\b(?:heart failure|chf|congestive heart)\b")

_FINDINGS_RE = {obs: re.compile("|".join(f"(?:{p})" for p in pats)) for obs, pats in _FINDINGS.items()}
_EVIDENCE_RE = {obs: re.compile("|".join(f"(?:{p})" for p in pats)) for obs, pats in _EVIDENCE.items()}
_NORMALS_RE = {obs: re.compile("|".join(f"(?:{p})" for p in pats)) for obs, pats in _NORMALS.items()}
_NOT_RE = {obs: re.compile("|".join(f"(?:{p})" for p in pats)) for obs, pats in _NOT_MENTIONS.items()}


def _normalize(text: str) -> str:
    t = text.lower().replace("\u2019", "'")
    t = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", t)  # "right-sided", "air-space", "x-ray"
    return re.sub(r"[ \t\r\f\v]+", " ", t)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(_normalize(text)) if s and s.strip()]


def _clauses(sentence: str) -> list[str]:
    """Cut a sentence where negation/uncertainty scope ends. The breaker word stays at the head of its clause."""
    cuts = [0] + [m.start() for m in _CLAUSE_BREAK.finditer(sentence) if m.start() > 0] + [len(sentence)]
    return [sentence[a:b] for a, b in zip(cuts, cuts[1:]) if sentence[a:b].strip()]


def is_refusal(text: str) -> bool:
    """True when the text contains a refusal phrase ("I cannot provide a diagnosis", "consult a radiologist")."""
    return bool(REFUSAL.search(_normalize(text)))


def _classify(clause: str, start: int, end: int, question: bool) -> int:
    """Label one finding mention clause[start:end] from the cues around it in its clause."""
    pre, post, upto = clause[:start], clause[end:], clause[:end]
    if _UNC_NEG_PRE.search(upto) or _UNC_NEG_POST.search(post) or _UNC_COLON.search(post):
        return UNCERTAIN
    if _NEG_COLON.search(post):
        return NEGATIVE
    neg = None
    for m in _NEG_PRE.finditer(upto):  # the last negation cue before the end of the mention decides
        neg = m
    if neg is not None and not _PSEUDO_NEG.search(upto[neg.start() :]):
        return NEGATIVE
    if _NEG_POST.search(post) or _NEG_POST_NORMAL.search(post):
        return NEGATIVE
    if question or _UNC_PRE.search(upto) or _UNC_POST.search(post) or _UNC_ALT_PRE.search(pre):
        return UNCERTAIN
    return POSITIVE


def _mask(clause: str, pattern: re.Pattern | None) -> str:
    if pattern is None:
        return clause
    return pattern.sub(lambda m: "#" * len(m.group(0)), clause)


def _clause_mentions(clause: str, question: bool):
    """Yield (observation, label, start, end, kind) for every mention in one clause; kind: finding|evidence|normal."""
    for obs in OBSERVATIONS[1:]:
        if not _TRIGGERS_RE[obs].search(clause):
            continue
        text = _mask(clause, _NOT_RE.get(obs))
        for kind, table in (("finding", _FINDINGS_RE), ("evidence", _EVIDENCE_RE)):
            if obs in table:
                for m in table[obs].finditer(text):
                    yield obs, _classify(clause, m.start(), m.end(), question), m.start(), m.end(), kind
        normal = _NORMALS_RE.get(obs)
        if normal is not None:
            for m in normal.finditer(text):
                upper = re.search(r"upper|high|top|borderline", m.group(0))
                yield obs, (UNCERTAIN if upper and obs in _HEART_OBS else NEGATIVE), m.start(), m.end(), "normal"


def _sentence_mentions(sentence: str):
    """(observation, label, clause, start, end) for every mention of one sentence."""
    question = sentence.rstrip().endswith("?")
    if _HEADING.fullmatch(sentence):
        return
    found = [
        (obs, lab, clause, a, b, kind)
        for clause in _clauses(sentence)
        if not REFUSAL.search(clause)
        for obs, lab, a, b, kind in _clause_mentions(clause, question)
    ]
    named = {obs for obs, *_, kind in found if kind == "finding"}
    for obs, lab, clause, a, b, kind in found:
        if not (kind == "evidence" and obs in named):
            yield obs, lab, clause, a, b


@lru_cache(maxsize=65536)
def _label_sentence(sentence: str) -> tuple:
    """Per-sentence mention labels, cached: reports and teacher answers repeat sentences a lot."""
    out = []
    for obs, lab, clause, a, b in _sentence_mentions(sentence):
        out.append((obs, lab))
        if obs == "Edema" and lab != NEGATIVE and _CHF.search(clause[a:b]):
            out.append(("Cardiomegaly", UNCERTAIN))  # CheXpert's exception for "heart failure" / "CHF"
    return tuple(out)


def _aggregate(labels: list[int]) -> int:
    # CheXpert: 1 with anything -> 1; -1 with 0 -> -1; otherwise all the same.
    if POSITIVE in labels:
        return POSITIVE
    return UNCERTAIN if UNCERTAIN in labels else NEGATIVE


def label(text: str | None) -> dict[str, int | None]:
    """Label one text. Returns {observation: 1 | 0 | -1 | None} for all 14 CheXpert observations."""
    out: dict[str, int | None] = dict.fromkeys(OBSERVATIONS)
    sents = sentences(text or "")
    found: dict[str, list[int]] = {}
    for s in sents:
        for obs, lab in _label_sentence(s):
            found.setdefault(obs, []).append(lab)
    if not found and (not sents or any(REFUSAL.search(s) for s in sents)):
        return out  # empty, or a refusal that states no finding: nothing to label
    for obs, labs in found.items():
        out[obs] = _aggregate(labs)
    finding = any(out[o] in (POSITIVE, UNCERTAIN) for o in OBSERVATIONS[1:] if o != "Support Devices")
    out["No Finding"] = NEGATIVE if finding else POSITIVE
    return out


def label_many(texts) -> list[dict[str, int | None]]:
    return [label(t) for t in texts]


# ----------------------------------------------------------------------------- laterality

_SIDE_RE = re.compile(rf"\b{_SIDE_TOKEN}\b")
_BOTH_RE = re.compile(
    r"\b(?:right|left) (?:greater|more|larger|worse) than (?:right|left)\b|\b(?:right|left) (?:and|>|/) (?:right|"
    r"left)\b"
)
_NO_SIDE = {"No Finding", "Cardiomegaly", "Enlarged Cardiomediastinum"}


def _side_word(w: str) -> str:
    if w.startswith(("bi", "both")):
        return "bilateral"
    if w.startswith(("ling", "ll", "lu")) or w == "left":
        return "left"
    return "right"


def _mention_side(clause: str, a: int, b: int) -> str | None:
    """Side words nearest a mention in its clause: before it first ("left pleural effusion"), else just after it."""
    both = _BOTH_RE.search(clause)
    if both and (abs(both.end() - a) < 40 or abs(both.start() - b) < 40):
        return "bilateral"
    inside = _SIDE_RE.search(clause[a:b])  # "blunting of the left costophrenic angle"
    if inside:
        return _side_word(inside.group(0))
    before = list(_SIDE_RE.finditer(clause[max(0, a - 60) : a]))
    if before:
        return _side_word(before[-1].group(0))
    after = _SIDE_RE.search(clause[b : b + 40])
    return _side_word(after.group(0)) if after else None


def laterality(text: str | None) -> dict[str, str]:
    """Side of every positive/uncertain lateral finding: {observation: "left" | "right" | "bilateral"}.
    Findings seen on both sides (or called bilateral) are "bilateral"; observations without a side are left out."""
    sides: dict[str, set[str]] = {}
    for s in sentences(text or ""):
        for obs, lab, clause, a, b in _sentence_mentions(s):
            if obs in _NO_SIDE or lab not in (POSITIVE, UNCERTAIN):
                continue
            side = _mention_side(clause, a, b)
            if side:
                sides.setdefault(obs, set()).add(side)
    return {obs: (next(iter(v)) if len(v) == 1 else "bilateral") for obs, v in sides.items()}
