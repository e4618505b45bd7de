"""Fault injection: run a real `apo` command as its own process and SIGKILL it at a chosen moment (after k records
reached the output file, after a delay, when a checkpoint folder appears), then look at what it left behind.
Used by the crash tests and by scripts/soak.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def complete_lines(path) -> int:
    try:
        return Path(path).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def after_records(path, k):
    return lambda elapsed: complete_lines(path) >= k


def after_seconds(s):
    return lambda elapsed: elapsed >= s


def kill_when(argv, when, log_path, timeout=300.0, poll=0.005) -> dict:
    """Start `python -m apo.cli ARGV` in its own process group; SIGKILL the group as soon as when(elapsed) is true.
    -> {"killed": bool, "at": seconds, "rc": exit code if it finished first}."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "apo.cli", *map(str, argv)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        start = time.monotonic()
        try:
            while True:
                elapsed = time.monotonic() - start
                if proc.poll() is not None:
                    return {"killed": False, "at": elapsed, "rc": proc.returncode}
                if when(elapsed):
                    os.killpg(proc.pid, signal.SIGKILL)  # the process and anything it started (METEOR's JVM)
                    proc.wait()
                    return {"killed": True, "at": round(elapsed, 3), "rc": proc.returncode}
                if elapsed > timeout:
                    raise TimeoutError(f"{argv[0]} ran for more than {timeout} s")
                time.sleep(poll)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_apo(argv, log_path, timeout=600.0) -> int:
    """Run `python -m apo.cli ARGV` to the end; its exit code."""
    with open(log_path, "ab") as log:
        return subprocess.run(
            [sys.executable, "-m", "apo.cli", *map(str, argv)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        ).returncode


def partial_keys(path, key="case_id") -> list[str]:
    """What a killed run left: every complete line a record, no key twice; at most one torn line at the end."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    keys = [str(json.loads(ln)[key]) for ln in lines[:-1]]  # a complete line that does not parse raises here
    assert len(keys) == len(set(keys)), f"{path}: a record written twice"
    return keys


def tear(path, text=b'{"case_id": "torn-by-the-test", "tex'):
    """Simulate a kill in the middle of a write: half a record, no newline."""
    with open(path, "ab") as fh:
        fh.write(text)
