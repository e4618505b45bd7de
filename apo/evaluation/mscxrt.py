"""MS-CXR-T temporal image classification (`apo eval-mscxrt`): is a finding improving, stable or worsening?

Input: the official CSV `MS_CXR_T_temporal_image_classification_v1.0.0.csv` (PhysioNet, MS-CXR-T 1.0.0): one row per
image pair with `subject_id, study_id, dicom_id, previous_dicom_id` (and `previous_study_id`), and one
`<finding>_progression` column per finding (consolidation, edema, pleural_effusion, pneumonia, pneumothorax), empty
where that finding was not labelled, and its `<finding>_label_quality` (one_expert, multiple_experts,
disagreement: how many radiologists rated it and whether they agreed; optional). Every labelled (row, finding) is
one question; `--label-quality Q [Q ...]` keeps the questions of those qualities only. Images are read in the
MIMIC-CXR-JPG layout under --image-root: files/pXX/p<subject>/s<study>/<dicom_id>.jpg; without a
previous_study_id column the previous image is looked up among the subject's studies.

The model sees the previous and the current image in one prompt and answers in words; `parse_progression` maps the
answer to a class. An unparseable answer counts as wrong and is listed in OUT/unparsed.jsonl. Reported in
OUT/mscxrt.json: Top-1 accuracy per finding and their mean over findings ("average", the paper's); beside it the
class-balanced accuracy (mean recall over improving/stable/worsening, BioViL-T's "macro accuracy") per finding and
its mean ("average_macro"); the recall per class (`per_class`); and all of it per label quality
(`by_label_quality`). Answers go
to OUT/mscxrt_predictions.jsonl (resumable), so OUT can be shared with `apo eval-report` (OUT/predictions.jsonl).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

from apo.constants import MSCXRT_CLASSES, MSCXRT_FINDINGS
from apo.data import ImageResolver, image_rules
from apo.errors import ApoError, DataError
from apo.io.jobs import check_outputs, claim, fingerprint, run_resumable
from apo.io.mimic import ID_RULE, is_mimic_id, mimic_image_path, previous_image
from apo.io.records import Rejects, not_utf8, write_rejects
from apo.io.resumable import write_json_atomic, write_jsonl_atomic
from apo.model import generation  # generation.generate looked up per call: tests stand in for it
from apo.model.generation import (
    add_model_arguments,
    add_overwrite_argument,
    model_from_args,
    model_identity,
    pixels_from_args,
)

LABEL_QUALITIES = ("one_expert", "multiple_experts", "disagreement")

PROMPT = (
    "The first image is the previous study, the second the current study. Compared with the previous study, "
    "is the {finding} improving, stable or worsening? Answer with one word."
)

# ---------------------------------------------------------------- answer -> class

_STABLE = (
    r"stable|unchanged|steady|similar|the same|no (?:significant |appreciable |substantial |definite |"
    r"interval |major |real )?(?:interval )?change|not (?:significantly )?changed|without (?:significant )?change"
)
_IMPROVING = (
    r"improv\w*|better|resolv\w*|resolution|decreas\w*|reduc\w*|smaller|regress\w*|clearing|"
    r"diminish\w*|less(?:ened)?"
)
_WORSENING = r"wors\w*|increas\w*|progress\w*|larger|enlarg\w*|deteriorat\w*|more extensive|more severe"
_MENTION = re.compile(rf"\b(?:(?P<stable>{_STABLE})|(?P<improving>{_IMPROVING})|(?P<worsening>{_WORSENING}))\b")
_SCOPE = re.compile(r"[.,;:!?]|\b(?:but|however|rather|although|though|and|or|instead)\b")
_NEGATED = re.compile(r"(?:\b(?:not|no|never|without|nor|neither|hardly)\b|n't)(?:\s+\w+){0,2}\s*$")


def parse_progression(answer: str | None) -> str | None:
    """ "improving" | "stable" | "worsening" | None. The first class stated wins ("Worsening. It has increased.");
    a negated direction ("not worsening", "has not improved", "no progression") means stable unless another class
    is stated too ("not worsening but improving" -> improving); "not stable", or nothing recognisable, is None."""
    if not answer:
        return None
    text = " ".join(answer.lower().split())
    stated, negated = [], []
    for m in _MENTION.finditer(text):
        cls = m.lastgroup
        clause = _SCOPE.split(text[: m.start()])[-1]  # a negation reaches to the end of its clause only
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


def _decoded_lines(data: bytes, bad_utf8: dict):
    """The CSV's lines as text; a line that is not UTF-8 is replaced (and its number noted in bad_utf8)."""
    for i, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_utf8[i] = not_utf8(e)
            yield raw.decode("utf-8", "replace")


