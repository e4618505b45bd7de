#!/usr/bin/env python
"""Validate apo.evaluation.labeler on real text: the 3,955 Indiana University chest X-ray reports shipped in
torchxrayvision.

Each report (FINDINGS + IMPRESSION, read from the installed package's `data/NLMCXR_reports.tgz`, never copied) is
labelled by `apo.evaluation.labeler.label`; its manual MeSH `<major>` tags ("Pleural Effusion/right/small",
"Cardiomegaly/mild", "normal") are mapped to CheXpert observations (MESH below) and taken as the truth. For every
observation we report precision / recall / F1 of `label(text) == 1` against "a tag maps to it", with the support
(reports so tagged), plus F1 when uncertain (-1) also counts as positive, and the side agreement of `laterality`
where the tag names a side.

The mapping (tag head, then qualifiers):
  Cardiomegaly               Cardiomegaly; Cardiac Shadow/enlarged
  Enlarged Cardiomediastinum Mediastinum/{prominent,enlarged,widened}; Lung/hilum/{prominent,enlarged}
  Lung Opacity               Opacity, Density (lung/retrocardiac/unqualified), Infiltrate, Airspace Disease,
                             Markings/../interstitial, Lung Diseases, Interstitial, Pulmonary Fibrosis,
                             Cicatrix/lung (CheXpert counts "scar" as lung opacity), Lung/interstitial
  Lung Lesion                Nodule, Mass (not breast), Cavitation, Opacity/Density qualified "round" (a nodular
                             opacity; CheXpert counts "nodular opacity/density" as a lesion); not Granuloma (nor does
                             CheXpert)
  Edema                      Pulmonary Edema, Edema, Pulmonary Congestion, Heart Failure
  Consolidation              Consolidation
  Pneumonia                  Pneumonia
  Atelectasis                Pulmonary Atelectasis, Volume Loss
  Pneumothorax               Pneumothorax, Hydropneumothorax, Hemopneumothorax
  Pleural Effusion           Pleural Effusion, Costophrenic Angle/blunted, Pleura/blunted, Hydropneumothorax,
                             Hemothorax, Hemopneumothorax
  Pleural Other              Thickening/pleura, Cicatrix/pleura
  Fracture                   Fractures, Bone
  Support Devices            Catheters, Indwelling; Implanted Medical Device; Tube, Inserted; Medical Device; Stents
                             (not Surgical Instruments / Sutures: in IU mostly surgical clips, which CheXpert does not
                             count as support devices, and neither does the labeler)
  No Finding                 no tag maps to any of the 12 pathology observations (CheXpert's definition; tags such as
                             Calcified Granuloma, Scoliosis or "normal" leave it positive)
A tag qualified "borderline" is uncertain: that report is left out of that observation's counts. Reports tagged
"No Indexing" are left out altogether.

Usage: python scripts/validate_labeler.py [--out docs/labeler_validation.md] [--limit N] [--errors OBS]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from apo.constants import OBSERVATIONS  # noqa: E402
from apo.errors import ApoError  # noqa: E402
from apo.evaluation.labeler import label, laterality  # noqa: E402

_LUNGISH = ("lung", "retrocardiac")


def _opacity(q):  # Opacity/Density on the lung (not ribs, breast, soft tissue)
    return not q or any(x.startswith(_LUNGISH) for x in q) or q[0] in ("left", "right", "bilateral", "interstitial")


MESH = {
    "Cardiomegaly": [("Cardiomegaly", None), ("Cardiac Shadow", lambda q: "enlarged" in q)],
    "Enlarged Cardiomediastinum": [
        ("Mediastinum", lambda q: bool({"prominent", "enlarged", "widened"} & set(q))),
        ("Lung", lambda q: "hilum" in q and bool({"prominent", "enlarged"} & set(q))),
    ],
    "Lung Opacity": [
        ("Opacity", _opacity),
        ("Density", _opacity),
        ("Infiltrate", None),
        ("Airspace Disease", None),
        ("Markings", lambda q: "interstitial" in q),
        ("Lung Diseases, Interstitial", None),
        ("Pulmonary Fibrosis", None),
        ("Cicatrix", lambda q: bool(q) and q[0] == "lung"),
        ("Lung", lambda q: "interstitial" in q),
    ],
    "Lung Lesion": [
        ("Nodule", None),
        ("Mass", lambda q: "breast" not in q),
        ("Cavitation", None),
        ("Opacity", lambda q: "round" in q and _opacity(q)),
        ("Density", lambda q: "round" in q and _opacity(q)),
    ],
    "Edema": [("Pulmonary Edema", None), ("Edema", None), ("Pulmonary Congestion", None), ("Heart Failure", None)],
    "Consolidation": [("Consolidation", None)],
    "Pneumonia": [("Pneumonia", None)],
    "Atelectasis": [("Pulmonary Atelectasis", None), ("Volume Loss", None)],
    "Pneumothorax": [("Pneumothorax", None), ("Hydropneumothorax", None), ("Hemopneumothorax", None)],
    "Pleural Effusion": [
        ("Pleural Effusion", None),
        ("Costophrenic Angle", lambda q: "blunted" in q),
        ("Pleura", lambda q: "blunted" in q),
        ("Hydropneumothorax", None),
        ("Hemothorax", None),
        ("Hemopneumothorax", None),
    ],
    "Pleural Other": [
        ("Thickening", lambda q: bool(q) and q[0] == "pleura"),
        ("Cicatrix", lambda q: bool(q) and q[0] == "pleura"),
    ],
    "Fracture": [("Fractures, Bone", None)],
    "Support Devices": [
        ("Catheters, Indwelling", None),
        ("Implanted Medical Device", None),
        ("Tube, Inserted", None),
        ("Medical Device", None),
        ("Stents", None),
    ],
}
PATHOLOGIES = [o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices")]


def reports_archive() -> str:
    """Path of NLMCXR_reports.tgz inside the installed torchxrayvision (found without importing torch)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ApoError(
            "torchxrayvision is not installed: it ships the Indiana University reports (bash scripts/setup.sh)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "NLMCXR_reports.tgz")
    if not os.path.exists(path):
        raise ApoError(f"{path} not found in the installed torchxrayvision")
    return path


def read_iu_reports(path: str | None = None, limit: int | None = None) -> list[dict]:
    """[{id, text, tags}] in file-name order; text = FINDINGS + IMPRESSION; tags = the MeSH <major> strings."""
    out = []
    with tarfile.open(path or reports_archive()) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.endswith(".xml")),
            key=lambda m: int(re.sub(r"\D", "", os.path.basename(m.name)) or 0),
        )
        for m in members[:limit]:
            root = ET.fromstring(tar.extractfile(m).read())
            parts = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
            text = " ".join(p for p in (parts.get("FINDINGS"), parts.get("IMPRESSION")) if p)
            tags = [(t.text or "").strip() for t in root.iter("major")]
            out.append({"id": os.path.basename(m.name)[:-4], "text": text, "tags": tags})
    return out


