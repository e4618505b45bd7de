"""Data-parallel, resumable jobs: one process per GPU, nothing shared but the file system.

    torchrun --nproc_per_node 4 -m apo.cli consensus --model DIR ...     (or: accelerate launch -m apo.cli ...)

`run_resumable` gives rank r the items `shard(items, r, world)`; each rank appends to its own shard file
`OUT.rank<r>-of-<world>`, rank 0 waits for all of them, merges into OUT in dataset order and removes the shards.
A rerun (any world size) skips every case already in OUT or in any shard file. With one process nothing changes:
results go straight into OUT. Several nodes (torchrun --nnodes) need OUT on a file system they all see.

What produced OUT: `OUT.identity.json` records the run's identity (model and adapter fingerprints, strategy, teachers,
prompt, generation settings: whatever the command passes as `identity`). A rerun whose identity differs while OUT (or
a shard file) holds results stops with one line saying what differs; `--overwrite` starts again. Results are never
reused from another run, and OUT itself stays byte-identical between an uninterrupted and a resumed run.

One writer per output: the process writing a file holds `fcntl.flock` on `FILE.lock` (OUT.lock with one process;
with several, each rank its shard's lock, and a shared lock on OUT.lock so a single-process run cannot start beside
them). A second process stops at once naming the holder's pid and host. OUT.lock stays (removing a lock file
while others may open it is a race; it means nothing once no process holds it); shard locks go with their shards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from apo.errors import ApoError
from apo.io.resumable import ResumableJsonl, write_json_atomic

log = logging.getLogger(__name__)


def dist_info() -> tuple[int, int]:
    """(rank, world size) from the torchrun / accelerate environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(items, rank: int, world: int) -> list:
    """Rank r's share: every world-th item from r (balanced within one item)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    return list(items)[rank::world]


def _shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}-of-{world}")


def _shard_files(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(out.name + ".rank*-of-*") if not p.name.endswith((".tmp", ".lock")))


def finished_records(out, skip=None) -> dict[str, dict]:
    """Records already in OUT or in any shard file (read-only: other ranks may be appending to theirs)."""
    out = Path(out)
    found = {}
    for p in [out] + _shard_files(out):
        if p != skip and p.exists():
            found.update(ResumableJsonl(p, readonly=True).records)
    return found


# ---------------------------------------------------------------- one writer per output

_HELD: dict[str, object] = {}  # lock file -> open handle holding the flock (per process)


def _lock(path: Path, shared: bool = False) -> None:
    key = str(path.resolve())
    if key in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise ApoError(
            f"{path.with_suffix('') if path.suffix == '.lock' else path}: another run is writing it ({holder}, "
            f"lock {path}); wait for it to finish or stop it"
        ) from None
    if not shared:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        fh.flush()
    _HELD[key] = fh


def release(out) -> None:
    """Drop this process's locks on `out` and its shard files (run_resumable, when its job is done)."""
    out = Path(out)
    for key in [k for k in _HELD if Path(k).name.startswith(out.name + ".") and Path(k).parent == out.parent.resolve()]:
        fh = _HELD.pop(key)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        finally:
            fh.close()


def release_all() -> None:
    """Drop every output lock this process holds (the CLI calls it when a command ends)."""
    while _HELD:
        _, fh = _HELD.popitem()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        finally:
            fh.close()


def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def identity_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".identity.json")


FIRST = ("command", "strategy", "model", "adapter", "dataset", "csv", "teachers", "split", "prompt")


def _differences(have: dict, want: dict, prefix="") -> list[str]:
    """What differs, the keys that decide most first (a model change before the settings that came with it)."""
    out = []
    keys = set(have) | set(want)
    for k in [k for k in FIRST if k in keys] + sorted(keys - set(FIRST)):
        a, b = have.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            show = lambda v: json.dumps(v, ensure_ascii=False)[:80]  # noqa: E731
            out.append(f"{prefix}{k} was {show(a)}, now {show(b)}")
    return out


def claim(out, identity: dict | None = None, overwrite: bool = False) -> None:
    """Before any work (and before a model loads): take this process's lock on `out` (or its shard), then, with
    `overwrite`, remove earlier results; otherwise refuse results of a run with another identity."""
    out = Path(out)
    rank, world = dist_info()
    if world == 1:
        _lock(lock_path(out))
    else:
        _lock(lock_path(out), shared=True)
        _lock(lock_path(_shard_path(out, rank, world)))
    ident = identity_path(out)
    if identity is not None:
        identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from the file
    if overwrite:
        mine = [_shard_path(out, rank, world)] if world > 1 else []
        others = [out, *(p for p in _shard_files(out) if not p.name.endswith(f"-of-{world}"))] if rank == 0 else []
        for p in mine + others:
            p.unlink(missing_ok=True)
    elif identity is not None:
        have = None
        if ident.exists():
            try:
                have = json.loads(ident.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ApoError(f"{ident}: unreadable identity record ({e}); pass --overwrite to start again") from None
        done = finished_records(out) if (out.exists() or _shard_files(out)) else {}
        if done and have is None:
            raise ApoError(
                f"{out}: holds {len(done)} result(s) but no record of what produced them ({ident.name}); "
                "use a fresh output or pass --overwrite to start again"
            )
        if done and have != identity:
            diff = _differences(have, identity)
            raise ApoError(
                f"{out}: holds {len(done)} result(s) of another run ({'; '.join(diff[:4])}"
                f"{'; ...' if len(diff) > 4 else ''}); use a fresh output or pass --overwrite to start again"
            )
    if identity is not None and rank == 0:
        write_json_atomic(ident, identity)


def fingerprint(path) -> dict | None:
    """A cheap identity of a model/adapter folder or a data file: resolved path; for folders, a hash of every small
    file (configs, tokenizer files: < 2 MB) and the size of every large one (weights); for a file, its size and a
    hash of its first and last MB. Changes when the weights are replaced by others of another size or when any
    config changes; a rewrite of same-sized weights with identical configs is not noticed (hash the weights for that).
    """
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return {"path": str(path)}
    p = p.resolve()
    if p.is_file():
        return {"path": str(p), **_file_print(p)}
    files = {}
    for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.endswith(".lock")):
        rel = str(f.relative_to(p))
        if rel.startswith((".", "checkpoint-")) or "/." in rel:
            continue
        files[rel] = _file_print(f)
        if len(files) > 200:
            break
    return {"path": str(p), "files": files}


