"""Crash safety (issue 6, item 1): real `apo` processes SIGKILLed at random moments, then rerun with the same command.

Long-job stages (consensus vote/model, eval-report, eval-mscxrt): each test runs a chain
    kill after a random delay -> rerun, kill after the first record -> rerun, kill after k random records
    -> (a torn half line appended, as a kill mid-write leaves it) -> rerun to the end
and asserts after every kill that the output holds only whole, distinct records, and at the end that the file is
byte-identical to an uninterrupted run (greedy decoding) with exactly one record per case.
Training: `apo train` killed after a checkpoint (and once in the middle of writing one), resumed with --resume,
ends with the same adapter weights as an uninterrupted run; a half-written checkpoint is never picked up.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apo.cli import main
from apo.trainer.checkpoint import MARKER, checkpoint_problem, checkpoints, last_complete_checkpoint, mark_complete

from .faults import after_records, after_seconds, complete_lines, kill_when, partial_keys, tear
from .world import build

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
DEMO = str(Path(__file__).parents[2] / "configs" / "apo" / "demo.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("crash"), n_cases=10, n_pairs=10)


def kill_chain(argv, out_file, n, tmp_path, seed, startup=(0.3, 2.0), min_kills=2):
    """Three SIGKILLs at different moments (a delay from start; the first new record; k random new records), each run
    resuming the last one's file, then a run to the end (in process). A run that finished before its kill point
    starts the next one afresh. -> the kill log."""
    rng = random.Random(seed)
    log, kills = tmp_path / "kills.log", []
    for kind in ("delay", "first record", "k records"):
        if complete_lines(out_file) >= n:  # the last run was not killed in time: kill a fresh one
            Path(out_file).unlink()
        base = complete_lines(out_file)
        when = (
            after_seconds(rng.uniform(*startup))
            if kind == "delay"
            else after_records(out_file, base + (1 if kind == "first record" else rng.randint(1, max(1, n - base - 1))))
        )
        kills.append((kind, kill_when(argv, when, log)))
        partial_keys(out_file)  # whole, distinct records only (a torn last line is allowed)
    if Path(out_file).exists():
        tear(out_file)
    assert main([str(a) for a in argv]) == 0, log.read_text()[-3000:]
    print(f"{argv[0]} kills:", kills)
    assert sum(k["killed"] for _, k in kills) >= min_kills, kills  # the record-count kills land before the end
    return kills


def one_per_case(out_file, ids):
    keys = partial_keys(out_file)
    assert sorted(keys) == sorted(ids) and len(keys) == len(set(keys))


def test_consensus_vote_killed_and_rerun(synth_dir, tmp_path):
    data = synth_dir / "cxrmax_train.jsonl"
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    argv = ["consensus", "--strategy", "vote", "--dataset", data]
    assert main([str(a) for a in argv + ["--out", ref]]) == 0
    n = complete_lines(ref)
    for seed in range(3):  # 3 chains x 3 kills; the vote is fast, so kills land anywhere from start-up to the merge
        out.unlink(missing_ok=True)
        # min_kills=1: the vote writes all its records in one burst (<1 ms on tmpfs), a record kill may miss it
        kill_chain(argv + ["--out", out], out, n, tmp_path, seed, startup=(0.05, 0.4), min_kills=1)
        assert out.read_bytes() == ref.read_bytes()
    one_per_case(out, [json.loads(ln)["case_id"] for ln in ref.read_text().splitlines()])


@pytest.mark.slow
def test_consensus_model_killed_and_rerun(world, tiny_model_dir, tmp_path):
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    argv = [
        "consensus",
        "--strategy",
        "model",
        "--model",
        tiny_model_dir,
        "--dataset",
        world["data"],
        "--max-new-tokens",
        6,
        "--batch-size",
        2,
        "--max-length",
        1024,
    ]
    assert main([str(a) for a in argv + ["--out", ref]]) == 0
    kill_chain(argv + ["--out", out], out, len(world["cases"]), tmp_path, seed=1)
    assert out.read_bytes() == ref.read_bytes()
    one_per_case(out, world["cases"])


@pytest.mark.slow
def test_eval_report_killed_and_rerun(world, tiny_model_dir, tmp_path, monkeypatch):
    import apo.evaluation.metrics

    argv = [
        "eval-report",
        "--model",
        tiny_model_dir,
        "--dataset",
        world["data"],
        "--max-new-tokens",
        6,
        "--batch-size",
        1,
    ]
    # killed runs die during generation; the in-process runs skip METEOR's JVM (~15 s), the same way both times
    monkeypatch.setattr(apo.evaluation.metrics, "nlg_scores", lambda refs, hyps: {"BLEU-1": float(len(" ".join(hyps)))})
    assert main([str(a) for a in argv + ["--out", tmp_path / "ref"]]) == 0
    out = tmp_path / "out" / "predictions.jsonl"
    kill_chain(argv + ["--out", tmp_path / "out"], out, len(world["cases"]), tmp_path, seed=2)
    for name in ("predictions.jsonl", "metrics.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    one_per_case(out, world["cases"])


@pytest.mark.slow
def test_eval_mscxrt_killed_and_rerun(world, tiny_model_dir, tmp_path):
    argv = [
        "eval-mscxrt",
        "--model",
        tiny_model_dir,
        "--csv",
        world["csv"],
        "--image-root",
        world["root"],
        "--max-new-tokens",
        4,
        "--batch-size",
        1,
    ]
    assert main([str(a) for a in argv + ["--out", tmp_path / "ref"]]) == 0
    out = tmp_path / "out" / "mscxrt_predictions.jsonl"
    n = complete_lines(tmp_path / "ref" / "mscxrt_predictions.jsonl")
    kill_chain(argv + ["--out", tmp_path / "out"], out, n, tmp_path, seed=3)
    for name in ("mscxrt_predictions.jsonl", "mscxrt.json", "unparsed.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert n == len(world["csv_rows"])


# ------------------------------------------------------------------------------------------------------ training

STEPS = 12


def _train_argv(world, tiny_model_dir, out, *extra):
    return [
        "train",
        "--config",
        DEMO,
        "--model_name_or_path",
        tiny_model_dir,
        "--groups_file",
        world["groups"],
        "--output_dir",
        out,
        "--max_steps",
        STEPS,
        "--save_strategy",
        "steps",
        "--save_steps",
        1,
        "--save_total_limit",
        2,
        "--lora_dropout",
        0.1,
        "--learning_rate",
        1e-3,
        "--merge_on_save",
        "false",
        *extra,
    ]


def _adapter(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_train_killed_and_resumed_ends_with_the_same_adapter(world, tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"
    assert main([str(a) for a in _train_argv(world, tiny_model_dir, ref)]) == 0
    out, log = tmp_path / "out", tmp_path / "train.log"
    argv = _train_argv(world, tiny_model_dir, out, "--resume")
    # kill 1: as soon as checkpoint-k (k random in 1..4) is complete, i.e. during step k+1
    k = random.Random(4).randint(1, 4)
    first = kill_when(argv, lambda t: (out / f"checkpoint-{k}" / MARKER).exists(), log)
    assert first["killed"], log.read_text()[-3000:]
    first["after"] = [p.name for p in checkpoints(out)]
    # kill 2: the moment a new checkpoint folder appears, before its commit record: a save cut short (a save takes
    # milliseconds, so on a fast machine this may miss and the run finish: then the final rerun only rewrites)
    before = {p.name for p in checkpoints(out)}
    kill = kill_when(
        argv, lambda t: any(p.name not in before and not (p / MARKER).exists() for p in checkpoints(out)), log
    )
    kills = [first, kill]
    cut = [p for p in checkpoints(out) if checkpoint_problem(p)]
    print("train kills:", kills, "cut short:", [p.name for p in cut])
    newest = last_complete_checkpoint(out)
    assert newest and all(int(p.name.split("-")[1]) > int(Path(newest).name.split("-")[1]) for p in cut)
    assert main([str(a) for a in argv]) == 0, log.read_text()[-3000:]
    _same_weights(_adapter(out), _adapter(ref))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    ref_losses = {
        h["step"]: h["loss"] for h in json.loads((ref / "trainer_state.json").read_text())["log_history"] if "loss" in h
    }
    assert losses.keys() == ref_losses.keys()
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # killed while writing the final output, after the last checkpoint: the rerun writes it again, trains no more
    # (transformers 5.19 resumed at max_steps would train one extra step)
    late = tmp_path / "late"
    shutil.copytree(ref, late)
    w = late / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert main([str(a) for a in _train_argv(world, tiny_model_dir, late, "--resume")]) == 0
    _same_weights(_adapter(late), _adapter(ref))
    assert json.loads((late / "trainer_state.json").read_text())["global_step"] == STEPS


def _fake_checkpoint(folder: Path, step: int):
    """A checkpoint-shaped folder: a real safetensors file, a torch archive, trainer_state.json; marked."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(folder / "adapter_model.safetensors"))
    torch.save({"step": step}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    mark_complete(folder)
    return folder


@pytest.mark.parametrize(
    "damage", ["no_marker", "truncated_weights", "missing_optimizer", "grown_file", "bad_marker", "empty_folder"]
)
def test_a_half_written_checkpoint_is_never_picked(tmp_path, damage):
    good = _fake_checkpoint(tmp_path / "checkpoint-2", 2)
    bad = _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    if damage == "no_marker":
        (bad / MARKER).unlink()
    elif damage == "truncated_weights":
        w = bad / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:-50])
    elif damage == "missing_optimizer":
        (bad / "optimizer.pt").unlink()
    elif damage == "grown_file":  # rewritten by a later save that was cut short
        (bad / "trainer_state.json").write_text('{"global_step": 4, "more": 1}')
    elif damage == "bad_marker":
        (bad / MARKER).write_text('{"files": ')
    else:
        shutil.rmtree(bad)
        bad.mkdir()
    assert checkpoint_problem(bad) and checkpoint_problem(good) is None
    assert last_complete_checkpoint(tmp_path) == str(good)