def _tag_side(q):
    q = set(q)
    if "bilateral" in q or {"left", "right"} <= q:
        return "bilateral"
    if "left" in q or "lingula" in q:
        return "left"
    if "right" in q or "middle lobe" in q:
        return "right"
    return None


def tags_to_truth(tags: list[str]) -> tuple[dict, dict]:
    """MeSH tags -> ({observation: 1 | 0 | None(uncertain: skip)}, {observation: side})."""
    truth = {o: 0 for o in OBSERVATIONS}
    sides: dict[str, set] = {}
    for tag in tags:
        head, *q = [p.strip() for p in tag.split("/")]
        q = [x.lower() for x in q]
        for obs, rules in MESH.items():
            if any(h == head and (f is None or f(q)) for h, f in rules):
                if "borderline" in q:
                    truth[obs] = truth[obs] or None  # uncertain unless another tag makes it certain
                else:
                    truth[obs] = 1
                    s = _tag_side(q)
                    if s:
                        sides.setdefault(obs, set()).add(s)
    truth["No Finding"] = 0 if any(truth[o] != 0 for o in PATHOLOGIES) else 1
    side = {o: (next(iter(s)) if len(s) == 1 else "bilateral") for o, s in sides.items()}
    return truth, side


def _prf(tp, fp, fn):
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def validate(reports: list[dict]) -> dict:
    """Per-observation counts and P/R/F1 of label()==1 (and of label() in {1,-1}) against the mapped MeSH tags,
    micro/macro over the observations with support, and laterality agreement. Pure: no I/O."""
    counts = {o: dict(tp=0, fp=0, fn=0, tp_u=0, fp_u=0, fn_u=0, support=0) for o in OBSERVATIONS}
    side_ok = side_n = 0
    errors: dict[str, list] = {o: [] for o in OBSERVATIONS}
    n = 0
    t0 = time.perf_counter()
    for rep in reports:
        if "No Indexing" in rep["tags"] or not rep["text"]:
            continue
        n += 1
        truth, tside = tags_to_truth(rep["tags"])
        pred = label(rep["text"])
        pside = laterality(rep["text"])
        for o in OBSERVATIONS:
            t = truth[o]
            if t is None:
                continue
            c = counts[o]
            c["support"] += t
            for pos, k in ((pred[o] == 1, ""), (pred[o] in (1, -1), "_u")):
                c["tp" + k] += bool(pos and t)
                c["fp" + k] += bool(pos and not t)
                c["fn" + k] += bool(t and not pos)
            if (pred[o] == 1) != bool(t):
                errors[o].append((rep["id"], "FP" if pred[o] == 1 else "FN", pred[o], rep["text"], rep["tags"]))
            if t and pred[o] == 1 and o in tside and o in pside:
                side_n += 1
                side_ok += pside[o] == tside[o]
    seconds = time.perf_counter() - t0
    rows = {}
    for o, c in counts.items():
        p, r, f = _prf(c["tp"], c["fp"], c["fn"])
        rows[o] = dict(c, precision=p, recall=r, f1=f, f1_u=_prf(c["tp_u"], c["fp_u"], c["fn_u"])[2])
    with_support = [o for o in OBSERVATIONS if counts[o]["support"]]
    tot = {k: sum(counts[o][k] for o in with_support) for k in ("tp", "fp", "fn")}
    micro = dict(zip(("precision", "recall", "f1"), _prf(tot["tp"], tot["fp"], tot["fn"])))
    macro = {
        k: sum(rows[o][k] for o in with_support) / max(len(with_support), 1) for k in ("precision", "recall", "f1")
    }
    return {
        "n_reports": n,
        "rows": rows,
        "micro": micro,
        "macro": macro,
        "errors": errors,
        "laterality": {"n": side_n, "agree": side_ok, "accuracy": side_ok / side_n if side_n else None},
        "seconds": seconds,
    }


