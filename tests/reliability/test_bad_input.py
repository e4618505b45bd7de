"""Every command that reads data, fed each class of malformed input (issue 6, item 2).

Without --skip-bad: exit 2 and ONE line `apo CMD: error: FILE:LINE: reason` on stderr, no traceback, nothing written.
With --skip-bad: exit 0, the rejected record listed with its reason, every good record kept. Run in process through
`apo.cli.main`, so any other exception fails the test (it would have been a traceback for the user).
Commands: prepare-sft, consensus, build-pairs (data and --consensus), train (groups.jsonl), eval-report,
eval-mscxrt (CSV), drift (data and --consensus).
"""

import json
import re
from pathlib import Path

import pytest

from apo.cli import main
from apo.consensus import read_consensus
from apo.errors import DataError
from apo.evaluation.mscxrt import read_pairs

from .world import CASES, MSCXRT_HEADER, TEXTS, build, csv_text, data_rows

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
DEMO = str(Path(__file__).parents[2] / "configs" / "apo" / "demo.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("world"))


def run(capsys, argv):
    """-> (exit code, stderr). An exception other than ApoError escaping main() is a traceback for the user."""
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


def assert_one_line(err, command, path, line):
    errors = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"apo {command}: error: {path}:{line}: "), errors[0]
    return errors[0]


# ----------------------------------------------------------------------------------------------- the data file


def _row(**kw):
    return {
        "case_id": "bad",
        "image": "c0.jpg",
        "question": "What supports it?",
        "model": "GPT-5-nano",
        "response": "Left pleural effusion.",
        **kw,
    }


def _drop(key):
    return {k: v for k, v in _row().items() if k != key}


DATA_BAD = {
    "broken_json": b'{"case_id": "bad", "image": "c0.jpg", "question": "Wh',
    "non_utf8": b'{"case_id": "bad\xff\xfe", "image": "c0.jpg", "question": "q", "model": "m", "response": "r"}',
    "not_object": b'["bad", "c0.jpg"]',
    "missing_question": json.dumps(_drop("question")).encode(),
    "missing_image": json.dumps(_drop("image")).encode(),
    "response_wrong_type": json.dumps(_row(response=3)).encode(),
    "labels_wrong_type": json.dumps(_row(labels={"Pleural Effusion": "yes"})).encode(),
    "case_id_wrong_type": json.dumps(_row(case_id={"id": 1})).encode(),
    "empty_trajectory": json.dumps(_row(response="  \n\t")).encode(),
    "empty_teacher_name": json.dumps(_row(model=" ")).encode(),
    "teacher_name_wrong_type": json.dumps(_row(model=["GPT"])).encode(),
    "duplicate_case_id": json.dumps(
        {"case_id": "c0", "image": "c0.jpg", "question": "q", "trajectories": {"Grok-4": "x"}}
    ).encode(),
    "duplicate_teacher_answer": json.dumps(next(data_rows()) | {"response": "another answer"}).encode(),
    "huge_text": json.dumps(_row(response="effusion " * 12_000)).encode(),
    "image_not_found": json.dumps(_row(image="nope.jpg")).encode(),
    "image_corrupt": json.dumps(_row(image="corrupt.jpg")).encode(),
    "image_truncated": json.dumps(_row(image="truncated.jpg")).encode(),
    "image_zero_bytes": json.dumps(_row(image="empty.jpg")).encode(),
    "image_not_an_image": json.dumps(_row(image="text.jpg")).encode(),
    "image_enormous": json.dumps(_row(image="enormous.png")).encode(),
    "image_escapes_root": json.dumps(_row(image="../c0.jpg")).encode(),
    "image_absolute_outside": json.dumps(_row(image="/etc/hostname")).encode(),
    "image_name_too_long": json.dumps(_row(image="x" * 300 + ".dcm")).encode(),
}
N_GOOD_LINES = len(CASES) * len(TEXTS)
BAD_LINE = N_GOOD_LINES + 1


