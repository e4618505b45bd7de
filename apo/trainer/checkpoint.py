"""Which checkpoints are complete, so a resume never starts from a half-written one.

transformers 5.19's Trainer writes straight into OUTPUT_DIR/checkpoint-N (no temporary folder, no rename), in the
order weights, optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json, and its `get_last_checkpoint` takes
the highest N whatever is inside. A run killed mid-save leaves a folder that looks like a checkpoint. So after every
save APOTrainer fsyncs the files and then writes `checkpoint_complete.json` (every file and its size, written via
tmp + rename): the commit record. A folder is complete when that record is there and every file it lists has its
size. Resuming "auto" takes the highest complete checkpoint; an explicit folder without the record (another tool's,
or an older run's) is checked structurally instead: trainer_state.json parses, every safetensors file is as long
as its header says, every torch pickle file is a whole zip archive.

What resume loads how (transformers 5.19, torch 2.15): weights from safetensors; optimizer.pt, scheduler.pt,
rng_state*.pth, scaler.pt through `torch.load(..., weights_only=True)` (restricted unpickler, numpy RNG state
allow-listed); trainer_state.json as JSON. training_args.bin is written (a full pickle) but never loaded on resume.
DeepSpeed checkpoints (global_stepN/*.pt) are loaded by DeepSpeed with weights_only=False: resume only from
checkpoints you wrote.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")
    }


def mark_complete(folder) -> None:
    """fsync every file of a finished checkpoint, then write the commit record atomically."""
    folder = Path(folder)
    files = _files(folder)
    for name in files:
        with open(folder / name, "rb") as fh:
            os.fsync(fh.fileno())
    tmp = folder / (MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MARKER)
    fd = os.open(folder, os.O_RDONLY)  # the rename itself survives a power cut
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unmark(folder) -> None:
    """Before (re)writing a checkpoint folder: it is not complete until marked again."""
    try:
        os.remove(Path(folder) / MARKER)
    except FileNotFoundError:
        pass


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path.name}: truncated (no header)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name}: truncated (header says {n} bytes, file has {size - 8})"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return f"{path.name}: unreadable header"
    end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
    if 8 + n + end != size:
        return f"{path.name}: {size} bytes, its header needs {8 + n + end}"
    return None


def structural_problem(folder) -> str | None:
    """Without a commit record: does the folder at least hold whole files?"""
    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"trainer_state.json missing or unreadable ({e.__class__.__name__})"
    weights = list(folder.glob("*.safetensors"))
    if not weights and not (folder / "pytorch_model.bin").is_file() and not list(folder.glob("global_step*")):
        return "no model weights"
    for p in weights:
        problem = _safetensors_problem(p)
        if problem:
            return problem
    for p in [*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]:
        if not zipfile.is_zipfile(p):
            return f"{p.name}: not a whole torch archive (truncated?)"
    return None


def checkpoint_problem(folder, require_marker: bool = True) -> str | None:
    """None if `folder` is a complete checkpoint, else why not."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    try:
        files = json.loads((folder / MARKER).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        if require_marker:
            return f"no {MARKER} (the save did not finish)"
        return structural_problem(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    for name, size in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
    return None


def checkpoints(output_dir) -> list[Path]:
    """checkpoint-N folders of output_dir, highest N first."""
    d = Path(output_dir)
    found = [p for p in d.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if d.is_dir() else []
    return sorted(found, key=lambda p: -int(_CHECKPOINT.match(p.name).group(1)))


def last_complete_checkpoint(output_dir) -> str | None:
    """The highest complete checkpoint-N; incomplete ones above it are named in the log and left alone (training
    overwrites them when it gets there)."""
    for p in checkpoints(output_dir):
        problem = checkpoint_problem(p)
        if problem is None:
            return str(p)
        log.warning("%s is incomplete (%s); not resuming from it", p, problem)
    return None
