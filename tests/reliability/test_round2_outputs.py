"""Round 2 (issue 16), outputs: what produced a resumable output (class 1), one writer per output (class 4), outputs
that are inputs or cannot be written, stale rejects files (class 5). No model is loaded: generation is stood in for
(`round2.StandIn`), and every refusal must come before the model would load."""

import json
import re
from pathlib import Path

import pytest

from apo.io.jobs import identity_path

from .round2 import (
    UNWRITABLE,
    StandIn,
    fake_adapter,
    fake_model,
    held_lock,
    ok,
    one_line,
    run,
)
from .world import build

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
DEMO = str(Path(__file__).parents[2] / "configs" / "apo" / "demo.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = build(tmp_path_factory.mktemp("world2"))
    w["model_a"] = fake_model(w["root"] / "model-a", hidden_size=8)
    w["model_b"] = fake_model(w["root"] / "model-b", hidden_size=16)
    w["adapter_a"] = fake_adapter(w["root"] / "adapter-a", r=8)
    w["adapter_b"] = fake_adapter(w["root"] / "adapter-b", r=16)
    return w


# ------------------------------------------------------------------ class 1: identity of resumable outputs


def consensus_vote(w, tmp, *extra, data=None):
    return [
        "consensus",
        "--strategy",
        "vote",
        "--dataset",
        data or w["data"],
        "--image-root",
        w["root"],
        "--out",
        tmp / "cons.jsonl",
        *extra,
    ]


def consensus_model(w, tmp, *extra, data=None):
    return [
        "consensus",
        "--strategy",
        "model",
        "--model",
        w["model_a"],
        "--dataset",
        data or w["data"],
        "--image-root",
        w["root"],
        "--out",
        tmp / "cons.jsonl",
        *extra,
    ]


def report(w, tmp, *extra, data=None):
    return [
        "eval-report",
        "--model",
        w["model_a"],
        "--dataset",
        data or w["data"],
        "--image-root",
        w["root"],
        "--out",
        tmp / "ev",
        *extra,
    ]


def mscxrt(w, tmp, *extra, data=None):
    return [
        "eval-mscxrt",
        "--model",
        w["model_a"],
        "--csv",
        data or w["csv"],
        "--image-root",
        w["root"],
        "--out",
        tmp / "ms",
        *extra,
    ]


def _replace(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


OUTPUT = {
    "consensus-vote": lambda tmp: tmp / "cons.jsonl",
    "consensus-model": lambda tmp: tmp / "cons.jsonl",
    "eval-report": lambda tmp: tmp / "ev" / "predictions.jsonl",
    "eval-mscxrt": lambda tmp: tmp / "ms" / "mscxrt_predictions.jsonl",
}
BASE = {
    "consensus-vote": consensus_vote,
    "consensus-model": consensus_model,
    "eval-report": report,
    "eval-mscxrt": mscxrt,
}

# (command, what changes, how the argv changes, the key the error must name)
CHANGES = [
    ("consensus-vote", "teachers", lambda w, a: a + ["--teachers", "GPT-5-nano,Grok-4"], "teachers"),
    ("consensus-vote", "dataset_content", "data", "dataset"),
    ("consensus-vote", "image_root", "root", "image_root"),
    ("consensus-model", "model", lambda w, a: _replace(a, "--model", w["model_b"]), "model"),
    ("consensus-model", "adapter", lambda w, a: a + ["--adapter", w["adapter_a"]], "adapter"),
    ("consensus-model", "max_length", lambda w, a: a + ["--max-length", "2048"], "max_length"),
    ("consensus-model", "max_new_tokens", lambda w, a: a + ["--max-new-tokens", "64"], "max_new_tokens"),
    ("consensus-model", "dtype", lambda w, a: a + ["--dtype", "bfloat16"], "dtype"),
    ("consensus-model", "strategy", lambda w, a: _replace(a, "--strategy", "vote"), "strategy"),
    ("eval-report", "model", lambda w, a: _replace(a, "--model", w["model_b"]), "model"),
    ("eval-report", "adapter", lambda w, a: a + ["--adapter", w["adapter_b"]], "adapter"),
    ("eval-report", "max_new_tokens", lambda w, a: a + ["--max-new-tokens", "7"], "max_new_tokens"),
    ("eval-report", "prompt", lambda w, a: a + ["--prompt", "Describe the image."], "prompt"),
    ("eval-report", "dtype", lambda w, a: a + ["--dtype", "float16"], "dtype"),
    ("eval-report", "dataset_content", "data", "dataset"),
    ("eval-mscxrt", "model", lambda w, a: _replace(a, "--model", w["model_b"]), "model"),
    ("eval-mscxrt", "adapter", lambda w, a: a + ["--adapter", w["adapter_a"]], "adapter"),
    ("eval-mscxrt", "max_new_tokens", lambda w, a: a + ["--max-new-tokens", "4"], "max_new_tokens"),
    ("eval-mscxrt", "csv_content", "data", "csv"),
]


def _changed_data(w, tmp, command):
    """The same case ids with other content, at the same path as the first run's input."""
    if command == "eval-mscxrt":
        p = tmp / "pairs.csv"
        p.write_bytes(w["csv"].read_bytes())
        return p, lambda: p.write_bytes(w["csv"].read_bytes().replace(b"improving", b"worsening"))
    p = tmp / "data.jsonl"
    p.write_bytes(w["data"].read_bytes())
    return p, lambda: p.write_bytes(w["data"].read_bytes().replace(b"Small left", b"Large left"))


@pytest.mark.parametrize("command,what,change,key", CHANGES, ids=[f"{c[0]}-{c[1]}" for c in CHANGES])
def test_rerun_with_other_inputs_is_refused(world, tmp_path, capsys, monkeypatch, command, what, change, key):
    stand_in = StandIn(monkeypatch)
    monkeypatch.setattr("apo.consensus.model_records", _fake_model_records)
    data = None
    if change == "data":
        data, rewrite = _changed_data(world, tmp_path, command)
    first = BASE[command](world, tmp_path, data=data)
    ok(*run(capsys, first))
    out = OUTPUT[command](tmp_path)
    before = out.read_bytes()
    if change == "data":
        rewrite()
        second = first
    elif change == "root":
        other = tmp_path / "root2"
        other.mkdir()
        for p in world["root"].glob("c*.jpg"):
            (other / p.name).write_bytes(p.read_bytes())
        second = _replace(first, "--image-root", other)
    else:
        second = change(world, first)
    requests = stand_in.requests
    rc, err = run(capsys, second)
    name = command.split("-")[0] if command.startswith("consensus") else command
    pattern = rf"{re.escape(str(out))}: holds \d+ result\(s\) of another run \(.*{key}.* was .*--overwrite"
    one_line(rc, err, name, pattern)
    assert out.read_bytes() == before and stand_in.requests == requests  # nothing reused, nothing redone
    ok(*run(capsys, second + ["--overwrite"]))  # --overwrite starts again
    assert json.loads(identity_path(out).read_text())["command"] == name


def _fake_model_records(model, processor, cases, max_length, max_new_tokens, batch_size, skip_bad=False, pixels=None):
    return [
        {
            "case_id": c.case_id,
            "strategy": "model",
            "text": "Left pleural effusion.",
            "teachers": c.teachers,
            "prompt_tokens": 1,
            "truncated": {},
        }
        for c in cases
    ]


@pytest.mark.parametrize("command", sorted(BASE))
def test_identical_rerun_resumes_without_redoing(world, tmp_path, capsys, monkeypatch, command):
    stand_in = StandIn(monkeypatch)
    monkeypatch.setattr("apo.consensus.model_records", _fake_model_records)
    argv = BASE[command](world, tmp_path)
    ok(*run(capsys, argv))
    out = OUTPUT[command](tmp_path)
    before, requests = out.read_bytes(), stand_in.requests
    ok(*run(capsys, argv))
    assert out.read_bytes() == before and stand_in.requests == requests
    assert identity_path(out).is_file()


@pytest.mark.parametrize("command", sorted(BASE))
def test_results_without_identity_record_are_refused(world, tmp_path, capsys, monkeypatch, command):
    StandIn(monkeypatch)
    monkeypatch.setattr("apo.consensus.model_records", _fake_model_records)
    argv = BASE[command](world, tmp_path)
    ok(*run(capsys, argv))
    out = OUTPUT[command](tmp_path)
    identity_path(out).unlink()  # an output of an older apo, or of an unknown run
    one_line(*run(capsys, argv), argv[0], r"holds \d+ result\(s\) but no record of what produced them.*--overwrite")


@pytest.mark.parametrize("command", ["consensus-vote", "eval-report"])
def test_corrupt_identity_record_is_one_line(world, tmp_path, capsys, monkeypatch, command):
    StandIn(monkeypatch)
    argv = BASE[command](world, tmp_path)
    ok(*run(capsys, argv))
    identity_path(OUTPUT[command](tmp_path)).write_text("{not json")
    one_line(*run(capsys, argv), argv[0], r"identity\.json: unreadable identity record")


def test_sample_settings_change_is_refused(world, tmp_path, capsys, monkeypatch):
    StandIn(monkeypatch)
    argv = report(world, tmp_path, "--num-samples", "2", "--temperature", "0.7")
    ok(*run(capsys, argv))
    one_line(*run(capsys, _replace(argv, "--seed", "5")), "eval-report", r"samples.jsonl: .*seed")
    ok(*run(capsys, _replace(argv, "--seed", "5") + ["--overwrite"]))


def test_identity_differs_but_no_results_yet_starts_fresh(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cons.jsonl"
    identity_path(out).write_text(json.dumps({"command": "something else"}))
    ok(*run(capsys, consensus_vote(world, tmp_path)))
    assert json.loads(identity_path(out).read_text())["strategy"] == "vote"


# ------------------------------------------------------------------ class 4: one writer per output

LOCKED = {
    "consensus-vote": lambda tmp: tmp / "cons.jsonl.lock",
    "consensus-model": lambda tmp: tmp / "cons.jsonl.lock",
    "eval-report": lambda tmp: tmp / "ev" / "predictions.jsonl.lock",
    "eval-mscxrt": lambda tmp: tmp / "ms" / "mscxrt_predictions.jsonl.lock",
}


@pytest.mark.parametrize("command", sorted(LOCKED))
def test_second_writer_stops_at_once(world, tmp_path, capsys, monkeypatch, command):
    stand_in = StandIn(monkeypatch)
    monkeypatch.setattr("apo.consensus.model_records", _fake_model_records)
    argv = BASE[command](world, tmp_path)
    with held_lock(LOCKED[command](tmp_path)) as pid:
        one_line(*run(capsys, argv), argv[0], rf"another run is writing it \(pid {pid} on host testhost")
    assert stand_in.loaded == 0 and not OUTPUT[command](tmp_path).exists()  # stopped before the model loaded
    ok(*run(capsys, argv))  # the holder is gone: the lock is free again


def test_sharded_rank_stops_when_its_shard_is_held(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with held_lock(tmp_path / "cons.jsonl.rank1-of-2.lock") as pid:
        one_line(*run(capsys, consensus_vote(world, tmp_path)), "consensus", rf"pid {pid}")


def test_single_process_run_stops_beside_a_sharded_run(world, tmp_path, capsys):
    with held_lock(tmp_path / "cons.jsonl.lock", shared=True):  # a rank of a torchrun job
        one_line(*run(capsys, consensus_vote(world, tmp_path)), "consensus", r"another run is writing it")


def test_samples_file_is_locked_too(world, tmp_path, capsys, monkeypatch):
    StandIn(monkeypatch)
    with held_lock(tmp_path / "ev" / "samples.jsonl.lock") as pid:
        one_line(*run(capsys, report(world, tmp_path, "--num-samples", "2")), "eval-report", rf"pid {pid}")


# ------------------------------------------------------------------ class 5: outputs that are inputs, or unwritable


def _same_as_input(w, tmp, command):
    data = tmp / "data.jsonl"
    data.write_bytes(w["data"].read_bytes())
    common = ["--dataset", data, "--image-root", w["root"]]
    if command == "prepare-sft":
        return ["prepare-sft", *common, "--out", data], "--out"
    if command == "consensus":
        return ["consensus", "--strategy", "vote", *common, "--out", data], "--out"
    if command == "build-pairs-out-data":
        return ["build-pairs", *common, "--consensus", w["consensus"], "--out", data], "--out"
    if command == "build-pairs-out-consensus":
        cons = tmp / "cons.jsonl"
        cons.write_bytes(w["consensus"].read_bytes())
        return ["build-pairs", *common, "--consensus", cons, "--out", cons], "--out"
    if command == "build-pairs-dpo-out-data":
        return [
            "build-pairs",
            *common,
            "--consensus",
            w["consensus"],
            "--out",
            tmp / "g.jsonl",
            "--dpo-out",
            data,
        ], "--dpo-out"
    if command == "build-pairs-dpo-out-out":
        return [
            "build-pairs",
            *common,
            "--consensus",
            w["consensus"],
            "--out",
            tmp / "g.jsonl",
            "--dpo-out",
            tmp / "g.jsonl",
        ], "--dpo-out"
    if command == "eval-report":
        ev = tmp / "ev"
        ev.mkdir()
        pred = ev / "predictions.jsonl"
        pred.write_bytes(w["data"].read_bytes())
        return [
            "eval-report",
            "--model",
            w["model_a"],
            "--dataset",
            pred,
            "--image-root",
            w["root"],
            "--out",
            ev,
        ], "--out"
    if command == "eval-report-signatures":
        ev = tmp / "ev"
        ev.mkdir()
        (ev / "predictions.jsonl").write_bytes(w["data"].read_bytes())
        return [
            "eval-report",
            "--model",
            w["model_a"],
            *common,
            "--out",
            ev,
            "--signatures-from",
            ev / "predictions.jsonl",
        ], "--out"
    if command == "eval-mscxrt":
        ms = tmp / "ms"
        ms.mkdir()
        csv = ms / "mscxrt_predictions.jsonl"
        csv.write_bytes(w["csv"].read_bytes())
        return ["eval-mscxrt", "--model", w["model_a"], "--csv", csv, "--image-root", w["root"], "--out", ms], "--out"
    if command == "drift":
        d = tmp / "drift"
        d.mkdir()
        (d / "drift.json").write_bytes(w["data"].read_bytes())
        return ["drift", "--dataset", d / "drift.json", "--image-root", w["root"], "--out", d], "--out"
    if command == "drift-consensus":
        d = tmp / "drift"
        d.mkdir()
        (d / "drift.json").write_bytes(w["consensus"].read_bytes())
        return ["drift", *common, "--consensus", d / "drift.json", "--out", d], "--out"
    if command == "train-rejects-file":
        return [
            "train",
            "--config",
            DEMO,
            "--model_name_or_path",
            w["model_a"],
            "--groups_file",
            w["groups"],
            "--output_dir",
            tmp / "apo",
            "--rejects_file",
            w["groups"],
        ], "--rejects_file"
    raise KeyError(command)


SAME = [
    "prepare-sft",
    "consensus",
    "build-pairs-out-data",
    "build-pairs-out-consensus",
    "build-pairs-dpo-out-data",
    "build-pairs-dpo-out-out",
    "eval-report",
    "eval-report-signatures",
    "eval-mscxrt",
    "drift",
    "drift-consensus",
    "train-rejects-file",
]


@pytest.mark.parametrize("case", SAME)
def test_output_that_is_an_input_is_refused(world, tmp_path, capsys, monkeypatch, case):
    stand_in = StandIn(monkeypatch)
    argv, flag = _same_as_input(world, tmp_path, case)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    one_line(*run(capsys, argv), argv[0], rf"{flag} .*: is also (the input|--out)")
    assert stand_in.loaded == 0
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # the input is untouched


def _with_out(w, tmp, command, out):
    common = ["--dataset", w["data"], "--image-root", w["root"]]
    return {
        "prepare-sft": ["prepare-sft", *common, "--out", out],
        "consensus": ["consensus", "--strategy", "vote", *common, "--out", out],
        "build-pairs": ["build-pairs", *common, "--consensus", w["consensus"], "--out", out],
        "build-pairs-dpo": [
            "build-pairs",
            *common,
            "--consensus",
            w["consensus"],
            "--out",
            tmp / "g.jsonl",
            "--dpo-out",
            out,
        ],
        "eval-report": ["eval-report", "--model", w["model_a"], *common, "--out", out],
        "eval-mscxrt": [
            "eval-mscxrt",
            "--model",
            w["model_a"],
            "--csv",
            w["csv"],
            "--image-root",
            w["root"],
            "--out",
            out,
        ],
        "drift": ["drift", *common, "--out", out],
        "train": [
            "train",
            "--config",
            DEMO,
            "--model_name_or_path",
            w["model_a"],
            "--groups_file",
            w["groups"],
            "--output_dir",
            out,
        ],
    }[command]


UNWRITABLE_COMMANDS = [
    "prepare-sft",
    "consensus",
    "build-pairs",
    "build-pairs-dpo",
    "eval-report",
    "eval-mscxrt",
    "drift",
    "train",
]


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
@pytest.mark.parametrize("command", UNWRITABLE_COMMANDS)
def test_unwritable_output_is_found_before_any_work(world, tmp_path, capsys, monkeypatch, command, where):
    stand_in = StandIn(monkeypatch)
    if where == "proc":
        out = Path(UNWRITABLE) / "x"
    else:
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "sub" / "x"
    argv = _with_out(world, tmp_path, command, out)
    name = argv[0]
    one_line(*run(capsys, argv), name, r"(cannot write there|is a file, not a folder)")
    assert stand_in.loaded == 0


def test_train_output_dir_that_is_a_file(world, tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("x")
    argv = [
        "train",
        "--config",
        DEMO,
        "--model_name_or_path",
        world["model_a"],
        "--groups_file",
        world["groups"],
        "--output_dir",
        f,
    ]
    one_line(*run(capsys, argv), "train", r"--output_dir .*: is a file, not a folder")


# stale rejects: a --skip-bad run lists a bad record; the input is fixed; a clean rerun leaves no stale list


def _bad_line():
    return b'{"case_id": "bad", "image": "c0.jpg", "question": "q?", "model": "m", "response": 3}\n'


STALE = ["prepare-sft", "consensus", "build-pairs", "build-pairs-consensus", "drift", "eval-report", "eval-mscxrt"]


@pytest.mark.parametrize("command", STALE)
def test_clean_rerun_removes_stale_rejects(world, tmp_path, capsys, monkeypatch, command):
    StandIn(monkeypatch)
    data, cons, csv = tmp_path / "data.jsonl", tmp_path / "cons.jsonl", tmp_path / "pairs.csv"
    cons.write_bytes(world["consensus"].read_bytes())
    data.write_bytes(world["data"].read_bytes())
    csv.write_bytes(world["csv"].read_bytes())
    if command == "build-pairs-consensus":
        cons.write_bytes(world["consensus"].read_bytes() + b"{broken\n")
    elif command == "eval-mscxrt":
        csv.write_bytes(world["csv"].read_bytes() + b"cur0,prev0\n")
    else:
        data.write_bytes(world["data"].read_bytes() + _bad_line())
    common = ["--dataset", data, "--image-root", world["root"], "--skip-bad"]
    argv, rejects = {
        "prepare-sft": (
            ["prepare-sft", *common, "--out", tmp_path / "sft.jsonl"],
            tmp_path / "sft.jsonl.rejects.jsonl",
        ),
        "consensus": (
            ["consensus", "--strategy", "vote", *common, "--out", tmp_path / "c2.jsonl"],
            tmp_path / "c2.jsonl.rejects.jsonl",
        ),
        "build-pairs": (
            ["build-pairs", *common, "--consensus", cons, "--out", tmp_path / "g.jsonl"],
            tmp_path / "g.jsonl.rejects.jsonl",
        ),
        "build-pairs-consensus": (
            ["build-pairs", *common, "--consensus", cons, "--out", tmp_path / "g.jsonl"],
            tmp_path / "g.jsonl.consensus_rejects.jsonl",
        ),
        "drift": (["drift", *common, "--out", tmp_path / "d"], tmp_path / "d" / "rejects.jsonl"),
        "eval-report": (
            ["eval-report", "--model", world["model_a"], *common, "--out", tmp_path / "ev"],
            tmp_path / "ev" / "rejects.jsonl",
        ),
        "eval-mscxrt": (
            [
                "eval-mscxrt",
                "--model",
                world["model_a"],
                "--csv",
                csv,
                "--image-root",
                world["root"],
                "--skip-bad",
                "--out",
                tmp_path / "ms",
            ],
            tmp_path / "ms" / "mscxrt_rejects.jsonl",
        ),
    }[command]
    ok(*run(capsys, argv))
    assert rejects.is_file()
    data.write_bytes(world["data"].read_bytes())
    cons.write_bytes(world["consensus"].read_bytes())
    csv.write_bytes(world["csv"].read_bytes())
    ok(*run(capsys, argv + (["--overwrite"] if command in ("consensus", "eval-report", "eval-mscxrt") else [])))
    assert not rejects.exists()


def test_clean_groups_reread_removes_stale_rejects(world, tmp_path):
    from apo.trainer.collator import load_groups

    groups = tmp_path / "groups.jsonl"
    good = world["groups"].read_bytes().replace(str(world["root"]).encode(), str(world["root"]).encode())
    groups.write_bytes(good + b"{broken\n")
    load_groups(groups, skip_bad=True)
    assert (tmp_path / "groups.jsonl.rejects.jsonl").is_file()
    groups.write_bytes(good)
    load_groups(groups, skip_bad=True)
    assert not (tmp_path / "groups.jsonl.rejects.jsonl").exists()
