"""A small, clean world every reliability test starts from: images, a CXR-MAX-style data file, its vote consensus,
groups.jsonl and an MS-CXR-T CSV, plus the bad images (corrupt, truncated, empty, not an image, enormous)."""

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from apo.cli import main
from apo.io.mimic import mimic_image_path

CASES = ["c0", "c1", "c2", "c3"]
TEXTS = {  # three teachers that disagree, so the vote picks one and the other two become negatives
    "GPT-5-nano": "Small left pleural effusion. No pneumothorax.",
    "Claude-Sonnet-4": "Small right pleural effusion and cardiomegaly.",
    "Grok-4": "Left pleural effusion with mild edema.",
}
BAD_IMAGES = ("corrupt.jpg", "truncated.jpg", "empty.jpg", "text.jpg", "enormous.png")


def _jpeg(seed, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_bad_images(folder: Path, stem="") -> dict:
    """{kind: file name} of broken images in `folder` (`stem` prefixes the names)."""
    good = _jpeg(99)
    names = {k: stem + k for k in BAD_IMAGES}
    (folder / names["corrupt.jpg"]).write_bytes(
        b"\xff\xd8\xff" + bytes(random.Random(0).randrange(256) for _ in range(400))
    )
    (folder / names["truncated.jpg"]).write_bytes(good[: len(good) // 2])
    (folder / names["empty.jpg"]).write_bytes(b"")
    (folder / names["text.jpg"]).write_text("not an image")
    Image.new("1", (12000, 12000)).save(folder / names["enormous.png"])  # 144 Mpx in a few KB: a decompression bomb
    return names


def data_rows(cases=CASES):
    for i, cid in enumerate(cases):
        for teacher, text in TEXTS.items():
            yield {
                "case_id": cid,
                "image": f"{cid}.jpg",
                "question": f"What supports the diagnosis in case {i}?",
                "model": teacher,
                "response": text,
                "labels": {"Pleural Effusion": 1},
                "sides": {"Pleural Effusion": "left"},
                "report": "Small left pleural effusion.",
            }


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def build(root: Path, n_cases=len(CASES), n_pairs=3) -> dict:
    """Write the clean world under `root` (cases c0.., MS-CXR-T pairs); returns its paths."""
    root.mkdir(parents=True, exist_ok=True)
    cases = [f"c{i}" for i in range(n_cases)]
    for i, cid in enumerate(cases):
        (root / f"{cid}.jpg").write_bytes(_jpeg(i))
    write_bad_images(root)
    data = root / "data.jsonl"
    data.write_bytes(jsonl(data_rows(cases)))
    consensus, groups = root / "consensus.jsonl", root / "groups.jsonl"
    assert (
        main(
            [
                "consensus",
                "--strategy",
                "vote",
                "--dataset",
                str(data),
                "--image-root",
                str(root),
                "--out",
                str(consensus),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "build-pairs",
                "--dataset",
                str(data),
                "--image-root",
                str(root),
                "--consensus",
                str(consensus),
                "--out",
                str(groups),
            ]
        )
        == 0
    )
    return {
        "root": root,
        "data": data,
        "cases": cases,
        "consensus": consensus,
        "groups": groups,
        **write_mscxrt(root, n_pairs),
    }


MSCXRT_HEADER = [
    "dicom_id",
    "previous_dicom_id",
    "study_id",
    "previous_study_id",
    "subject_id",
    "consolidation_progression",
    "edema_progression",
    "pleural_effusion_progression",
    "pneumonia_progression",
    "pneumothorax_progression",
]


def write_mscxrt(root: Path, n=3) -> dict:
    """n clean MS-CXR-T rows (one labelled finding each) over MIMIC-layout images, and the broken images at
    MIMIC paths of subject 19999999 (dicom ids bad-corrupt, bad-truncated, ...), for rows that point at them."""
    rows = []
    for i in range(n):
        subj, st, pst = f"{10000000 + i}", f"{50000000 + i}", f"{51000000 + i}"
        for study, dicom in ((st, f"cur{i}"), (pst, f"prev{i}")):
            p = mimic_image_path(root, subj, study, dicom)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_jpeg(10 + 2 * i + (dicom.startswith("prev"))))
        labels = [""] * 5
        labels[i % 5] = ("improving", "stable", "worsening")[i % 3]
        rows.append([f"cur{i}", f"prev{i}", st, pst, subj, *labels])
    folder = mimic_image_path(root, "19999999", "59999999", "x").parent
    folder.mkdir(parents=True, exist_ok=True)
    for kind, name in write_bad_images(folder, "bad-").items():  # MIMIC wants .jpg: give each its MIMIC name
        (folder / name).rename(folder / (Path(name).stem + ".jpg"))
    mimic_image_path(root, "19999999", "59999998", "okprev").parent.mkdir(parents=True, exist_ok=True)
    mimic_image_path(root, "19999999", "59999998", "okprev").write_bytes(_jpeg(50))
    csv_path = root / "mscxrt.csv"
    csv_path.write_text(csv_text(rows))
    return {"csv": csv_path, "csv_rows": rows}


def csv_text(rows, header=MSCXRT_HEADER) -> str:
    return "\n".join(",".join(r) for r in [header, *rows]) + "\n"
