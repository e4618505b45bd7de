"""An append-only JSONL result file keyed by case id, for long jobs that may be killed and rerun.

One record per line, written with sorted keys and flushed + fsynced, so after a crash the file holds every finished
record and at most one torn last line. Opening the file again drops the torn line (that case is redone), `.done`
tells the job what to skip, and `finalize(order)` rewrites the file in dataset order, atomically. Records carry no
timestamps, so an interrupted-and-resumed run ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from apo.errors import DataError
from apo.io.records import iter_jsonl

log = logging.getLogger(__name__)


def dumps(record: dict) -> str:
    """The one serialisation every result line uses (deterministic: sorted keys, no ASCII escaping)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


class ResumableJsonl:
    def __init__(self, path, key: str = "case_id", readonly: bool = False):
        """`readonly`: peek at a file another process is appending to (a torn last line is skipped, not cut)."""
        self.path, self.key, self.readonly = Path(path), key, readonly
        self.records: dict[str, dict] = {}  # key -> record, in file order
        self.torn = False  # a torn last line was found (and cut away)
        self._fh = None
        if self.path.exists():
            self._load()

    @property
    def done(self) -> set[str]:
        return set(self.records)

    def _load(self):
        good_end = size = 0  # byte offsets just past the last good line, and past the last line read
        for line in iter_jsonl(self.path, skip_blank=False):
            size += len(line.raw)
            record, problem = line.value, line.error
            if not problem and (not isinstance(record, dict) or self.key not in record):
                problem = f"not an object with a {self.key!r} field"
            if line.torn:  # no newline at the end: the run died while writing this line; redo that case
                self.torn = True  # (even when it parses: the newline never made it, so the record is redone)
                break
            if problem:
                raise DataError(self.path, line.number, f"unreadable result line ({problem}); fix or delete the file")
            k = str(record[self.key])
            if k in self.records:
                raise DataError(self.path, line.number, f"duplicate {self.key} {k!r}")
            self.records[k] = record
            good_end += len(line.raw)
        if good_end != size and not self.readonly:
            log.warning(
                "%s: dropping a torn last line (%d bytes); that case will be redone", self.path, size - good_end
            )
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())

    def append(self, record: dict) -> bool:
        """Write one finished record; False (and nothing written) if its key is already done."""
        if self.readonly:
            raise RuntimeError(f"{self.path} was opened read-only")
        k = str(record[self.key])
        if k in self.records:
            return False
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records[k] = record
        return True

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def finalize(self, order) -> list[dict]:
        """Rewrite the file in `order` (dataset order of keys), atomically. Keys not in `order` go last, sorted."""
        self.close()
        order = [str(k) for k in order]
        rank = {k: i for i, k in enumerate(order)}
        extra = sorted(k for k in self.records if k not in rank)
        if extra:
            log.warning(
                "%s: %d records are not in this dataset (kept at the end), e.g. %s", self.path, len(extra), extra[:3]
            )
        keys = [k for k in order if k in self.records] + extra
        records = [self.records[k] for k in keys]
        write_jsonl_atomic(self.path, records)
        self.records = dict(zip(keys, records))
        return records


def write_jsonl_atomic(path, records) -> None:
    """Write a whole JSONL file via tmp + os.replace, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(dumps(r) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, sort_keys=True, indent=2, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path, text: str) -> None:
    """The whole file or the previous one, never half of it: written to a temporary name, fsynced, renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
