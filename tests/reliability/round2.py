"""Helpers of the round-2 adversarial suite (issue 16): run a command in process, assert one clear line, stand in
for the model where a case needs none, hold an output lock from another process."""

import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import apo.evaluation.metrics
import apo.model.generation
from apo.cli import main

from .world import TEXTS, data_rows, jsonl

UNWRITABLE = "/proc/apo-no-such-dir/out"  # not creatable even by root


def run(capsys, argv):
    """-> (exit code, stderr). Any exception but ApoError escaping main() would be a traceback for the user."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"apo {argv[0]}: a traceback would reach the user: {e.__class__.__name__}: {e}")
    captured = capsys.readouterr()
    run.out = captured.out
    return rc, captured.err


def one_line(rc, err, command, pattern):
    """Exit 2, exactly one `apo CMD: error: ...` line matching `pattern`, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"apo {command}: error: "), errors[0]
    assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"
    return errors[0]


def ok(rc, err):
    assert rc == 0 and "Traceback" not in err, err


def jpeg(path, size=(64, 64), seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG" if str(path).endswith(".jpg") else None)
    return path


def folder_world(tmp: Path, rows=None, name="data.jsonl") -> Path:
    """A data file in `tmp` with its images next to it (the default image root)."""
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        if not (tmp / f"c{i}.jpg").exists():
            jpeg(tmp / f"c{i}.jpg", seed=i)
    rows = list(data_rows(["c0", "c1"])) if rows is None else rows
    (tmp / name).write_bytes(jsonl(rows))
    return tmp / name


def long_row(cid="c0", teacher="GPT-5-nano", image="c0.jpg", **kw):
    return {
        "case_id": cid,
        "image": image,
        "question": "What supports it?",
        "model": teacher,
        "response": TEXTS.get(teacher, "Left pleural effusion."),
        **kw,
    }


def fake_model(folder: Path, **config) -> Path:
    """A folder that looks like a model to the identity record (never loaded: model_from_args is stood in for)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", **config}))
    (folder / "model.safetensors").write_bytes(_safetensors())
    return folder


def fake_adapter(folder: Path, r=8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(_safetensors())
    return folder


def _safetensors(n=4) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * (4 * n)


class StandIn:
    """No model: model_from_args returns placeholders, generate answers a fixed text and counts requests."""

    def __init__(self, monkeypatch, answer="Small left pleural effusion."):
        self.requests = 0
        self.loaded = 0

        def load(args):
            self.loaded += 1
            return None, None

        def generate(model, processor, requests, **kw):
            self.requests += len(requests)
            return [answer] * len(requests)

        for mod in ("apo.evaluation.report", "apo.evaluation.mscxrt", "apo.consensus"):
            monkeypatch.setattr(f"{mod}.model_from_args", load)
        monkeypatch.setattr(apo.model.generation, "generate", generate)
        monkeypatch.setattr(apo.evaluation.metrics, "nlg_scores", lambda refs, hyps: {"BLEU-1": 0.5})


@contextlib.contextmanager
def held_lock(path: Path, shared=False):
    """Another process holds flock on `path` (as a running `apo` would); yields its pid."""
    code = (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+')\n"
        f"fcntl.flock(f.fileno(), fcntl.{'LOCK_SH' if shared else 'LOCK_EX'})\n"
        "f.seek(0); f.truncate(); f.write(f'pid {os.getpid()} on host testhost\\n'); f.flush()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def copy_world_images(src: Path, dst: Path):
    for p in src.glob("c*.jpg"):
        shutil.copy(p, dst / p.name)
