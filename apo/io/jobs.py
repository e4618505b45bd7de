"""Data-parallel, resumable jobs: one process per GPU, nothing shared but the file system.

    torchrun --nproc_per_node 4 -m apo.cli consensus --model DIR ...     (or: accelerate launch -m apo.cli ...)

`run_resumable` gives rank r the items `shard(items, r, world)`; each rank appends to its own shard file
`OUT.rank<r>-of-<world>`, rank 0 waits for all of them, merges into OUT in dataset order and removes the shards.
A rerun (any world size) skips every case already in OUT or in any shard file. With one process nothing changes:
results go straight into OUT. Several nodes (torchrun --nnodes) need OUT on a file system they all see.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from apo.io.resumable import ResumableJsonl

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
    return sorted(p for p in out.parent.glob(out.name + ".rank*-of-*") if not p.name.endswith(".tmp"))


def finished_records(out, skip=None) -> dict[str, dict]:
    """Records already in OUT or in any shard file (read-only: other ranks may be appending to theirs)."""
    out = Path(out)
    found = {}
    for p in [out] + _shard_files(out):
        if p != skip and p.exists():
            found.update(ResumableJsonl(p, readonly=True).records)
    return found


def run_resumable(out, items, key, process, chunk_size, order=None, desc="cases", poll=5.0):
    """Apply `process(list_of_items) -> list_of_records` to every item not yet in `out`, `chunk_size` items at a
    time, appending each record as soon as it exists. Returns {key: record} for all items on rank 0 (after the
    merge), None on the other ranks. `order` (keys; default: item order) fixes the final file order."""
    from tqdm import tqdm

    out = Path(out)
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
    return {str(r[merged.key]): r for r in records}