def _data_file(world, tmp_path, kind):
    p = tmp_path / "data.jsonl"
    p.write_bytes(world["data"].read_bytes() + DATA_BAD[kind] + b"\n")
    return p


def _data_commands(world, tmp_path, data):
    common = ["--dataset", data, "--image-root", world["root"]]
    return {
        "prepare-sft": ["prepare-sft", *common, "--out", tmp_path / "sft.jsonl"],
        "consensus": ["consensus", "--strategy", "vote", *common, "--out", tmp_path / "cons.jsonl"],
        "build-pairs": ["build-pairs", *common, "--consensus", world["consensus"], "--out", tmp_path / "groups.jsonl"],
        "drift": ["drift", *common, "--out", tmp_path / "drift"],
        "eval-report": ["eval-report", *common, "--model", tmp_path / "never-loaded", "--out", tmp_path / "ev"],
    }


def _kept(command, tmp_path):
    """Case ids in a command's output."""
    if command == "prepare-sft":
        rows = [json.loads(ln) for ln in (tmp_path / "sft.jsonl").read_text().splitlines()]
        assert len(rows) == N_GOOD_LINES
        return sorted({r["case_id"] for r in rows})
    if command == "consensus":
        return sorted(json.loads(ln)["case_id"] for ln in (tmp_path / "cons.jsonl").read_text().splitlines())
    if command == "build-pairs":
        return sorted(json.loads(ln)["case_id"] for ln in (tmp_path / "groups.jsonl").read_text().splitlines())
    stats = json.loads((tmp_path / "drift" / "drift.json").read_text())
    return CASES if stats["n_cases"] == len(CASES) else stats["n_cases"]


TEXT_ONLY_OK = {"image_corrupt", "image_truncated", "image_zero_bytes", "image_not_an_image", "image_enormous"}


@pytest.mark.parametrize("kind", sorted(DATA_BAD))
def test_bad_data_record(world, tmp_path, capsys, kind):
    data = _data_file(world, tmp_path, kind)
    commands = _data_commands(world, tmp_path, data)
    if kind in TEXT_ONLY_OK:  # drift reads text: it checks that images exist, not that they decode (documented)
        assert run(capsys, commands.pop("drift"))[0] == 0
    for command, argv in commands.items():
        rc, err = run(capsys, argv)
        assert rc == 2, (command, err)
        assert_one_line(err, command, data, BAD_LINE)
        assert not any(p.exists() for p in (tmp_path / "sft.jsonl", tmp_path / "groups.jsonl")), command
    for command, argv in commands.items():
        if command == "eval-report":  # generates: once for all kinds, in test_skip_bad_through_the_models
            continue
        rc, err = run(capsys, [*argv, "--skip-bad", "--rejects", tmp_path / f"{command}.rejects.jsonl"])
        assert rc == 0, (command, err)
        assert _kept(command, tmp_path) == CASES, command  # every good record kept (a duplicate: the first kept)
        rejects = [json.loads(ln) for ln in (tmp_path / f"{command}.rejects.jsonl").read_text().splitlines()]
        assert [r["record"] for r in rejects] == [BAD_LINE] and rejects[0]["reason"], (command, rejects)


def test_unknown_teacher_is_one_line(world, tmp_path, capsys):
    for command, argv in _data_commands(world, tmp_path, world["data"]).items():
        rc, err = run(capsys, [*argv, "--teachers", "GPT-5-nano,Nobody-7B"])
        assert rc == 2
        (line,) = [ln for ln in err.splitlines() if ": error:" in ln]
        assert line.startswith(f"apo {command}: error:") and "unknown teacher(s) ['Nobody-7B']" in line, line


# ----------------------------------------------------------------------------------------------- --consensus


def _cons(**kw):
    return json.dumps({"case_id": "c9", "strategy": "vote", "text": "Left pleural effusion.", **kw}).encode()


