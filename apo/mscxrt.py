"""MS-CXR-T temporal image classification (`apo eval-mscxrt`): is a finding improving, stable or worsening?

Input: the official CSV `MS_CXR_T_temporal_image_classification_v1.0.0.csv` (PhysioNet, MS-CXR-T 1.0.0): one row per
image pair with `subject_id, study_id, dicom_id, previous_dicom_id` (and `previous_study_id`), and one
`<finding>_progression` column per finding (consolidation, edema, pleural_effusion, pneumonia, pneumothorax), empty
where that finding was not labelled. Every labelled (row, finding) is one question. Images are read in the
MIMIC-CXR-JPG layout under --image-root: files/pXX/p<subject>/s<study>/<dicom_id>.jpg; without a
previous_study_id column the previous image is looked up among the subject's studies.

The model sees the previous and the current image in one prompt and answers in words; `parse_progression` maps the
answer to a class. An unparseable answer counts as wrong and is listed in OUT/unparsed.jsonl. Reported: Top-1
accuracy per finding and their mean (macro over findings, as the paper's "average") in OUT/mscxrt.json. Answers go
to OUT/mscxrt_predictions.jsonl (resumable), so OUT can be shared with `apo eval-report` (OUT/predictions.jsonl).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

from apo.constants import MSCXRT_CLASSES, MSCXRT_FINDINGS

PROMPT = ("The first image is the previous study, the second the current study. Compared with the previous study, "
          "is the {finding} improving, stable or worsening? Answer with one word.")

# ---------------------------------------------------------------- answer -> class

_STABLE = (r"stable|unchanged|steady|similar|the same|no (?:significant |appreciable |substantial |definite |"
           r"interval |major |real )?(?:interval )?change|not (?:significantly )?changed|without (?:significant )?change")
_IMPROVING = (r"improv\w*|better|resolv\w*|resolution|decreas\w*|reduc\w*|smaller|regress\w*|clearing|"
              r"diminish\w*|less(?:ened)?")
_WORSENING = r"wors\w*|increas\w*|progress\w*|larger|enlarg\w*|deteriorat\w*|more extensive|more severe"
_MENTION = re.compile(rf"\b(?:(?P<stable>{_STABLE})|(?P<improving>{_IMPROVING})|(?P<worsening>{_WORSENING}))\b")
_SCOPE = re.compile(r"[.,;:!?]|\b(?:but|however|rather|although|though|and|or|instead)\b")
_NEGATED = re.compile(r"(?:\b(?:not|no|never|without|nor|neither|hardly)\b|n't)(?:\s+\w+){0,2}\s*$")


def parse_progression(answer: str | None) -> str | None:
    """"improving" | "stable" | "worsening" | None. The first class stated wins ("Worsening. It has increased.");
    a negated direction ("not worsening", "has not improved", "no progression") means stable unless another class
    is stated too ("not worsening but improving" -> improving); "not stable", or nothing recognisable, is None."""
    if not answer:
        return None
    text = " ".join(answer.lower().split())
    stated, negated = [], []
    for m in _MENTION.finditer(text):
        cls = m.lastgroup
        clause = _SCOPE.split(text[:m.start()])[-1]  # a negation reaches to the end of its clause only
        (negated if cls != "stable" and _NEGATED.search(clause) else stated).append(cls)
        if cls == "stable" and _NEGATED.search(clause) and not m.group(0).startswith(("no ", "not ", "without ")):
            stated.pop()  # "not stable", "not unchanged": says only what it is not
            negated.append(cls)
    if stated:
        return stated[0]
    if any(c != "stable" for c in negated):
        return "stable"
    return None


# ---------------------------------------------------------------- the CSV

def finding_name(finding: str) -> str:
    return finding.replace("_", " ")


def _previous_image(root: Path, row: dict) -> Path | None:
    from apo.data import mimic_image_path

    prev_study = (row.get("previous_study_id") or "").strip()
    if prev_study:
        return mimic_image_path(root, row["subject_id"], prev_study, row["previous_dicom_id"])
    subject = str(row["subject_id"]).strip().lstrip("p")
    hits = sorted((root / "files" / f"p{subject[:2]}" / f"p{subject}").glob(f"s*/{row['previous_dicom_id']}.jpg"))
    return hits[0] if hits else None


def read_pairs(csv_path, image_root, skip_bad=False) -> tuple[list[dict], list[dict]]:
    """-> (items, rejects). One item per labelled (row, finding): {case_id, finding, label, images [prev, cur],
    row}. A bad row raises DataError(csv, line, reason) unless skip_bad (then it goes to rejects)."""
    from apo.data import mimic_image_path
    from apo.errors import ApoError, DataError

    csv_path, root = Path(csv_path), Path(image_root)
    if not csv_path.is_file():
        raise ApoError(f"--csv {csv_path}: file not found")
    if not root.is_dir():
        raise ApoError(f"--image-root {root}: not a folder (the MIMIC-CXR-JPG root, holding files/)")
    items, rejects, seen = [], [], set()
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        findings = [f for f in MSCXRT_FINDINGS if f"{f}_progression" in cols]
        missing = [c for c in ("subject_id", "study_id", "dicom_id", "previous_dicom_id") if c not in cols]
        if missing or not findings:
            raise DataError(csv_path, 1, f"not an MS-CXR-T temporal CSV: missing column(s) "
                                         f"{missing or [f + '_progression' for f in MSCXRT_FINDINGS]}")
        for line, row in enumerate(reader, 2):  # line 1 is the header
            try:
                for c in ("subject_id", "study_id", "dicom_id", "previous_dicom_id"):
                    if not (row.get(c) or "").strip():
                        raise ValueError(f"missing {c}")
                labelled = []
                for f in findings:
                    value = (row.get(f"{f}_progression") or "").strip().lower()
                    if value and value not in MSCXRT_CLASSES:
                        raise ValueError(f"unknown class {value!r} in {f}_progression (expected one of {MSCXRT_CLASSES})")
                    if value:
                        labelled.append((f, value))
                if not labelled:
                    raise ValueError("no <finding>_progression label in this row")
                cur = mimic_image_path(root, row["subject_id"].strip(), row["study_id"].strip(), row["dicom_id"].strip())
                prev = _previous_image(root, {k: (v or "").strip() for k, v in row.items() if k})
                for what, p in (("current", cur), ("previous", prev)):
                    if p is None or not p.is_file():
                        raise ValueError(f"{what} image not found: {p or row['previous_dicom_id'] + '.jpg under the subject'}")
                new = []
                for f, value in labelled:
                    cid = f"{row['previous_dicom_id'].strip()}->{row['dicom_id'].strip()}/{f}"
                    if cid in seen:
                        raise ValueError(f"duplicate pair and finding {cid}")
                    new.append({"case_id": cid, "finding": f, "label": value, "images": [str(prev), str(cur)],
                                "row": line})
            except ValueError as e:
                if not skip_bad:
                    raise DataError(csv_path, line, str(e)) from None
                rejects.append({"file": str(csv_path), "record": line, "reason": str(e), "raw": row})
                continue
            seen.update(it["case_id"] for it in new)
            items.extend(new)
    return items, rejects


def score(items, records: dict) -> dict:
    """Top-1 per finding, the macro average over findings and the micro accuracy over all questions."""
    hits, n = Counter(), Counter()
    for it in items:
        n[it["finding"]] += 1
        hits[it["finding"]] += records[it["case_id"]]["prediction"] == it["label"]
    per = {f: round(hits[f] / n[f], 6) for f in MSCXRT_FINDINGS if n[f]}
    return {"per_finding": per, "average": round(sum(per.values()) / len(per), 6) if per else None,
            "micro": round(sum(hits.values()) / sum(n.values()), 6) if n else None, "n": dict(n),
            "unparsed": sum(records[it["case_id"]]["prediction"] is None for it in items)}


# ---------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    from apo.generation import add_model_arguments

    add_model_arguments(parser)
    parser.set_defaults(max_new_tokens=16)
    parser.add_argument("--csv", required=True, help="MS_CXR_T_temporal_image_classification_v1.0.0.csv")
    parser.add_argument("--image-root", required=True, help="MIMIC-CXR-JPG root (holds files/pXX/...)")
    parser.add_argument("--out", required=True, help="output folder: mscxrt.json, mscxrt_predictions.jsonl, unparsed.jsonl")
    parser.add_argument("--skip-bad", action="store_true", help="put bad CSV rows in OUT/mscxrt_rejects.jsonl and go on")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only (a smoke test)")


def run(args) -> int:
    from apo.errors import ApoError
    from apo.generation import generate, model_from_args, run_resumable
    from apo.resumable import write_json_atomic, write_jsonl_atomic

    out = Path(args.out)
    items, rejects = read_pairs(args.csv, args.image_root, args.skip_bad)
    if rejects:
        write_jsonl_atomic(out / "mscxrt_rejects.jsonl", rejects)
        print(f"{args.csv}: skipped {len(rejects)} bad row(s); reasons in {out / 'mscxrt_rejects.jsonl'}")
    items = items[:args.limit] if args.limit else items
    if not items:
        raise ApoError(f"{args.csv}: no usable question")
    model, processor = model_from_args(args)

    def process(chunk):
        answers = generate(model, processor, [(it["images"], PROMPT.format(finding=finding_name(it["finding"])))
                                              for it in chunk],
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
        return [{"case_id": it["case_id"], "finding": it["finding"], "label": it["label"], "answer": a,
                 "prediction": parse_progression(a)} for it, a in zip(chunk, answers)]

    records = run_resumable(out / "mscxrt_predictions.jsonl", items, key=lambda it: it["case_id"], process=process,
                            chunk_size=args.batch_size * 4, desc="ms-cxr-t")
    if records is None:  # not rank 0
        return 0
    result = score(items, records)
    write_json_atomic(out / "mscxrt.json", result)
    write_jsonl_atomic(out / "unparsed.jsonl", [records[it["case_id"]] for it in items
                                                if records[it["case_id"]]["prediction"] is None])
    print("MS-CXR-T Top-1: " + ", ".join(f"{f} {a:.3f} (n={result['n'][f]})" for f, a in result["per_finding"].items()))
    print(f"  average (macro over findings) {result['average']:.3f}; unparsed answers {result['unparsed']} "
          f"(counted wrong; listed in {out / 'unparsed.jsonl'})")
    return 0
