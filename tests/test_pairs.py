"""build-pairs: what is dropped and why, the conflicting filter, and DPO rows that ms-swift itself loads."""

import json

import pytest

from apo.cli import main
from apo.data import Case, Trajectory
from apo.pairs import build_groups, dpo_rows

POS = "Small left pleural effusion. No pneumothorax."


def mk(cid, texts, images=("/data/a.png",)):
    return Case(cid, list(images), "What findings support the diagnosis?", [Trajectory(t, x) for t, x in texts])


def test_drops_are_counted_with_reasons():
    cases = [
        mk(
            "ok",
            [
                ("A", "Right pleural effusion."),
                ("B", "  " + POS.replace(" ", "   ") + "\n"),  # == positive
                ("C", ""),
                ("D", "Right   pleural effusion. "),
                ("E", "Cardiomegaly."),
            ],
        ),
        mk("no_cons", [("A", "x")]),
        mk("empty_pos", [("A", "x")]),
        mk("vote", [("A", POS), ("B", "Edema."), ("C", "Edema.")]),
        mk("none_left", [("A", POS)]),
    ]
    cons = {
        "ok": {"text": POS},
        "empty_pos": {"text": "  "},
        "vote": {"text": POS, "source_teacher": "A"},
        "none_left": {"text": POS},
    }
    groups, dropped = build_groups(cases, cons)
    assert [g["case_id"] for g in groups] == ["ok", "vote"]
    ok = groups[0]
    assert ok["negatives"] == ["Right pleural effusion.", "Cardiomegaly."] and ok["teachers"] == ["A", "E"]
    assert ok["positive"] == POS and ok["images"] == ["/data/a.png"] and ok["prompt"].startswith("What")
    assert groups[1]["teachers"] == ["B"]  # the vote's own source is not its negative; C duplicates B
    reasons = {(d["case_id"], d.get("teacher"), d["reason"]) for d in dropped}
    assert reasons == {
        ("ok", "B", "equals_positive"),
        ("ok", "C", "empty"),
        ("ok", "D", "duplicate"),
        ("no_cons", None, "no_consensus"),
        ("empty_pos", None, "empty_positive"),
        ("vote", "A", "source_teacher"),
        ("vote", "C", "duplicate"),
        ("none_left", "A", "equals_positive"),
        ("none_left", None, "no_negatives"),
    }
    groups, dropped = build_groups(cases[:1], cons, max_negatives=1)
    assert groups[0]["teachers"] == ["A"] and ("E", "over_max_negatives") in {
        (d.get("teacher"), d["reason"]) for d in dropped
    }
    with pytest.raises(ValueError):
        build_groups(cases, cons, negatives="some")


def test_conflicting_keeps_only_negatives_whose_labels_disagree():
    case = mk(
        "c",
        [
            ("same", "There is a small left pleural effusion. There is no pneumothorax."),  # same labels
            ("side", "Small right pleural effusion. No pneumothorax."),  # labels agree (side is not a label)
            ("extra", "Left pleural effusion and cardiomegaly. No pneumothorax."),
            ("miss", "No pleural effusion. No pneumothorax."),
        ],
    )
    groups, dropped = build_groups([case], {"c": {"text": POS}}, negatives="conflicting")
    assert groups[0]["teachers"] == ["extra", "miss"]
    assert sorted(d["teacher"] for d in dropped if d["reason"] == "not_conflicting") == ["same", "side"]
    groups, _ = build_groups([case], {"c": {"text": POS}}, negatives="all")
    assert len(groups[0]["negatives"]) == 4


def test_dpo_rows_shape():
    g, _ = build_groups([mk("c", [("A", "x."), ("B", "y.")], images=("/a.png", "/b.png"))], {"c": {"text": POS}})
    rows = dpo_rows(g)
    assert len(rows) == 2 and rows[1]["rejected_response"] == "y."
    assert rows[0]["messages"] == [
        {"role": "user", "content": "<image><image>What findings support the diagnosis?"},
        {"role": "assistant", "content": POS},
    ]
    assert rows[0]["images"] == ["/a.png", "/b.png"]


def write_data(root):
    from PIL import Image

    rows = []
    for i in range(3):
        Image.new("L", (64, 64), 40 * i).save(root / f"{i}.png")
        for t, x in [("A", POS), ("B", f"Right pleural effusion {i}."), ("C", "Cardiomegaly.")]:
            rows.append({"case_id": f"c{i}", "image": f"{i}.png", "question": "Findings?", "model": t, "response": x})
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "d.jsonl"