def markdown_table(res: dict) -> str:
    lines = [
        f"Labeler vs MeSH tags on {res['n_reports']} Indiana University reports (positive = label 1).",
        "",
        "| observation | support | TP | FP | FN | precision | recall | F1 | F1 (1 or -1) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o, r in res["rows"].items():
        lines.append(
            f"| {o} | {r['support']} | {r['tp']} | {r['fp']} | {r['fn']} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['f1']:.3f} | {r['f1_u']:.3f} |"
        )
    for name in ("micro", "macro"):
        m = res[name]
        lines.append(f"| **{name}** |  |  |  |  | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |  |")
    lat = res["laterality"]
    if lat["n"]:
        lines += [
            "",
            f"Laterality: side agrees with the tag's side for {lat['agree']}/{lat['n']} true-positive "
            f"lateral findings ({lat['accuracy']:.3f}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--limit", type=int, help="only the first N reports")
    ap.add_argument("--errors", metavar="OBS", help="print up to 25 disagreements for this observation")
    args = ap.parse_args(argv)
    reports = read_iu_reports(limit=args.limit)
    res = validate(reports)
    table = markdown_table(res)
    print(table)
    print(f"labelled {res['n_reports']} reports in {res['seconds']:.2f} s")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.errors:
        for rid, kind, p, text, tags in res["errors"][args.errors][:25]:
            print(f"--- {rid} {kind} pred={p} tags={tags}\n{text}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ApoError as e:
        print(f"validate_labeler: error: {e}", file=sys.stderr)
        sys.exit(2)