CONSENSUS_BAD = {
    "broken_json": b'{"case_id": "c9", "text": "Left',
    "non_utf8": b'{"case_id": "c9", "text": "Left \xff\xfe effusion"}',
    "not_object": b'"c9"',
    "missing_case_id": json.dumps({"text": "x"}).encode(),
    "missing_text": json.dumps({"case_id": "c9"}).encode(),
    "text_wrong_type": _cons(text=5),
    "text_null": _cons(text=None),
    "case_id_wrong_type": _cons(case_id=["c9"]),
    "source_teacher_wrong_type": _cons(source_teacher={"x": 1}),
    "duplicate_case_id": _cons(case_id="c0"),
    "huge_text": _cons(text="effusion " * 12_000),
}


@pytest.mark.parametrize("kind", sorted(CONSENSUS_BAD))
def test_bad_consensus_record(world, tmp_path, capsys, kind):
    cons = tmp_path / "consensus.jsonl"
    good = world["consensus"].read_bytes()
    line = len(good.splitlines()) + 1
    cons.write_bytes(good + CONSENSUS_BAD[kind] + b"\n")
    common = ["--dataset", world["data"], "--image-root", world["root"], "--consensus", cons]
    commands = {
        "build-pairs": ["build-pairs", *common, "--out", tmp_path / "groups.jsonl"],
        "drift": ["drift", *common, "--out", tmp_path / "drift"],
    }
    for command, argv in commands.items():
        rc, err = run(capsys, argv)
        assert rc == 2 and not (tmp_path / ("groups.jsonl" if command == "build-pairs" else "drift")).exists()
        assert_one_line(err, command, cons, line)
        rc, err = run(capsys, [*argv, "--skip-bad"])
        assert rc == 0, err
        rejects = tmp_path / (
            "groups.jsonl.consensus_rejects.jsonl" if command == "build-pairs" else "drift/consensus_rejects.jsonl"
        )
        assert [json.loads(ln)["record"] for ln in rejects.read_text().splitlines()] == [line]
    assert _kept("build-pairs", tmp_path) == CASES
    assert json.loads((tmp_path / "drift" / "drift.json").read_text())["n_consensus"] == len(CASES)


def test_torn_last_consensus_line_is_a_run_in_progress(world, tmp_path, capsys):
    cons = tmp_path / "consensus.jsonl"
    cons.write_bytes(world["consensus"].read_bytes() + b'{"case_id": "c9", "te')  # no newline: still being written
    rc, _ = run(
        capsys,
        [
            "build-pairs",
            "--dataset",
            world["data"],
            "--image-root",
            world["root"],
            "--consensus",
            cons,
            "--out",
            tmp_path / "groups.jsonl",
        ],
    )
    assert rc == 0 and _kept("build-pairs", tmp_path) == CASES
    assert "torn last line" in run.out  # told, not silent


# ----------------------------------------------------------------------------------------------- groups.jsonl


def _group(world, **kw):
    g = json.loads(world["groups"].read_text().splitlines()[0])
    return json.dumps({**g, "case_id": "g9", **kw}).encode()