@pytest.mark.parametrize("damage", ["truncated_weights", "truncated_optimizer", "no_state", "no_weights"])
def test_an_unmarked_checkpoint_is_checked_structurally(world, tmp_path, damage, capsys):
    """A folder named explicitly (--resume_from_checkpoint DIR) without a commit record (another tool wrote it)
    is accepted only if its files are whole; otherwise `apo train` stops with one line, before loading anything."""
    from apo.trainer.cli import resume_point
    from apo.trainer.config import parse_config

    ck = _fake_checkpoint(tmp_path / "checkpoint-3", 3)
    (ck / MARKER).unlink()
    config = parse_config(DEMO, ["--output_dir", str(tmp_path), "--resume_from_checkpoint", str(ck)])
    assert resume_point(config) == str(ck)  # whole files: accepted
    if damage == "truncated_weights":
        w = ck / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:-1])
    elif damage == "truncated_optimizer":
        o = ck / "optimizer.pt"
        o.write_bytes(o.read_bytes()[: o.stat().st_size // 2])
    elif damage == "no_state":
        (ck / "trainer_state.json").unlink()
    else:
        (ck / "adapter_model.safetensors").unlink()
    rc = main(
        [
            "train",
            "--config",
            DEMO,
            "--model_name_or_path",
            str(tmp_path / "never-loaded"),
            "--groups_file",
            str(world["groups"]),
            "--output_dir",
            str(tmp_path),
            "--resume_from_checkpoint",
            str(ck),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"--resume_from_checkpoint {ck}: not a complete checkpoint" in err, err