def test_cli_writes_groups_dropped_stats_and_dpo_rows(tmp_path, capsys):
    data = write_data(tmp_path)
    cons = tmp_path / "cons.jsonl"
    cons.write_text(
        json.dumps({"case_id": "c0", "text": POS, "source_teacher": "A"})
        + "\n"
        + json.dumps({"case_id": "c1", "text": "Edema."})
        + "\n"
        + json.dumps({"case_id": "zz", "text": "x"})
        + "\n"
        + '{"case_id": "c2", "te'
    )  # torn: ignored
    out = tmp_path / "groups.jsonl"
    rc = main(
        [
            "build-pairs",
            "--dataset",
            str(data),
            "--consensus",
            str(cons),
            "--out",
            str(out),
            "--dpo-out",
            str(tmp_path / "dpo.jsonl"),
        ]
    )
    assert rc == 0
    groups = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(g["case_id"], len(g["negatives"])) for g in groups] == [("c0", 2), ("c1", 3)]
    assert all(p.startswith(str(tmp_path)) for g in groups for p in g["images"])
    dropped = [json.loads(l) for l in (tmp_path / "groups.jsonl.dropped.jsonl").read_text().splitlines()]
    assert {"case_id": "c2", "what": "case", "reason": "no_consensus"} in dropped
    stats = json.loads((tmp_path / "groups.jsonl.stats.json").read_text())
    assert stats["groups"] == 2 and stats["mean_negatives"] == 2.5 and stats["consensus_not_in_dataset"] == 1
    assert len((tmp_path / "dpo.jsonl").read_text().splitlines()) == 5
    assert "2 groups from 3 cases" in capsys.readouterr().out
    # nothing usable at all: an error, with the reasons on disk
    cons.write_text("")
    assert main(["build-pairs", "--dataset", str(data), "--consensus", str(cons), "--out", str(out)]) == 2


def test_dpo_rows_load_and_encode_with_ms_swift(tmp_path, tiny_model_dir):
    """ms-swift 4.6's own loader (strict: a malformed row raises) and its qwen2_5_vl template in RLHF mode."""
    from swift.dataset import load_dataset
    from swift.model import get_processor
    from swift.template import get_template

    data = write_data(tmp_path)
    cons = tmp_path / "cons.jsonl"
    cons.write_text("".join(json.dumps({"case_id": f"c{i}", "text": POS + f" ({i})"}) + "\n" for i in range(3)))
    assert (
        main(
            [
                "build-pairs",
                "--dataset",
                str(data),
                "--consensus",
                str(cons),
                "--out",
                str(tmp_path / "g.jsonl"),
                "--dpo-out",
                str(tmp_path / "dpo.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(l) for l in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    train, _ = load_dataset([str(tmp_path / "dpo.jsonl")], strict=True, use_hf=True, load_from_cache_file=False)
    assert len(train) == len(rows) == 9
    template = get_template(
        get_processor(str(tiny_model_dir), model_type="qwen2_5_vl", use_hf=True), template_type="qwen2_5_vl"
    )
    template.set_mode("rlhf")
    tok = template.tokenizer
    for row, loaded in zip(rows, train):
        enc = template.encode(loaded)
        for side, text in (("chosen", row["messages"][1]["content"]), ("rejected", row["rejected_response"])):
            answer = [t for t, l in zip(enc[f"{side}_input_ids"], enc[f"{side}_labels"]) if l != -100]
            assert tok.decode(answer).strip().startswith(text)  # trained on exactly this answer
        assert enc["chosen_image_grid_thw"].shape[0] == len(row["images"]) == 1


def test_vote_then_pairs_on_the_synthetic_benchmark(synth_dir, tmp_path):
    """The demo path: medoid vote over the 7 drifting teachers, then groups; every case accounted for."""
    from apo.data import load_cases

    data = synth_dir / "cxrmax_train.jsonl"
    cons, out = tmp_path / "cons.jsonl", tmp_path / "groups.jsonl"
    assert main(["consensus", "--strategy", "vote", "--dataset", str(data), "--out", str(cons)]) == 0
    assert (
        main(
            [
                "build-pairs",
                "--dataset",
                str(data),
                "--consensus",
                str(cons),
                "--out",
                str(out),
                "--negatives",
                "conflicting",
            ]
        )
        == 0
    )
    cases = load_cases(data)
    source = {json.loads(l)["case_id"]: json.loads(l)["source_teacher"] for l in cons.read_text().splitlines()}
    groups = [json.loads(l) for l in out.read_text().splitlines()]
    dropped = [json.loads(l) for l in (tmp_path / "groups.jsonl.dropped.jsonl").read_text().splitlines()]
    assert len(groups) + sum(d["what"] == "case" for d in dropped) == len(cases)
    for g in groups:
        assert source[g["case_id"]] not in g["teachers"] and g["positive"] not in g["negatives"]
        assert len(g["negatives"]) == len(g["teachers"]) >= 1
    grouped = {g["case_id"] for g in groups}
    n_traj = sum(len(c.trajectories) for c in cases if c.case_id in grouped)  # each one kept or dropped with a reason
    assert (
        sum(len(g["negatives"]) for g in groups)
        + sum(d["what"] == "negative" and d["case_id"] in grouped for d in dropped)
        == n_traj
    )
