"""The canonical case record and the loaders that turn every plausible CXR-MAX layout into it.

A *case* is one image (or study) with one question and the N teacher trajectories that answer it:

    Case(case_id, images=[abs paths], prompt, trajectories=[Trajectory(teacher, text)], labels, meta)

Accepted row layouts (detected per row, mixed files are fine):
  long       one row per teacher answer:  {case_id|dicom_id, image, question, model, response, labels?, ...}
  wide       one row per case:            {case_id, image, question, trajectories|responses: {teacher: text}}
  canonical  what `write_cases` writes:   {case_id, images, prompt, trajectories: [{teacher, text}], labels, meta}
  ms-swift   {messages: [{role: user, content: "<image>..."}, {role: assistant, content}], images, teacher?}
Containers: .jsonl, .json (a list, or {"data": [...]}), .parquet, a `datasets.save_to_disk` folder or a local folder
`datasets.load_dataset` understands. Long and ms-swift rows are grouped into cases by case id.

Images: relative paths resolve against --image-root (default: the data file's folder). With no path but
subject/study/dicom ids, the MIMIC-CXR-JPG layout files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg is used.
A path may not leave the image root (".." or an absolute path outside it) unless absolute paths are allowed.
Every image is checked up front (exists, decodes to the end, not absurdly large), so a bad image is a bad
record at load time and never a crash in the middle of training.

Bad records: by default the first one stops the command with `file:record: reason`. With skip_bad, every rejected
record goes to the rejects file (file, record, reason, raw) and the good ones are kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from apo.constants import OBSERVATIONS
from apo.errors import ApoError, DataError
from apo.io.mimic import mimic_image_path
from apo.io.records import Rejects, iter_records, write_rejects
from apo.io.resumable import write_jsonl_atomic
from apo.model.chat import HIGH_BIT_MODES, to_rgb

log = logging.getLogger(__name__)

CASE_ID_KEYS = ("case_id", "id", "uid", "sample_id")
IMAGE_KEYS = ("images", "image", "image_path", "image_paths", "img_path", "path", "file_path")
PROMPT_KEYS = ("prompt", "question", "query", "instruction")
TEACHER_KEYS = ("teacher", "model", "model_name", "teacher_model", "source")
TEXT_KEYS = ("response", "answer", "output", "trajectory", "reasoning", "text", "completion")
WIDE_KEYS = ("trajectories", "responses", "answers", "outputs")
REPORT_KEYS = ("report", "reference_report", "reference")
MAX_TEXT_CHARS = 100_000  # a trajectory longer than this is a corrupt record, not reasoning
MAX_IMAGE_PIXELS = 100_000_000  # MIMIC-CXR-JPG images are ~3k x 3k; far beyond that is a broken or hostile file
LABEL_VALUES = {1: 1, 0: 0, -1: -1}


@dataclass
class Trajectory:
    teacher: str
    text: str


@dataclass
class Case:
    case_id: str
    images: list[str]
    prompt: str
    trajectories: list[Trajectory] = field(default_factory=list)
    labels: dict | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        trajs = [
            t if isinstance(t, Trajectory) else Trajectory(t["teacher"], t["text"]) for t in d.get("trajectories", [])
        ]
        return cls(str(d["case_id"]), list(d["images"]), d["prompt"], trajs, d.get("labels"), dict(d.get("meta") or {}))

    @property
    def teachers(self) -> list[str]:
        return [t.teacher for t in self.trajectories]


def write_cases(cases, path) -> None:
    """Canonical JSONL, atomically (tmp + fsync + rename)."""
    write_jsonl_atomic(path, (c.to_dict() for c in cases))


# ----------------------------------------------------------------------------------------------------------------
# Row -> partial case. Each function raises ValueError(reason) for a bad row; the caller adds file and record.


def _first(row: dict, keys, what=None):
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    if what:
        raise ValueError(f"missing field {what} (one of {', '.join(keys)})")
    return None


def _text(value, what) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} has {len(value)} characters (limit {MAX_TEXT_CHARS})")
    return value


def _labels(row: dict):
    raw = row.get("labels")
    if raw is None:  # CheXpert-style columns at top level
        raw = {k: row[k] for k in OBSERVATIONS if k in row} or None
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"labels must be an object of observation -> 1/0/-1/null, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if k not in OBSERVATIONS:
            raise ValueError(f"unknown observation {k!r} in labels")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out[k] = None
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v in LABEL_VALUES:
            out[k] = int(v)
        else:
            raise ValueError(f"label {k!r} must be 1, 0, -1 or null, got {v!r}")
    return {k: out.get(k) for k in OBSERVATIONS}


def _meta(row: dict) -> dict:
    meta = {}
    for k in ("subject_id", "study_id", "dicom_id", "split"):
        if row.get(k) is not None:
            meta[k] = str(row[k])
    report = _first(row, REPORT_KEYS)
    if report is not None:
        if not isinstance(report, str):
            raise ValueError(f"report must be a string, got {type(report).__name__}")
        meta["report"] = report
    sides = row.get("sides")
    if sides is not None:
        if not isinstance(sides, dict) or not all(v in ("left", "right", "bilateral") for v in sides.values()):
            raise ValueError("sides must map observations to left/right/bilateral")
        meta["sides"] = dict(sides)
    if isinstance(row.get("meta"), dict):
        meta = {**row["meta"], **meta}
    return meta


def identity_string(value, what: str) -> str:
    """A name that identifies something (case id, teacher): NFC, outer whitespace stripped; an int becomes its
    decimal text (0 and "0" are one case); invisible or control characters are refused (a zero-width space would
    make "GPT-5" and "GPT-5\u200b" two teachers)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{what} must be a string or an integer, got {type(value).__name__}")
    text = unicodedata.normalize("NFC", str(value)).strip()
    if not text:
        raise ValueError(f"{what} is empty")
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp") or (cat == "Zs" and ch != " "):
            raise ValueError(
                f"{what} {text!r} contains an invisible or control character U+{ord(ch):04X} "
                f"({unicodedata.name(ch, cat)})"
            )
    return text