def read_pairs(csv_path, image_root, skip_bad=False, image_rules=None) -> tuple[list[dict], list[dict]]:
    """-> (items, rejects). One item per labelled (row, finding): {case_id, finding, label, images [prev, cur],
    row}. A bad row raises DataError(csv, line, reason) unless skip_bad (then it goes to rejects). Ids must be plain
    MIMIC ids (no path separators or wildcards), so an image path never leaves --image-root; images are checked up
    front (exist, decode, not absurdly large), like the data loader does."""
    csv_path, root = Path(csv_path), Path(image_root)
    if not csv_path.is_file():
        raise ApoError(f"--csv {csv_path}: file not found")
    if not root.is_dir():
        raise ApoError(f"--image-root {root}: not a folder (the MIMIC-CXR-JPG root, holding files/)")
    root = root.resolve()
    rows, seen, bad_utf8 = [], set(), {}
    rejects = Rejects(csv_path, skip_bad)
    bad = rejects.add

    reader = csv.DictReader(_decoded_lines(csv_path.read_bytes().removeprefix(b"\xef\xbb\xbf"), bad_utf8))
    try:
        cols = reader.fieldnames or []
    except csv.Error as e:
        raise DataError(csv_path, 1, f"not a CSV file ({e})") from None
    findings = [f for f in MSCXRT_FINDINGS if f"{f}_progression" in cols]
    has_quality = any(f"{f}_label_quality" in cols for f in findings)
    missing = [c for c in ("subject_id", "study_id", "dicom_id", "previous_dicom_id") if c not in cols]
    if 1 in bad_utf8:
        raise DataError(csv_path, 1, bad_utf8[1])
    if missing or not findings:
        raise DataError(
            csv_path,
            1,
            f"not an MS-CXR-T temporal CSV: missing column(s) "
            f"{missing or [f + '_progression' for f in MSCXRT_FINDINGS]}",
        )
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            bad(reader.reader.line_num, f"unreadable CSV row ({e})", None)  # DictReader's own count lags on errors
            continue
        line = reader.line_num
        extra = row.pop(None, None)  # fields beyond the header
        row = {k: (v or "").strip() for k, v in row.items()}
        try:
            if line in bad_utf8:
                raise ValueError(bad_utf8[line])
            if extra:
                raise ValueError(f"{len(extra)} more field(s) than the header has")
            for c in ("subject_id", "study_id", "dicom_id", "previous_dicom_id"):
                if not row.get(c):
                    raise ValueError(f"missing {c}")
            for c in ("subject_id", "study_id", "dicom_id", "previous_dicom_id", "previous_study_id"):
                if row.get(c) and not is_mimic_id(row[c]):
                    raise ValueError(f"{c} {row[c][:80]!r} is not a MIMIC id ({ID_RULE})")
            labelled = []
            for f in findings:
                value = row.get(f"{f}_progression", "").lower()
                if value and value not in MSCXRT_CLASSES:
                    raise ValueError(
                        f"unknown class {value[:80]!r} in {f}_progression (expected one of {MSCXRT_CLASSES})"
                    )
                quality = row.get(f"{f}_label_quality", "").lower() or None
                if quality and quality not in LABEL_QUALITIES:
                    raise ValueError(
                        f"unknown label quality {quality[:80]!r} in {f}_label_quality (expected one of "
                        f"{LABEL_QUALITIES})"
                    )
                if value:
                    labelled.append((f, value, quality))
            if not labelled:
                raise ValueError("no <finding>_progression label in this row")
            cur = mimic_image_path(root, row["subject_id"], row["study_id"], row["dicom_id"])
            prev = previous_image(root, row["subject_id"], row["previous_dicom_id"], row.get("previous_study_id"))
            for what, p in (("current", cur), ("previous", prev)):
                if p is None or not p.is_file():
                    raise ValueError(
                        f"{what} image not found: {p or row['previous_dicom_id'] + '.jpg under the subject'}"
                    )
                if not p.resolve().is_relative_to(root):  # a symlink out of the tree
                    raise ValueError(f"{what} image {p} leaves --image-root {root}")
            new = []
            for f, value, quality in labelled:
                cid = f"{row['previous_dicom_id']}->{row['dicom_id']}/{f}"
                if cid in seen:
                    raise ValueError(f"duplicate pair and finding {cid}")
                new.append(
                    {
                        "case_id": cid,
                        "finding": f,
                        "label": value,
                        "images": [str(prev), str(cur)],
                        "row": line,
                        "label_quality": quality if has_quality else None,
                        "previous_study_id": row.get("previous_study_id") or None,
                    }
                )
        except ValueError as e:
            bad(line, str(e), row)
            continue
        seen.update(it["case_id"] for it in new)
        rows.append((line, row, new))
    check = ImageResolver(root, allow_absolute=False, verify="full", rules=image_rules)
    check.check_all(p for _, _, new in rows for p in new[0]["images"])
    items = []
    for line, row, new in rows:
        problem = next((check.problem(p) for p in new[0]["images"] if check.problem(p)), None)
        if problem:
            bad(line, problem, row)
            continue
        items.extend(new)
    return items, rejects.items


