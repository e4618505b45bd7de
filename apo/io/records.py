"""Reading records: the one layer under every reader of user data and of our own result files.

Containers: JSONL (one record per line), JSON (a list, or {"data": [...]}), parquet, and a `datasets` folder
(`save_to_disk` output, or a local folder `load_dataset` understands). Every record comes with the name of its
place: JSONL records by line number (1-based, blank lines counted and skipped), the others as "item 7" / "row 12".

Rules every reader shares:
- bytes are UTF-8; a line that is not is a bad record ("not UTF-8 (reason at byte N)"), never a silent replacement;
- a JSONL line that does not parse is a bad record ("invalid JSON (reason at column N)");
- a last line with no newline after it is `torn`: the writer may have died in the middle of it. Each reader decides
  what that means (a result file redoes it, a consensus file still being written ignores it, input data rejects it);
- a bad record is reported as `file:record: reason` (DataError): the first one stops the command, or with skip_bad
  each goes to a `Rejects` list {file, record, reason, raw} that `write_rejects` saves as JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple

from apo.errors import ApoError, DataError

MAX_RAW_CHARS = 2000  # of a rejected record kept in the rejects file


def not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 ({e.reason} at byte {e.start})"


class JsonLine(NamedTuple):
    number: int  # 1-based line number
    raw: bytes  # the line as in the file (with its newline, if it has one)
    value: object  # the parsed JSON; None when `error`
    error: str | None  # why the line is no JSON record
    torn: bool  # the last line, with no newline after it


def parse_json_line(raw: bytes) -> tuple[object, str | None]:
    """-> (value, None), or (None, reason) for a line that is not UTF-8 or not JSON."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, not_utf8(e)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"


def iter_jsonl(path, skip_blank: bool = True) -> Iterator[JsonLine]:
    """The lines of a JSONL file, streamed, parsed, numbered (see the module docstring for the rules)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if skip_blank and not raw.strip():
                continue
            value, error = parse_json_line(raw)
            yield JsonLine(number, raw, value, error, not raw.endswith(b"\n"))


def iter_records(path, split: str | None = None) -> Iterator[tuple[object, object]]:
    """(place, row) for every record of a data file or dataset folder; a JSONL line that does not parse comes as
    (line, DataError) so the caller can reject it and go on. A broken JSON or parquet file raises DataError."""
    path = Path(path)
    if path.is_dir():
        yield from _iter_dataset_folder(path, split)
    elif path.suffix == ".jsonl":
        for line in iter_jsonl(path):
            yield line.number, DataError(path, line.number, line.error) if line.error else line.value
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(path, None, f"cannot parse JSON file ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(path, None, 'a .json data file must hold a list of records (or {"data": [...]})')
        for i, row in enumerate(data, 1):
            yield f"item {i}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # heavy; only parquet readers pay for it

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(path, None, f"cannot read parquet ({e.__class__.__name__}: {e})") from None
        for i, row in enumerate(rows, 1):
            yield f"row {i}", row
    else:
        raise ApoError(f"{path}: unsupported data file (expected .jsonl, .json, .parquet or a dataset folder)")


def _iter_dataset_folder(path: Path, split: str | None):
    import datasets  # heavy; only dataset folders pay for it

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ApoError(f"{path}: dataset has splits {sorted(ds)}; choose one with --split")
            split = next(iter(ds))
        if split not in ds:
            raise ApoError(f"{path}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    for i, row in enumerate(ds, 1):
        yield f"row {i}", row


# ---------------------------------------------------------------- bad records


class Rejects:
    """The bad records of one file. Strict (default): `add` raises DataError(file, record, reason) at the first.
    With skip_bad: each is kept in `items` as {file, record, reason, raw (clipped text)}."""

    def __init__(self, path, skip_bad: bool = False):
        self.path, self.skip_bad = path, skip_bad
        self.items: list[dict] = []

    def add(self, record, reason: str, raw=None) -> None:
        if not self.skip_bad:
            raise DataError(self.path, record, reason)
        self.items.append({"file": str(self.path), "record": record, "reason": reason, "raw": clip(raw)})


def clip(raw, limit: int = MAX_RAW_CHARS) -> str | None:
    """A rejected record as text for the rejects file: bytes decoded (bad bytes replaced), objects as JSON."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        s = raw.rstrip(b"\r\n").decode("utf-8", "replace")
    elif isinstance(raw, str):
        s = raw
    else:
        try:
            s = json.dumps(raw, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            s = repr(raw)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


def write_rejects(rejects, path) -> None:
    """The rejected records, one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