def _case_id(row: dict) -> str:
    cid = None
    for k in (*CASE_ID_KEYS, "dicom_id", "study_id"):
        if row.get(k) is not None:
            cid = row[k]
            break
    if cid is None:
        raise ValueError("missing case id (case_id, id or dicom_id)")
    if isinstance(cid, (dict, list, bool, float)):
        raise ValueError(f"case id must be a string or an integer, got {type(cid).__name__}")
    return identity_string(cid, "case id")


def _raw_images(row: dict) -> list:
    value = _first(row, IMAGE_KEYS)
    if value is None:
        if all(row.get(k) is not None for k in ("subject_id", "study_id", "dicom_id")):
            return [("mimic", row["subject_id"], row["study_id"], row["dicom_id"])]
        raise ValueError(f"missing image (one of {', '.join(IMAGE_KEYS)}, or subject_id/study_id/dicom_id)")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("empty image list")
    out = []
    for v in values:
        if isinstance(v, dict):  # ms-swift also accepts {"path": ...}
            v = v.get("path")
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"image path must be a non-empty string, got {v!r}")
        out.append(v)
    return out


def _swift_row(row: dict) -> dict:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise ValueError("messages must be a list of {role, content}")
    users = [m for m in msgs if m.get("role") == "user"]
    answers = [m for m in msgs if m.get("role") == "assistant"]
    if not users:
        raise ValueError("messages has no user turn")
    prompt = users[-1].get("content")
    if not isinstance(prompt, str):
        raise ValueError("user content must be a string")
    prompt = prompt.replace("<image>", "").strip()
    trajs = []
    if answers:
        trajs.append(
            Trajectory(
                identity_string(_first(row, TEACHER_KEYS) or "unknown", "teacher name"),
                _text(answers[-1].get("content"), "assistant content"),
            )
        )
    images = _raw_images(row)
    has_id = any(row.get(k) is not None for k in CASE_ID_KEYS)
    cid = _case_id(row) if has_id else "swift-" + _digest(json.dumps([images, prompt]))
    return {
        "case_id": cid,
        "images": images,
        "prompt": _text(prompt, "prompt"),
        "trajectories": trajs,
        "labels": _labels(row),
        "meta": _meta(row),
    }


def _digest(s: str) -> str:
    import hashlib

    return hashlib.sha1(s.encode()).hexdigest()[:16]