def _top1(items, records: dict) -> dict:
    hits, n = Counter(), Counter()  # keys: finding and (finding, class)
    for it in items:
        hit = records[it["case_id"]]["prediction"] == it["label"]
        for key in (it["finding"], (it["finding"], it["label"])):
            n[key] += 1
            hits[key] += hit
    found = [f for f in MSCXRT_FINDINGS if n[f]]
    per = {f: round(hits[f] / n[f], 6) for f in found}
    per_class = {f: {c: round(hits[f, c] / n[f, c], 6) for c in MSCXRT_CLASSES if n[f, c]} for f in found}
    macro = {f: round(sum(r.values()) / len(r), 6) for f, r in per_class.items()}  # classes present only
    mean = lambda d: round(sum(d.values()) / len(d), 6) if d else None
    return {
        "per_finding": per,
        "average": mean(per),
        "per_finding_macro": macro,
        "average_macro": mean(macro),
        "per_class": per_class,
        "micro": round(sum(hits[f] for f in found) / len(items), 6) if items else None,
        "n": {f: n[f] for f in found},
        "unparsed": sum(records[it["case_id"]]["prediction"] is None for it in items),
    }


def score(items, records: dict) -> dict:
    """Top-1 per finding and its mean over findings ("average", the paper's); the class-balanced (macro) accuracy
    per finding (mean recall over the classes present) and its mean ("average_macro"); the recall per class; the
    micro accuracy over all questions; and the same per label quality (`by_label_quality`, when the CSV has it)."""
    out = _top1(items, records)
    qualities = [q for q in LABEL_QUALITIES if any(it.get("label_quality") == q for it in items)]
    if any(it.get("label_quality") is None for it in items) and qualities:
        qualities.append("unknown")  # a rated finding whose quality cell is empty
    out["by_label_quality"] = {
        q: _top1([it for it in items if (it.get("label_quality") or "unknown") == q], records) for q in qualities
    }
    return out


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(max_new_tokens=16)
    parser.add_argument("--csv", required=True, help="MS_CXR_T_temporal_image_classification_v1.0.0.csv")
    parser.add_argument("--image-root", required=True, help="MIMIC-CXR-JPG root (holds files/pXX/...)")
    parser.add_argument(
        "--out", required=True, help="output folder: mscxrt.json, mscxrt_predictions.jsonl, unparsed.jsonl"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="put bad CSV rows in OUT/mscxrt_rejects.jsonl and go on"
    )
    parser.add_argument(
        "--label-quality",
        nargs="+",
        choices=LABEL_QUALITIES,
        default=None,
        help="keep only questions whose <finding>_label_quality is one of these (the CSV must have the columns)",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N questions only (a smoke test)")
    add_overwrite_argument(parser)


def select_quality(items: list[dict], qualities, csv_path) -> list[dict]:
    """The questions whose label quality is one of `qualities` (None: all)."""
    if not qualities:
        return items
    if items and all(it.get("label_quality") is None for it in items):
        raise ApoError(f"--label-quality: {csv_path} has no <finding>_label_quality column")
    return [it for it in items if it.get("label_quality") in qualities]


def run_identity(args) -> dict:
    return {
        "command": "eval-mscxrt",
        "csv": fingerprint(args.csv),
        "image_root": str(Path(args.image_root).resolve()),
        "prompt": PROMPT,
        **model_identity(args),
    }


def run(args) -> int:
    out = Path(args.out)
    check_outputs({"--out": out / "mscxrt_predictions.jsonl"}, {"--csv": args.csv})
    claim(out / "mscxrt_predictions.jsonl", run_identity(args), args.overwrite)  # before the model loads
    items, rejects = read_pairs(args.csv, args.image_root, args.skip_bad, image_rules(args.model))
    if rejects:
        write_rejects(rejects, out / "mscxrt_rejects.jsonl")
        print(f"{args.csv}: skipped {len(rejects)} bad row(s); reasons in {out / 'mscxrt_rejects.jsonl'}")
    else:
        (out / "mscxrt_rejects.jsonl").unlink(missing_ok=True)  # a stale list from an earlier run
    items = select_quality(items, getattr(args, "label_quality", None), args.csv)
    items = items[: args.limit] if args.limit else items
    if not items:
        raise ApoError(f"{args.csv}: no usable question")
    model, processor = model_from_args(args)

    def process(chunk):
        answers = generation.generate(
            model,
            processor,
            [(it["images"], PROMPT.format(finding=finding_name(it["finding"]))) for it in chunk],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            progress=False,
        )
        return [
            {
                "case_id": it["case_id"],
                "finding": it["finding"],
                "label": it["label"],
                "answer": a,
                "prediction": parse_progression(a),
            }
            for it, a in zip(chunk, answers)
        ]

    records = run_resumable(
        out / "mscxrt_predictions.jsonl",
        items,
        key=lambda it: it["case_id"],
        process=process,
        chunk_size=args.batch_size * 4,
        desc="ms-cxr-t",
        identity=run_identity(args),
    )
    if records is None:  # not rank 0
        return 0
    result = score(items, records)
    result["pixel_budget"] = pixels_from_args(args)
    write_json_atomic(out / "mscxrt.json", result)
    write_jsonl_atomic(
        out / "unparsed.jsonl", [records[it["case_id"]] for it in items if records[it["case_id"]]["prediction"] is None]
    )
    print("MS-CXR-T Top-1: " + ", ".join(f"{f} {a:.3f} (n={result['n'][f]})" for f, a in result["per_finding"].items()))
    print(
        f"  average (mean over findings) {result['average']:.3f}; class-balanced (macro) average "
        f"{result['average_macro']:.3f}; unparsed answers {result['unparsed']} "
        f"(counted wrong; listed in {out / 'unparsed.jsonl'})"
    )
    for q, r in result["by_label_quality"].items():
        n = sum(r["n"].values())
        print(f"  {q}: average {r['average']:.3f}, class-balanced {r['average_macro']:.3f} (n={n})")
    return 0
