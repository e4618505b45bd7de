"""Edges (issue 6, items 3 and 4): over-length prompts and responses, extreme log-prob gaps in the trainer.

Over-length policy, as documented where it lives:
  train (apo.trainer.collator)  prompt never cut; responses truncated to max_length - prompt; a candidate with no
                                response token left is dropped and marked invalid (never scored as log-prob 0), so
                                a group with nothing left to rank is left out of the loss.
  consensus (apo.consensus)     teacher trajectories cut per teacher (water-filling) to fit --max-length; a case whose
                                image(s) + question alone do not fit stops the run naming it, or with --skip-bad is
                                recorded with an empty text and "skipped" (build-pairs drops it).
  eval-report (apo.evaluation.report)    no limit unless --max-length; then an over-long case stops the run
                                naming it, or with --skip-bad is left out of generation and scoring
                                (OUT/too_long.jsonl).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from apo.cli import main

from .world import build

DEMO = str(Path(__file__).parents[2] / "configs" / "apo" / "demo.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("edges"), n_cases=4, n_pairs=3)


@pytest.fixture(scope="module")
def trainer(world, tiny_model_dir, tmp_path_factory):
    from apo.trainer.collator import load_groups
    from apo.trainer.config import parse_config
    from apo.trainer.trainer import APOTrainer, build_model

    config = parse_config(
        DEMO,
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--groups_file",
            str(world["groups"]),
            "--output_dir",
            str(tmp_path_factory.mktemp("edges_apo")),
        ],
    )
    model, processor = build_model(config)
    return APOTrainer(
        model=model, args=config, train_dataset=load_groups(config.groups_file), processing_class=processor
    )


# ------------------------------------------------------------------------------------------------ training side


def test_a_dropped_group_is_left_out_of_the_loss_not_counted_as_zero(trainer):
    """[normal group, group whose prompt fills max_length]: same loss and logged metrics as [normal group] alone."""
    normal = trainer.train_dataset[0]
    long = dict(trainer.train_dataset[1], prompt="effusion " * 2000)  # ~2000 tokens > demo max_length 1024
    trainer.model.train()
    results = []
    for groups in ([normal, long], [normal]):
        batch = trainer._prepare_inputs(trainer.data_collator(groups))
        trainer._acc.zero_()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        results.append((loss.item(), trainer._acc.clone(), batch["valid"]))
    (mixed, acc_mixed, valid), (alone, acc_alone, _) = results
    assert valid[1].tolist() == [False] * valid.shape[1]  # dropped, invalid: not a row with log-prob 0
    assert mixed == pytest.approx(alone, rel=1e-6) and math.isfinite(mixed)
    assert torch.allclose(acc_mixed, acc_alone)  # per-group metrics weighted by active groups only


@pytest.mark.parametrize("loss", ["apo", "dpo"])
@pytest.mark.parametrize("gap", [1e2, 1e4, 1e5])
def test_extreme_log_probs_keep_loss_gradient_and_logged_metrics_finite(trainer, monkeypatch, loss, gap):
    """Sequence log-probs of -1e5 (long answers) against a reference far away: rewards up to |r| = beta * 1e5 = 1e4.
    The loss, its gradient and every metric the trainer logs stay finite."""
    from apo.loss import LOSSES

    batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:2]))
    n = trainer.n_rows(batch)
    sign = torch.tensor([(-1.0) ** i for i in range(n)])
    policy = (-gap + sign * gap / 2).requires_grad_()  # rows alternately -gap/2 and -1.5 gap
    calls = iter([(policy, torch.full((n,), 50)), (-policy.detach().flip(0) * 0.5, torch.full((n,), 50))])
    monkeypatch.setattr(trainer, "logps", lambda model, inputs: next(calls))  # policy, then reference
    monkeypatch.setattr(trainer, "loss_fn", LOSSES[loss])
    trainer.model.train()
    trainer._acc.zero_()
    out = trainer.compute_loss(trainer.model, batch)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(policy.grad).all()
    logs = {"loss": out.item()}
    monkeypatch.setattr(type(trainer).__mro__[1], "log", lambda self, logs, start_time=None: None)
    trainer.log(logs)
    metrics = {k: v for k, v in logs.items() if k.startswith(("rewards/", "logps/"))}
    assert set(metrics) >= {"rewards/margins", "rewards/accuracies", "logps/positive"}
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert max(abs(v) for k, v in metrics.items() if k.startswith("rewards/")) > gap * trainer.args.beta / 10


# ------------------------------------------------------------------------------------------------ consensus, eval


def test_consensus_cuts_trajectories_to_fit_max_length(world, tiny_model_dir, tmp_path):
    long = tmp_path / "long.jsonl"
    rows = [json.loads(ln) for ln in world["data"].read_text().splitlines()]
    for r in rows:
        if r["model"] == "Grok-4":
            r["response"] = "Left pleural effusion. " * 400  # ~2000 tokens
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c.jsonl"
    assert (
        main(
            [
                "consensus",
                "--strategy",
                "model",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(long),
                "--image-root",
                str(world["root"]),
                "--max-length",
                "600",
                "--max-new-tokens",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(recs) == len(world["cases"])
    for r in recs:
        assert r["prompt_tokens"] <= 600 - 4
        assert set(r["truncated"]) == {"Grok-4"} and r["truncated"]["Grok-4"] > 1000  # only the long one cut


def test_consensus_question_alone_too_long(world, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    rows = [json.loads(ln) for ln in world["data"].read_text().splitlines()]
    for r in rows:
        if r["case_id"] == "c1":
            r["question"] = "Which findings support it? " * 200
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "consensus",
        "--strategy",
        "model",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--image-root",
        str(world["root"]),
        "--max-length",
        "400",
        "--max-new-tokens",
        "4",
    ]
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "a.jsonl")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "case c1:" in err[0] and "--max-length 400" in err[0], err
    assert main(argv + ["--out", str(tmp_path / "b.jsonl"), "--skip-bad"]) == 0
    recs = {json.loads(ln)["case_id"]: json.loads(ln) for ln in (tmp_path / "b.jsonl").read_text().splitlines()}
    assert sorted(recs) == world["cases"] and recs["c1"]["text"] == "" and "--max-length 400" in recs["c1"]["skipped"]
    assert all(r["text"] and "skipped" not in r for k, r in recs.items() if k != "c1")
    # build-pairs drops it with a reason, keeps the others
    assert (
        main(
            [
                "build-pairs",
                "--dataset",
                str(data),
                "--image-root",
                str(world["root"]),
                "--consensus",
                str(tmp_path / "b.jsonl"),
                "--out",
                str(tmp_path / "g.jsonl"),
            ]
        )
        == 0
    )
    dropped = [json.loads(ln) for ln in (tmp_path / "g.jsonl.dropped.jsonl").read_text().splitlines()]
    assert {"case_id": "c1", "what": "case", "reason": "empty_positive"} in dropped
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == len(world["cases"]) - 1


def test_eval_report_max_length(world, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import apo.evaluation.metrics

    monkeypatch.setattr(apo.evaluation.metrics, "nlg_scores", lambda refs, hyps: {"BLEU-1": 0.0})
    data = tmp_path / "q.jsonl"
    rows = [json.loads(ln) for ln in world["data"].read_text().splitlines()]
    for r in rows:
        if r["case_id"] == "c2":
            r["question"] = "Which findings support it? " * 200
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "eval-report",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--image-root",
        str(world["root"]),
        "--max-length",
        "300",
        "--max-new-tokens",
        "4",
    ]
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "a")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "case c2:" in err[0], err
    assert not (tmp_path / "a" / "predictions.jsonl").exists()  # checked before any answer is generated
    assert main(argv + ["--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    preds = [json.loads(ln)["case_id"] for ln in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    assert preds == [c for c in world["cases"] if c != "c2"]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["too_long"] == 1
    assert json.loads((tmp_path / "b" / "too_long.jsonl").read_text())["case_id"] == "c2"


# ------------------------------------------------------------------------------------------------ the shell side


def test_a_closed_pipe_ends_the_command_quietly(world, tmp_path):
    """`apo prepare-sft ... | head -1`: the reader leaves before the summary is printed. The command ends with 141
    (a shell's code for a closed pipe) and no traceback, and the file it was asked for is written in full."""
    import subprocess
    import sys

    out = tmp_path / "sft.jsonl"
    cmd = [sys.executable, "-m", "apo.cli", "prepare-sft", "--dataset", str(world["data"])]
    proc = subprocess.Popen(
        [*cmd, "--image-root", str(world["root"]), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # before the child has imported anything: its first write meets a closed pipe
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    trajectories = world["data"].read_text(encoding="utf-8").splitlines()
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(trajectories)  # one row per trajectory