def _parse_row(row) -> tuple[str, dict]:
    """-> (kind, partial case). kind 'case' rows are whole cases; 'part' rows merge by case id."""
    if not isinstance(row, dict):
        raise ValueError(f"record must be an object, got {type(row).__name__}")
    if "messages" in row:
        return "part", _swift_row(row)
    base = {
        "case_id": _case_id(row),
        "images": _raw_images(row),
        "prompt": _text(_first(row, PROMPT_KEYS, "prompt"), "prompt"),
        "labels": _labels(row),
        "meta": _meta(row),
    }
    wide = _first(row, WIDE_KEYS)
    if wide is not None:
        if isinstance(wide, dict):
            items = list(wide.items())
        elif isinstance(wide, list):
            items = []
            for t in wide:
                if not isinstance(t, dict):
                    raise ValueError("each trajectory must be an object {teacher, text}")
                items.append((_first(t, TEACHER_KEYS, "teacher"), _first(t, TEXT_KEYS, "text")))
        else:
            raise ValueError("trajectories must be an object {teacher: text} or a list of {teacher, text}")
        trajs = []
        for teacher, text in items:
            if not isinstance(teacher, str) or not teacher.strip():
                raise ValueError(f"teacher name must be a non-empty string, got {teacher!r}")
            teacher = identity_string(teacher, "teacher name")
            if teacher in [t.teacher for t in trajs]:
                raise ValueError(f"teacher {teacher!r} answers twice in this record")
            trajs.append(Trajectory(teacher, _text(text, f"trajectory of {teacher}")))
        return "case", {**base, "trajectories": trajs}
    teacher = _first(row, TEACHER_KEYS)
    text = _first(row, TEXT_KEYS)
    if teacher is None and text is None:  # a case with no trajectories (e.g. an evaluation split)
        return "case", {**base, "trajectories": []}
    if teacher is None or text is None:
        raise ValueError("a long row needs both a teacher (model) and a response")
    if not isinstance(teacher, str) or not teacher.strip():
        raise ValueError(f"teacher name must be a non-empty string, got {teacher!r}")
    teacher = identity_string(teacher, "teacher name")
    return "part", {**base, "trajectories": [Trajectory(teacher, _text(text, f"response of {teacher}"))]}


# ----------------------------------------------------------------------------------------------------------------
# Images


