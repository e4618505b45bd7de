"""MIMIC-CXR ids and where their files live (MIMIC-CXR-JPG images, MIMIC-CXR reports).

    images   <root>/files/p10/p10000032/s50414267/<dicom_id>.jpg
    reports  <root>/files/p10/p10000032/s50414267.txt   (or without the files/ level)

Ids come from data files a user did not write, so every path built here is built from ids that passed `is_mimic_id`:
letters, digits, '-' and '_' only (no '.', no separator, no wildcard), at most 100 characters. A crafted id can then
neither leave the root ("../..") nor match other files ("*").
"""

from __future__ import annotations

import re
from pathlib import Path

ID_RULE = "letters, digits, '-', '_'; at most 100 characters"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def is_mimic_id(value) -> bool:
    return bool(_ID.match(str(value)))


def _subject_study(subject_id, study_id) -> tuple[str, str]:
    return str(subject_id).lstrip("p"), str(study_id).lstrip("s")


def mimic_image_path(root, subject_id, study_id, dicom_id, ext=".jpg") -> Path:
    """MIMIC-CXR-JPG layout: files/p10/p10000032/s50414267/<dicom_id>.jpg."""
    subject, study = _subject_study(subject_id, study_id)
    return Path(root) / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}{ext}"


def previous_image(root, subject_id, previous_dicom_id, previous_study_id=None) -> Path | None:
    """The earlier image of a temporal pair: by its study when known, else the first of the subject's studies that
    holds `previous_dicom_id` (None if none does). The ids must have passed `is_mimic_id` (the search is a glob)."""
    if previous_study_id:
        return mimic_image_path(root, subject_id, previous_study_id, previous_dicom_id)
    subject = str(subject_id).lstrip("p")
    hits = sorted((Path(root) / "files" / f"p{subject[:2]}" / f"p{subject}").glob(f"s*/{previous_dicom_id}.jpg"))
    return hits[0] if hits else None


def mimic_report_path(reports_dir, subject_id, study_id) -> Path | None:
    """files/pXX/p<subject>/s<study>.txt under reports_dir; None if absent, or if an id is not a plain MIMIC id
    (so a crafted id cannot read a file outside reports_dir)."""
    subject, study = _subject_study(subject_id, study_id)
    if not (is_mimic_id(subject) and is_mimic_id(study)):
        return None
    for base in (Path(reports_dir) / "files", Path(reports_dir)):
        p = base / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        if p.is_file():
            return p
    return None
