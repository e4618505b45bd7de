"""Round 2 (issue 16), optional item: a two-process torchrun consensus killed with SIGKILL (the whole process group,
as a node failure would) and rerun ends byte-identical to a single-process run; the kill leaves no lock behind
(flock dies with its process), and the identity record lets the rerun resume rather than refuse."""

import os
import signal
import subprocess
import sys
import time

import pytest

from apo.cli import main

from .faults import REPO, complete_lines
from .world import build


def _kill_all(proc):
    """SIGKILL torchrun and every worker it started (its workers get sessions of their own: killpg alone misses
    them, and a surviving worker still holds its shard's lock, as it should)."""
    psutil = pytest.importorskip("psutil")
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def _torchrun(argv, log):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "apo.cli", *map(str, argv)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 3])
def test_sharded_consensus_killed_and_rerun_matches_one_process(tmp_path, kill_after):
    w = build(tmp_path / "w", n_cases=24)
    clean = tmp_path / "clean.jsonl"
    common = ["consensus", "--strategy", "vote", "--dataset", w["data"], "--image-root", w["root"]]
    assert main([*map(str, common), "--out", str(clean)]) == 0
    out = tmp_path / "sharded.jsonl"
    argv = [*common, "--out", out]
    with open(tmp_path / "log.txt", "ab") as log:
        proc = _torchrun(argv, log)
        start, shards = time.monotonic(), 0
        try:
            while proc.poll() is None and time.monotonic() - start < 300:
                shards = sum(complete_lines(p) for p in tmp_path.glob("sharded.jsonl.rank*-of-2"))
                if shards >= kill_after:
                    break
                time.sleep(0.005)
        finally:
            killed = proc.poll() is None
            _kill_all(proc)
        print(f"killed mid-run: {killed}; shard lines then: {shards}; merged file then: {out.exists()}")
        rerun = _torchrun(argv, log)
        assert rerun.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert out.read_bytes() == clean.read_bytes()
    assert not list(tmp_path.glob("sharded.jsonl.rank*"))  # shards and their locks merged away