# Qwen2.5-VL's image processor defaults: 14-px patches merged 2x2 (factor 28), 56*56 .. 28*28*1280 pixels
QWEN_IMAGE_RULES = {"patch_size": 14, "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}


def image_rules(model_dir=None) -> dict:
    """The resize rules of a model's image processor (its preprocessor_config.json), else Qwen2.5-VL's defaults."""
    rules = dict(QWEN_IMAGE_RULES)
    if model_dir is None:
        return rules
    cfg = Path(model_dir) / "preprocessor_config.json"
    try:
        values = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return rules  # loading the model reports a broken folder
    if not isinstance(values, dict):
        return rules
    size = values.get("size") if isinstance(values.get("size"), dict) else {}
    for key, alt in (
        ("patch_size", None),
        ("merge_size", None),
        ("min_pixels", "shortest_edge"),
        ("max_pixels", "longest_edge"),
    ):
        v = values.get(key) if values.get(key) is not None else size.get(alt)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            rules[key] = v
    return rules


def processor_problem(width: int, height: int, rules: dict) -> str | None:
    """Why the model's image processor would refuse a width x height image (transformers' own smart_resize)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    try:
        smart_resize(
            height,
            width,
            factor=rules["patch_size"] * rules["merge_size"],
            min_pixels=rules["min_pixels"],
            max_pixels=rules["max_pixels"],
        )
    except (ValueError, ZeroDivisionError) as e:
        return f"image is {width}x{height} pixels: the image processor refuses it ({e})"
    return None


class ImageResolver:
    def __init__(self, image_root, allow_absolute: bool, verify: str, rules: dict | None = None):
        self.root = Path(image_root).resolve()
        self.allow_absolute = allow_absolute
        self.verify = verify
        self.rules = rules or dict(QWEN_IMAGE_RULES)
        self._checked: dict[str, str | None] = {}

    def resolve(self, raw) -> str:
        if isinstance(raw, tuple):  # MIMIC ids
            p = mimic_image_path(self.root, *raw[1:])
        else:
            p = Path(raw)
            p = (p if p.is_absolute() else self.root / p).resolve()
            if p.suffix.lower() == ".dcm" and not os.path.exists(p):  # CXR-MAX cites DICOMs; MIMIC-CXR-JPG has JPGs
                p = p.with_suffix(".jpg")
        p = p.resolve()
        if not self.allow_absolute and not p.is_relative_to(self.root):
            raise ValueError(
                f"image path {raw!r} leaves the image root {self.root} (pass --allow-absolute-paths to allow)"
            )
        return str(p)

    def check_all(self, paths) -> None:
        todo = [p for p in dict.fromkeys(paths) if p not in self._checked]
        if self.verify == "none":
            self._checked.update({p: None if os.path.isfile(p) else "image not found" for p in todo})
            return
        processor_problem(64, 64, self.rules)  # import transformers here, not in each thread
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:  # PIL decodes without the GIL
            self._checked.update(zip(todo, pool.map(self._check_one, todo)))

    def problem(self, path) -> str | None:
        return self._checked.get(path)

    def _check_one(self, path) -> str | None:
        from PIL import Image

        try:
            size = os.path.getsize(path)
        except OSError:
            return f"image not found: {path}"
        if size == 0:
            return f"image is an empty file: {path}"
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return f"image is {w}x{h} pixels (limit {MAX_IMAGE_PIXELS}): {path}"
                problem = processor_problem(w, h, self.rules)
                if problem:
                    return f"{problem}: {path}"
                if self.verify == "full":
                    im.draft("L", (max(1, w // 8), max(1, h // 8)))  # JPEG: decode at 1/8 scale, still reads every byte
                    im.load()
                    if im.mode in HIGH_BIT_MODES:
                        try:
                            to_rgb(im)  # 16-bit is scaled; what cannot be scaled is refused here, not mid-run
                        except ValueError as e:
                            return f"image has {e}: {path}"
                else:
                    im.verify()
        except Exception as e:  # PIL raises many types for broken files
            return f"image cannot be decoded ({e.__class__.__name__}: {e}): {path}"
        return None


# ----------------------------------------------------------------------------------------------------------------


def _rows_of_split(path, rows, split):
    """--split on a single file: the rows whose `split` field is that split; a file without the field is an error."""
    seen = set()
    for record, row in rows:
        if isinstance(row, dict) and row.get("split") is not None:
            seen.add(str(row["split"]))
            if str(row["split"]) != split:
                continue
        yield record, row
    if not seen:
        raise ApoError(f"{path}: --split {split}: a single data file has no splits (no row has a `split` field)")
    if split not in seen:
        raise ApoError(f"{path}: --split {split}: no row of that split (the rows have splits {sorted(seen)})")


def read_cases(
    path,
    image_root=None,
    teachers=None,
    skip_bad=False,
    split=None,
    allow_absolute=None,
    verify_images="full",
    check_images=True,
    image_rules=None,
) -> tuple[list[Case], list[dict]]:
    """-> (cases in first-appearance order, rejected records). Raises DataError on the first bad record
    unless skip_bad."""
    path = Path(path)
    if not path.exists():
        raise ApoError(f"{path}: data file not found")
    explicit_root = image_root is not None
    root = Path(image_root) if explicit_root else (path if path.is_dir() else path.parent)
    if explicit_root and not root.is_dir():
        raise ApoError(f"{root}: image root is not a folder")
    if allow_absolute is None:  # the fence holds for the default root (the data file's folder) too
        allow_absolute = False
    resolver = ImageResolver(root, allow_absolute, verify_images if check_images else "none", image_rules)
    rejects = Rejects(path, skip_bad)
    bad = rejects.add

    # Pass 1: parse rows, merge parts into cases, keep where each case came from.
    cases: dict[str, dict] = {}
    origin: dict[str, list] = {}  # case_id -> [(record, raw, trajectory index)]
    rows = iter_records(path, split)
    if split is not None and not path.is_dir():
        rows = _rows_of_split(path, rows, split)
    for record, row in rows:
        if isinstance(row, DataError):
            bad(record, row.reason, None)
            continue
        try:
            kind, part = _parse_row(row)
            part["images"] = [resolver.resolve(r) for r in part["images"]]
        except ValueError as e:
            bad(record, str(e), row)
            continue
        cid = part["case_id"]
        have = cases.get(cid)
        if have is None:
            cases[cid] = {**part, "_whole": kind == "case", "_record": record}
            origin[cid] = [(record, row, i) for i in range(len(part["trajectories"]))]
            continue
        first = have["_record"]
        if kind == "case" or have["_whole"]:
            bad(record, f"duplicate case id {cid!r} (first at {first})", row)
        elif part["prompt"] != have["prompt"] or part["images"] != have["images"]:
            bad(record, f"case {cid!r} has a different prompt or image than at {first}", row)
        elif part["trajectories"] and part["trajectories"][0].teacher in [t.teacher for t in have["trajectories"]]:
            bad(
                record,
                f"duplicate answer of teacher {part['trajectories'][0].teacher!r} for case {cid!r} (first at {first})",
                row,
            )
        elif have["labels"] is not None and part["labels"] is not None and have["labels"] != part["labels"]:
            diff = sorted(k for k in have["labels"] if have["labels"][k] != part["labels"][k])
            bad(record, f"case {cid!r} has other labels than at {first} ({', '.join(diff)})", row)
        else:
            have["trajectories"] += part["trajectories"]
            origin[cid] += [(record, row, len(have["trajectories"]) - 1)]
            have["labels"] = have["labels"] or part["labels"]
            have["meta"] = {**part["meta"], **have["meta"]}

    # Pass 2: images decode (all at once, threaded), teacher filter.
    if check_images:
        resolver.check_all(p for c in cases.values() for p in c["images"])
    if teachers:
        known = {t.teacher for c in cases.values() for t in c["trajectories"]}
        unknown = [t for t in teachers if t not in known]
        if unknown:
            raise ApoError(f"{path}: unknown teacher(s) {unknown}; the data has {sorted(known)}")
    out = []
    for cid, c in cases.items():
        problem = next((resolver.problem(p) for p in c["images"] if resolver.problem(p)), None)
        if problem:
            for record, row, _ in origin[cid] or [(c["_record"], None, 0)]:
                bad(record, problem, row)
            continue
        trajs = [t for t in c["trajectories"] if not teachers or t.teacher in teachers]
        out.append(Case(cid, c["images"], c["prompt"], trajs, c["labels"], c["meta"]))
    return out, rejects.items


def load_cases(path, image_root=None, teachers=None, skip_bad=False, rejects_path=None, **kw) -> list[Case]:
    """Cases of one data file. With skip_bad the rejected records go to rejects_path and their count to the log."""
    cases, rejects = read_cases(path, image_root, teachers, skip_bad, **kw)
    if rejects:
        rejects_path = Path(rejects_path or f"{path}.rejects.jsonl")
        write_rejects(rejects, rejects_path)
        print(
            f"{path}: skipped {len(rejects)} bad record(s), kept {len(cases)} case(s); reasons in {rejects_path}",
            flush=True,
        )
    elif rejects_path is not None:
        Path(rejects_path).unlink(missing_ok=True)  # a clean run leaves no stale list of an earlier run's rejects
    if not cases:
        raise ApoError(
            f"{path}: no usable case"
            + (f" (all {len(rejects)} record(s) rejected; reasons in {rejects_path})" if rejects else " (no records)")
        )
    return cases


# ----------------------------------------------------------------------------------------------------------------
# CLI plumbing shared by every command that reads data.


def add_data_arguments(parser, required=True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", required=required, help="data file (.jsonl/.json/.parquet) or dataset folder")
    g.add_argument(
        "--image-root",
        default=None,
        help="folder image paths are relative to (MIMIC-CXR-JPG root); default: the data file's folder",
    )
    g.add_argument("--split", default=None, help="split of a dataset folder with several")
    g.add_argument("--teachers", default=None, help="comma-separated teachers to keep (default: all)")
    g.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed records (listed with reasons in the rejects file) instead of stopping",
    )
    g.add_argument(
        "--rejects", default=None, help="where --skip-bad lists rejected records (default: next to the output)"
    )
    g.add_argument("--allow-absolute-paths", action="store_true", help="allow image paths outside --image-root")
    g.add_argument(
        "--verify-images",
        choices=("full", "header", "none"),
        default="full",
        help="check images up front: full decode (default), header only, or existence only",
    )


def cases_from_args(args, rejects_default=None) -> list[Case]:
    teachers = [t.strip() for t in args.teachers.split(",") if t.strip()] if getattr(args, "teachers", None) else None
    return load_cases(
        args.dataset,
        image_root=args.image_root,
        teachers=teachers,
        skip_bad=args.skip_bad,
        rejects_path=args.rejects or rejects_default,
        split=args.split,
        allow_absolute=True if args.allow_absolute_paths else None,
        verify_images=args.verify_images,
        image_rules=image_rules(getattr(args, "model", None)),
    )