def _file_print(f: Path) -> dict:
    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        if size <= 2 << 20:
            h.update(fh.read())
        else:
            h.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            h.update(fh.read())
    return {"size": size, "sha256": h.hexdigest()[:16]}


def run_resumable(
    out, items, key, process, chunk_size, order=None, desc="cases", poll=5.0, identity=None, overwrite=False
):
    """Apply `process(list_of_items) -> list_of_records` to every item not yet in `out`, `chunk_size` items at a
    time, appending each record as soon as it exists. Returns {key: record} for all items on rank 0 (after the
    merge), None on the other ranks. `order` (keys; default: item order) fixes the final file order. `identity`:
    what produces the records (see `claim`; a command calls `claim` itself before loading a model)."""
    from tqdm import tqdm

    out = Path(out)
    claim(out, identity, overwrite)
    rank, world = dist_info()
    keys = [str(key(it)) for it in items]
    order = keys if order is None else [str(k) for k in order]
    target = out if world == 1 else _shard_path(out, rank, world)
    sink = ResumableJsonl(target)  # only this rank writes `target`; a torn last line is cut here
    done = set(finished_records(out, skip=target)) | sink.done
    mine = shard(items, rank, world)
    todo = [it for it in mine if str(key(it)) not in done]
    if len(todo) < len(mine):
        log.info("rank %d: %d of %d cases already done; resuming", rank, len(mine) - len(todo), len(mine))
    bar = tqdm(
        total=len(todo),
        desc=desc if world == 1 else f"{desc} [rank {rank}]",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not todo,
    )
    with sink:
        for s in range(0, len(todo), chunk_size):
            chunk = todo[s : s + chunk_size]
            records = process(chunk)
            if len(records) != len(chunk):  # rank 0 waits for every key: a lost record would hang it
                raise RuntimeError(f"process() returned {len(records)} records for {len(chunk)} items")
            for record in records:
                sink.append(record)
            bar.update(len(chunk))
    bar.close()
    if rank != 0:
        release(out)
        if not target.exists():  # nothing of ours to merge (all done before we started): leave no lock file behind
            lock_path(target).unlink(missing_ok=True)
        return None
    if world > 1:  # wait (file system only: no process group, no NCCL timeout) until every case is in some file;
        # if a rank dies, torchrun stops the others and a rerun picks up from the shard files
        missing = set(keys) - set(finished_records(out))
        while missing:
            time.sleep(poll)
            missing -= set(finished_records(out))
    merged = ResumableJsonl(out)
    with merged:  # shard files: this run's ranks, or leftovers of an interrupted run with another world size
        for record in finished_records(out, skip=out).values():
            merged.append(record)
    records = merged.finalize(order)
    for p in _shard_files(out):
        p.unlink()
    for p in out.parent.glob(out.name + ".rank*-of-*.lock"):  # every rank has finished: none takes these again
        p.unlink(missing_ok=True)
    release(out)
    return {str(r[merged.key]): r for r in records}


# ---------------------------------------------------------------- outputs checked before any work


def check_outputs(outputs: dict, inputs: dict) -> None:
    """Stop before any model loads if an output would replace an input or cannot be written.
    `outputs` / `inputs`: {flag or description: path}; an output may be a file or a folder (then each input must
    not be the folder itself). Writability: the parent is created and a temporary file written and removed."""
    ins = {}
    for flag, p in inputs.items():
        if p is not None:
            ins[str(Path(p).resolve())] = flag
    for flag, p in outputs.items():
        if p is None:
            continue
        r = Path(p).resolve()
        if str(r) in ins:
            raise ApoError(f"{flag} {p}: is also the input {ins[str(r)]}; writing it would replace the input")
        if r.is_dir() and not flag.endswith("_dir") and r.suffix:
            raise ApoError(f"{flag} {p}: is a folder, not a file")
        parent = r.parent
        while not parent.exists():  # nothing is created here: the nearest existing folder must take new files
            parent = parent.parent
        if not parent.is_dir():
            raise ApoError(f"{flag} {p}: cannot write there ({parent} is a file, not a folder)")
        try:
            probe = parent / f".apo-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ApoError(f"{flag} {p}: cannot write there ({e.strerror or e})") from None