GROUPS_BAD = {
    "broken_json": lambda w: b'{"case_id": "g9", "prompt": ',
    "non_utf8": lambda w: _group(w).replace(b'"g9"', b'"g9\xff"'),
    "not_object": lambda w: b"7",
    "missing_field": lambda w: json.dumps({k: v for k, v in json.loads(_group(w)).items() if k != "positive"}).encode(),
    "images_wrong_type": lambda w: _group(w, images=str(w["root"] / "c0.jpg")),
    "negatives_wrong_type": lambda w: _group(w, negatives="x", teachers=["a"]),
    "positive_wrong_type": lambda w: _group(w, positive=5),
    "prompt_wrong_type": lambda w: _group(w, prompt=None),
    "case_id_wrong_type": lambda w: _group(w, case_id={"a": 1}),
    "teachers_mismatch": lambda w: _group(w, teachers=["only-one", "two", "three"]),
    "teacher_wrong_type": lambda w: _group(w, negatives=["x"], teachers=[None]),
    "empty_positive": lambda w: _group(w, positive="   "),
    "empty_negative": lambda w: _group(w, negatives=["\n"], teachers=["Grok-4"]),
    "no_negatives": lambda w: _group(w, negatives=[], teachers=[]),
    "duplicate_case_id": lambda w: _group(w, case_id="c0"),
    "huge_text": lambda w: _group(w, positive="effusion " * 12_000),
    **{
        f"image_{k}": (lambda name: lambda w: _group(w, images=[str(w["root"] / name)]))(name)
        for k, name in [
            ("not_found", "nope.jpg"),
            ("corrupt", "corrupt.jpg"),
            ("truncated", "truncated.jpg"),
            ("zero_bytes", "empty.jpg"),
            ("not_an_image", "text.jpg"),
            ("enormous", "enormous.png"),
        ]
    },
    "image_relative_escapes": lambda w: _group(w, images=["../c0.jpg"]),
}


@pytest.mark.parametrize("kind", sorted(GROUPS_BAD))
def test_bad_group_record(world, tmp_path, capsys, kind):
    groups = tmp_path / "groups.jsonl"
    good = world["groups"].read_bytes()
    groups.write_bytes(good + GROUPS_BAD[kind](world) + b"\n")
    rc, err = run(
        capsys,
        [
            "train",
            "--config",
            DEMO,
            "--model_name_or_path",
            tmp_path,
            "--groups_file",
            groups,
            "--output_dir",
            tmp_path / "apo",
        ],
    )
    assert rc == 2
    assert_one_line(err, "train", groups, len(good.splitlines()) + 1)
    assert not (tmp_path / "apo").exists()  # stopped before the model loaded


# ----------------------------------------------------------------------------------------------- MS-CXR-T CSV


def _csv_row(dicom="bad-x", prev="okprev", study="59999999", prev_study="59999998", subject="19999999", label="stable"):
    return [dicom, prev, study, prev_study, subject, label, "", "", "", ""]


CSV_BAD = {  # kind -> the bad row (a list of fields, or raw bytes)
    "non_utf8": b"cur0,prev0,50000000,51000000,10000000,stable\xff\xfe,,,,",
    "more_fields_than_header": _csv_row(dicom="cur0") + ["extra"],
    "missing_dicom_id": _csv_row(dicom=""),
    "missing_subject_id": _csv_row(subject=""),
    "unknown_class": _csv_row(dicom="cur0", label="better"),
    "no_label": _csv_row(dicom="cur0", label=""),
    "path_traversal_id": _csv_row(dicom="../../../../etc/passwd"),
    "path_traversal_subject": _csv_row(subject="../../.."),
    "glob_in_previous_id": _csv_row(dicom="cur0", prev="*", prev_study=""),
    "huge_field": _csv_row(dicom="x" * 200_000),
    "duplicate_pair": ["cur0", "prev0", "50000000", "51000000", "10000000", "improving", "", "", "", ""],
    "image_not_found": _csv_row(dicom="bad-nope"),
    **{
        f"image_{k}": _csv_row(dicom=f"bad-{k2}")
        for k, k2 in [
            ("corrupt", "corrupt"),
            ("truncated", "truncated"),
            ("zero_bytes", "empty"),
            ("not_an_image", "text"),
            ("enormous", "enormous"),
        ]
    },
}


def _csv_file(world, tmp_path, kind):
    p = tmp_path / "mscxrt.csv"
    bad = CSV_BAD[kind]
    p.write_bytes(
        csv_text(world["csv_rows"]).encode() + (bad if isinstance(bad, bytes) else ",".join(bad).encode()) + b"\n"
    )
    return p, len(world["csv_rows"]) + 2  # line 1 is the header


