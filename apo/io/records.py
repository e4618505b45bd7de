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


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
FOLDER_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")
SPLIT_WORDS = ("train", "validation", "valid", "dev", "test", "eval")


def _saved_files(folder: Path) -> list[Path]:
    """The .arrow files of one `save_to_disk` dataset (its state.json lists them), in order."""
    state = folder / "state.json"
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DataError(state, None, f"unreadable dataset state ({e.__class__.__name__}: {e})") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(folder, None, f"data files listed in state.json are missing: {missing}")
    return files


def _file_split(rel: Path) -> str:
    if len(rel.parts) > 1:
        return rel.parts[0]
    stem = rel.name.split(".")[0].lower()
    head = stem.split("-")[0].split("_")[0]
    return head if head in SPLIT_WORDS else "train"


def dataset_splits(path: Path) -> dict[str, list[Path]]:
    """{split: data files} of a dataset folder: a `save_to_disk` folder (dataset_dict.json / state.json) or a
    folder of JSONL/JSON/parquet/arrow shards, split by subfolder (train/...) or file-name prefix (test-0001.jsonl);
    files with neither are "train", as `datasets.load_dataset` does."""
    if (path / "dataset_dict.json").exists():
        try:
            names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise DataError(path / "dataset_dict.json", None, f"unreadable ({e.__class__.__name__}: {e})") from None
        return {str(n): None for n in names}  # resolved lazily: only the requested split's files are read
    if (path / "state.json").exists():
        return {"train": _saved_files(path)}
    splits: dict[str, list[Path]] = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or f.suffix not in DATA_SUFFIXES or f.name in FOLDER_METADATA:
            continue
        if any(part.startswith(".") for part in rel.parts) or ".rejects" in f.name:
            continue
        splits.setdefault(_file_split(rel), []).append(f)
    if not splits:
        raise ApoError(f"{path}: no data files in this folder (expected {', '.join(DATA_SUFFIXES)} shards)")
    return splits


def _iter_dataset_folder(path: Path, split: str | None):
    """Every record of the requested split, file by file through the same readers as single files (no schema
    inference across shards: a value is what its own file says). Places are `shard:line` / `shard:row N`."""
    splits = dataset_splits(path)
    if split is None:
        if len(splits) != 1:
            raise ApoError(f"{path}: dataset has splits {sorted(splits)}; choose one with --split")
        split = next(iter(splits))
    if split not in splits:
        raise ApoError(f"{path}: no split {split!r} (has {sorted(splits)})")
    files = splits[split]
    if files is None:
        files = _saved_files(path / split)
    for f in files:
        rel = f.relative_to(path)
        try:
            if f.suffix == ".arrow":
                import pyarrow as pa

                try:
                    with pa.memory_map(str(f)) as source:
                        rows = pa.ipc.open_stream(source).read_all().to_pylist()
                except Exception as e:  # pyarrow raises several types for a broken file
                    raise DataError(f, None, f"cannot read arrow file ({e.__class__.__name__}: {e})") from None
                for i, row in enumerate(rows, 1):
                    yield f"{rel}:row {i}", row
                continue
            for place, row in iter_records(f):
                if isinstance(row, DataError):
                    row = DataError(path, f"{rel}:{place}", row.reason)
                yield f"{rel}:{place}", row
        except DataError as e:  # a whole shard that cannot be read is one bad record (skipped with --skip-bad)
            yield str(rel), DataError(path, rel, e.reason)


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
