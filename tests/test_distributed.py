"""Data-parallel APO on 2 CPU processes (torchrun, gloo; DeepSpeed ZeRO-2/3 on its CPU accelerator) against one
process on the same global batch: same losses, gradient norms, rewards and trained adapter."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import make_groups

from apo.trainer import cli

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ("GPT-5-nano", "Grok-4")


def _overrides(tiny_model_dir, groups_file, out, per_device):
    # sequential sampling: one process sees groups [0..3] per step, two see [0,1] and [2,3]
    return [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--groups_file",
        str(groups_file),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        str(per_device),
        "--train_sampling_strategy",
        "sequential",
        "--lora_dropout",
        "0",
        "--merge_on_save",
        "false",
        "--learning_rate",
        "1e-2",
    ]


def _history(out):
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def _single(tiny_model_dir, tmp, extra=(), longer_positives=False):
    groups_file = make_groups(tmp / "g", n_groups=8, n_negatives=(3, 1, 2, 3))
    if longer_positives:  # group i's positive gains i sentences: the two processes see different token counts
        groups = [json.loads(line) for line in groups_file.read_text().splitlines()]
        for i, g in enumerate(groups):
            g["positive"] += " The heart size is normal." * i
        groups_file.write_text("".join(json.dumps(g) + "\n" for g in groups))
    out = tmp / "single"
    args = argparse.Namespace(
        config="configs/apo/demo.yaml",
        help_config=False,
        rest=_overrides(tiny_model_dir, groups_file, out, per_device=4) + list(extra),
    )
    assert cli.run(args) == 0
    return groups_file, out


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The reference: one process, 4 groups per step."""
    return _single(tiny_model_dir, tmp_path_factory.mktemp("dist"))


def _two_processes(tiny_model_dir, groups_file, out, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "apo.cli",
        "train",
        "--config",
        "configs/apo/demo.yaml",
        *_overrides(tiny_model_dir, groups_file, out, 2),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("apo train: loss") == 1  # the summary comes from process 0 only


def _same_run(single_out, out, keys=()):
    """Same losses, gradient norms, metrics (reduced as (sum, count), not a mean of means) and trained adapter."""
    one, two = _history(single_out), _history(out)
    assert [h["step"] for h in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # the averaged gradient
    for k in keys:
        assert two[1][k] == pytest.approx(one[1][k], rel=1e-4, abs=1e-6), k
    w1, w2 = load_file(single_out / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


@pytest.mark.parametrize(
    "launcher",
    [
        "ddp",
        pytest.param("zero2", marks=pytest.mark.slow),
        pytest.param("zero3", marks=pytest.mark.slow),
        # gradient checkpointing: non-reentrant under DDP, reentrant under DeepSpeed (APOConfig's default, ms-swift's
        # rule)
        pytest.param("ddp+ckpt", marks=pytest.mark.slow),
        pytest.param("zero3+ckpt", marks=pytest.mark.slow),
    ],
)
def test_two_processes_match_one(tiny_model_dir, single, tmp_path, launcher):
    groups_file, single_out = single
    out = tmp_path / launcher
    launcher, _, ckpt = launcher.partition("+")
    extra = [] if launcher == "ddp" else ["--deepspeed", str(ROOT / "configs" / "deepspeed" / f"{launcher}.json")]
    extra += ["--gradient_checkpointing", "true"] if ckpt else []  # no LoRA dropout: the same numbers
    _two_processes(tiny_model_dir, groups_file, out, extra)
    _same_run(single_out, out, ("rewards/margins", "rewards/negatives", *(f"rewards/teacher/{t}" for t in TEACHERS)))


@pytest.mark.parametrize("launcher", ["ddp", pytest.param("zero3", marks=pytest.mark.slow)])
def test_two_processes_match_one_with_the_nll_term(tiny_model_dir, tmp_path, launcher):
    """--sft_weight: the NLL is a token mean over every process's positives (the groups' positives differ in length,
    so a mean of per-process means would not be one process's update). Under ZeRO-3 the two processes also score
    different numbers of tokens: the partitioned lm_head is gathered once per forward, not once per chunk of tokens
    (per chunk, the processes made different numbers of collective calls and hung)."""
    groups_file, single_out = _single(tiny_model_dir, tmp_path / "one", ["--sft_weight", "1.0"], longer_positives=True)
    out = tmp_path / "two"
    extra = [] if launcher == "ddp" else ["--deepspeed", str(ROOT / "configs" / "deepspeed" / "zero3.json")]
    _two_processes(tiny_model_dir, groups_file, out, ["--sft_weight", "1.0", *extra])
    _same_run(single_out, out, ("nll/positive", "rewards/margins"))