@pytest.mark.parametrize("kind", sorted(CSV_BAD))
def test_bad_mscxrt_row(world, tmp_path, capsys, kind):
    csv_path, line = _csv_file(world, tmp_path, kind)
    rc, err = run(
        capsys,
        [
            "eval-mscxrt",
            "--csv",
            csv_path,
            "--image-root",
            world["root"],
            "--model",
            tmp_path / "never-loaded",
            "--out",
            tmp_path / "ev",
        ],
    )
    assert rc == 2
    assert_one_line(err, "eval-mscxrt", csv_path, line)
    items, rejects = read_pairs(csv_path, world["root"], skip_bad=True)  # --skip-bad: the CLI run is below
    assert [r["record"] for r in rejects] == [line] and len(items) == len(world["csv_rows"])


@pytest.mark.parametrize("header", [["dicom_id", "subject_id"], [], ["a\x00b"]])
def test_mscxrt_csv_without_the_columns(world, tmp_path, capsys, header):
    p = tmp_path / "x.csv"
    p.write_text(",".join(header) + "\n1,2\n")
    rc, err = run(
        capsys,
        ["eval-mscxrt", "--csv", p, "--image-root", world["root"], "--model", tmp_path / "m", "--out", tmp_path / "ev"],
    )
    assert rc == 2 and assert_one_line(err, "eval-mscxrt", p, 1)


# ----------------------------------------------------------------------------------------------- through the models


def test_skip_bad_through_the_models(world, tmp_path, capsys, tiny_model_dir, monkeypatch):
    """eval-report and eval-mscxrt with every bad class at once and --skip-bad: each rejected record listed, every
    good case answered and scored."""
    import apo.evaluation.metrics

    monkeypatch.setattr(
        apo.evaluation.metrics, "nlg_scores", lambda refs, hyps: {"BLEU-1": 0.0}
    )  # METEOR's JVM: not the point
    data = tmp_path / "data.jsonl"
    data.write_bytes(world["data"].read_bytes() + b"\n".join(DATA_BAD[k] for k in sorted(DATA_BAD)) + b"\n")
    rc, err = run(
        capsys,
        [
            "eval-report",
            "--dataset",
            data,
            "--image-root",
            world["root"],
            "--model",
            tiny_model_dir,
            "--max-new-tokens",
            2,
            "--out",
            tmp_path / "ev",
            "--skip-bad",
        ],
    )
    assert rc == 0, err
    preds = [json.loads(ln)["case_id"] for ln in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert preds == CASES
    rejects = [json.loads(ln) for ln in (tmp_path / "ev" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["record"] for r in rejects) == list(range(BAD_LINE, BAD_LINE + len(DATA_BAD)))

    rows = [r for k in sorted(CSV_BAD) if not isinstance(r := CSV_BAD[k], bytes)]
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(csv_text(world["csv_rows"] + rows))
    rc, err = run(
        capsys,
        [
            "eval-mscxrt",
            "--csv",
            csv_path,
            "--image-root",
            world["root"],
            "--model",
            tiny_model_dir,
            "--max-new-tokens",
            2,
            "--out",
            tmp_path / "ms",
            "--skip-bad",
        ],
    )
    assert rc == 0, err
    assert sum(json.loads((tmp_path / "ms" / "mscxrt.json").read_text())["n"].values()) == len(world["csv_rows"])
    assert len((tmp_path / "ms" / "mscxrt_rejects.jsonl").read_text().splitlines()) == len(rows)


# ----------------------------------------------------------------------------------------------- random fuzz


def _mutate(rng, line: bytes) -> bytes:
    """One random corruption of a good JSONL line: cut, byte noise, a field deleted / retyped / emptied / bloated."""
    pick = rng.randrange(6)
    if pick == 0:
        return line[: rng.randrange(1, len(line) - 1)]
    if pick == 1:
        b = bytearray(line)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.choice([0xFF, 0x80, 0x00, ord('"'), ord("{"), ord("\\")])
        return bytes(b)
    rec = json.loads(line)
    key = rng.choice(sorted(rec))
    if pick == 2:
        rec.pop(key)
    elif pick == 3:
        rec[key] = rng.choice([None, 7, 2.5, True, [], {}, ["x", 1], {"k": None}])
    elif pick == 4:
        rec[key] = rng.choice(["", " ", "\t\n"])
    else:
        rec[key] = "x" * 100_001 if isinstance(rec[key], str) else [rec[key]] * 3
    return json.dumps(rec).encode()


def test_fuzz_consensus_and_groups(world, tmp_path):
    """300 randomly corrupted consensus lines (skip-bad: each a DataError or a reject, never anything else; every
    intact good line kept) and 150 corrupted groups files (each a DataError naming line 2, or accepted)."""
    import random

    from apo.trainer.collator import load_groups

    rng = random.Random(0)
    good = world["consensus"].read_bytes().splitlines()
    path = tmp_path / "c.jsonl"
    for _ in range(30):
        lines = [_mutate(rng, ln) if i % 2 else ln for i, ln in enumerate(good * 5)][:20]
        lines = [
            json.dumps({**json.loads(ln), "case_id": f"k{i}"}).encode() if i % 2 == 0 else ln
            for i, ln in enumerate(lines)
        ]
        path.write_bytes(b"\n".join(lines) + b"\n")
        records, rejects = read_consensus(path, skip_bad=True)
        assert {f"k{i}" for i in range(0, 20, 2)} <= set(records)
        assert len(records) + len(rejects) == 20
        assert all(isinstance(r["text"], str) for r in records.values())
        if rejects:
            with pytest.raises(DataError, match=re.escape(str(path)) + r":\d+: "):
                read_consensus(path)
    g0 = world["groups"].read_bytes().splitlines()[0]
    for _ in range(150):
        bad = _mutate(rng, g0)
        path = tmp_path / "g.jsonl"
        path.write_bytes(world["groups"].read_bytes().splitlines()[1] + b"\n" + bad + b"\n")
        try:
            groups = load_groups(path)
        except DataError as e:
            assert e.record == 2 and e.reason
            continue
        for g in groups:  # accepted: then it is a group the collator can take
            assert all(isinstance(t, str) and t.strip() for t in [g["prompt"], g["positive"], *g["negatives"]])


def test_fuzz_mscxrt_rows(world, tmp_path):
    """300 randomly corrupted MS-CXR-T rows through read_pairs(skip_bad): every one a reject or a clean item."""
    import random

    rng = random.Random(1)
    good = [",".join(r) for r in world["csv_rows"]]
    bad = []
    for _ in range(300):
        fields = _csv_row(
            dicom=rng.choice(["cur0", "bad-corrupt", "x/../y", "*", "", "cur1"]),
            label=rng.choice(["stable", "Worse", "", "improving"]),
        )
        i = rng.randrange(len(fields))
        fields[i] = rng.choice(["", "..", '"', "a,b", "\x00", "é", "1" * 300, "p1/../../"])
        bad.append(",".join(fields))
    path = tmp_path / "m.csv"
    path.write_text("\n".join([",".join(MSCXRT_HEADER), *good, *bad]) + "\n", encoding="utf-8")
    items, rejects = read_pairs(path, world["root"], skip_bad=True)
    assert {it["case_id"] for it in items} == {
        f"prev{i}->cur{i}/{f}" for i, f in enumerate(["consolidation", "edema", "pleural_effusion"])
    }
    root = str(world["root"].resolve())
    assert all(p.startswith(root) for it in items for p in it["images"])  # nothing outside --image-root
    assert len(items) == 3 and rejects and all(r["reason"] for r in rejects)  # no bad row got through
