"""Consensus: the medoid vote, the in-context model strategy with its truncation budget, resume after a crash."""

import json

import numpy as np
import pytest
from PIL import Image

from apo import consensus as C
from apo.cli import main
from apo.data import Case, Trajectory

TEXTS = {  # a hand-made case: two teachers agree, one drifts (side, extra findings), one refuses, one adds edema
    "GPT-5-nano": "Small left pleural effusion. No pneumothorax. Heart size is normal.",
    "Claude-Sonnet-4": "There is a left pleural effusion. No pneumothorax. The heart is normal in size.",
    "Grok-4": "Right pleural effusion with cardiomegaly and a right pneumothorax.",
    "Moonshot-v1": "I cannot provide a diagnosis. Please consult a radiologist.",
    "GLM-4.5V": "Left pleural effusion and pulmonary edema. No pneumothorax.",
}


def write_dataset(root, n_cases=6, long_teacher="Claude-Sonnet-4", repeat=6):
    """Long rows (one per teacher answer) with small images; `long_teacher` talks `repeat` times longer."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_cases):
        img = root / "img" / f"{i}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((112, 112)) * 255).astype("uint8")).save(img)
        for t, x in TEXTS.items():
            text = " ".join([x] * repeat) if t == long_teacher else x
            rows.append(
                {
                    "case_id": f"c{i}",
                    "image": f"img/{i}.png",
                    "model": t,
                    "response": text + f" ({i})",
                    "question": "What findings support the diagnosis of pleural effusion?",
                    "report": "Small left pleural effusion.",
                    "sides": {"Pleural Effusion": "left"},
                }
            )
    path = root / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def case(texts):
    return Case("x", ["/nonexistent.png"], "q?", [Trajectory(t, x) for t, x in texts.items()])


def test_vote_picks_the_medoid_and_never_a_refusal():
    best, scores = C.vote(list(TEXTS.values()))
    assert best == 0  # GPT-5-nano and Claude agree with each other and most others; ties go to the earlier teacher
    assert scores[0] == scores[1] > scores[2]
    rec = C.vote_record(case(TEXTS))
    assert rec["source_teacher"] == "GPT-5-nano" and rec["text"] == TEXTS["GPT-5-nano"]
    assert set(rec["agreement"]) == set(TEXTS) and rec["strategy"] == "vote"
    only_refusals = {"a": "I cannot provide a diagnosis.", "b": "As an AI I cannot interpret images."}
    assert C.vote_record(case(only_refusals))["source_teacher"] == "a"
    drop_first = {k: v for k, v in TEXTS.items() if k != "GPT-5-nano"}
    assert C.vote_record(case(drop_first))["source_teacher"] == "Claude-Sonnet-4"


def test_vote_with_a_fake_labeler_is_exact():
    labels = {"A": {"Edema": 1}, "B": {"Edema": 1, "Cardiomegaly": 1}, "C": {"Edema": 1, "Cardiomegaly": 1}}
    best, scores = C.vote(["A", "B", "C"], label=lambda t: labels[t])
    assert best == 1 and scores == pytest.approx([13 / 14, 27 / 28, 27 / 28])
    # a refusal (nothing labelled) can have the best agreement when the others disagree; it is still never chosen
    labels = {
        "R": {},
        "B": {"Edema": 1, "Cardiomegaly": 1, "No Finding": 0},
        "C": {"Pneumothorax": 1, "Consolidation": 1, "No Finding": 0},
    }
    best, scores = C.vote(["R", "B", "C"], label=lambda t: labels[t])
    assert scores[0] > scores[1] == scores[2] and best == 1


def test_water_fill():
    assert C._water_fill([10, 100, 100], 150) == [10, 70, 70]
    assert C._water_fill([10, 20], 100) == [10, 20]
    assert C._water_fill([50, 50, 50], 100) == [34, 33, 33]
    assert sum(C._water_fill([7, 300, 41, 1000], 200)) == 200


def test_model_strategy_fits_the_budget_and_reports_cuts(tmp_path, tiny_model_dir, capsys):
    from apo.model.loading import load_model

    data = write_dataset(tmp_path, n_cases=3)
    model, processor = load_model(tiny_model_dir)
    c0 = json.loads(data.read_text().splitlines()[1])  # Claude's (long) row of case c0
    texts = [x + " (0)" for x in TEXTS.values()]
    texts[1] = c0["response"]
    _, cut, full = C.fit_trajectories(processor, [str(tmp_path / "img/0.png")], c0["question"], texts, 100_000, 8)
    assert not any(cut)
    max_length = full + 8 - 40  # 40 tokens too many: the long teacher must give them up
    _, cut, n = C.fit_trajectories(processor, [str(tmp_path / "img/0.png")], c0["question"], texts, max_length, 8)
    assert n <= max_length - 8 and cut[1] >= 40 and sum(cut) == cut[1]

    out = tmp_path / "consensus.jsonl"
    rc = main(
        [
            "consensus",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--out",
            str(out),
            "--max-length",
            str(max_length),
            "--max-new-tokens",
            "8",
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["case_id"] for r in recs] == ["c0", "c1", "c2"]
    for r in recs:
        assert r["strategy"] == "model" and isinstance(r["text"], str)
        assert set(r["truncated"]) == {"Claude-Sonnet-4"} and r["truncated"]["Claude-Sonnet-4"] >= 40
        assert r["prompt_tokens"] <= max_length - 8 and r["teachers"] == list(TEXTS)
    assert "Claude-Sonnet-4: cut in 3 cases" in capsys.readouterr().out
    # too small a budget is a clear error, not a crash
    assert (
        main(
            [
                "consensus",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(data),
                "--out",
                str(tmp_path / "x.jsonl"),
                "--max-length",
                "20",
                "--max-new-tokens",
                "8",
            ]
        )
        == 2
    )
    assert "raise --max-length" in capsys.readouterr().err


def test_model_strategy_resumes_after_a_crash_byte_identical(tmp_path, tiny_model_dir, monkeypatch):
    import apo.model.generation as G

    data = write_dataset(tmp_path, n_cases=6, repeat=1)
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--max-new-tokens", "6", "--batch-size", "1"]
    clean = tmp_path / "clean.jsonl"
    assert main(["consensus", *args, "--out", str(clean)]) == 0

    real, calls = G.generate, []

    def dies(*a, **kw):  # chunks are batch_size * 4 = 4 cases: the second chunk never finishes
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(G, "generate", dies)
    out = tmp_path / "resumed.jsonl"
    assert main(["consensus", *args, "--out", str(out)]) == 130
    assert len(out.read_text().splitlines()) == 4
    with open(out, "a") as f:
        f.write('{"case_id": "c4", "strat')  # a torn line from the kill
    monkeypatch.setattr(G, "generate", real)
    assert main(["consensus", *args, "--out", str(out)]) == 0
    assert out.read_bytes() == clean.read_bytes()


def test_vote_cli_needs_no_model(tmp_path):
    data = write_dataset(tmp_path, n_cases=2)
    out = tmp_path / "vote.jsonl"
    assert main(["consensus", "--strategy", "vote", "--dataset", str(data), "--out", str(out)]) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["source_teacher"] for r in recs] == ["GPT-5-nano", "GPT-5-nano"]
    assert main(["consensus", "--dataset", str(data), "--out", str(out)]) == 2  # model strategy without --model


def test_vote_counts_the_side():
    from apo.consensus import vote

    texts = [
        "Blunting of the left costophrenic angle consistent with a left pleural effusion.",  # right labels, wrong side
        "There is a right pleural effusion with blunting of the right costophrenic angle.",
        "Right-sided pleural effusion.",
        "Small right pleural effusion is present.",
    ]
    best, scores = vote(texts)
    assert best != 0 and scores[0] < min(scores[1:])  # without sides all four would agree on every label


def test_model_strategy_generates_longest_cases_first_and_writes_in_dataset_order(
    tmp_path, tiny_model_dir, monkeypatch
):
    import apo.model.generation as G

    data = write_dataset(tmp_path, n_cases=5, repeat=1)
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    for r in rows:  # case c{i} gets i extra sentences on one teacher: c4 longest
        i = int(r["case_id"][1:])
        if r["model"] == "Grok-4":
            r["response"] += " Mild cardiomegaly." * (3 * i)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen, real = [], G.generate

    def spy(model, processor, requests, **kw):
        seen.extend(len(p) for _, p in requests)
        return real(model, processor, requests, **kw)

    monkeypatch.setattr(G, "generate", spy)
    out = tmp_path / "c.jsonl"
    assert (
        main(
            [
                "consensus",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(data),
                "--out",
                str(out),
                "--max-new-tokens",
                "2",
                "--batch-size",
                "1",
            ]
        )
        == 0
    )  # chunks of 4: c4..c1, then c0
    assert seen == sorted(seen, reverse=True) and len(seen) == 5
    assert [json.loads(l)["case_id"] for l in out.read_text().splitlines()] == ["c0", "c1", "c2", "c3", "c4"]


def test_self_vote_picks_the_sample_closest_to_the_teachers():
    """The sample that agrees with the teachers, side included, wins; a refusal never does while another sample
    labels something; ties go to the earlier sample."""
    teachers = list(TEXTS.values())
    samples = [
        "I cannot provide a diagnosis. Please consult a radiologist.",
        "Right pleural effusion with a right pneumothorax.",  # Grok's drift
        "Small left pleural effusion. No pneumothorax.",  # what the majority says
        "Small left pleural effusion. No pneumothorax.",
    ]
    best, scores = C.self_vote(samples, teachers)
    assert best == 2 and scores[2] == scores[3] > scores[1]
    assert C.self_vote(samples[:1], teachers)[0] == 0  # only refusals: the refusal it is


def test_self_vote_cli_is_seeded_and_resumable(tmp_path, tiny_model_dir, monkeypatch):
    """Same seed, same t+ (byte-identical file); another seed is another run, refused in the same output;
    the record says which sample won and how every sample agreed."""
    import apo.model.generation as G

    data = write_dataset(tmp_path, n_cases=3, repeat=1)
    args = ["consensus", "--strategy", "self-vote", "--model", str(tiny_model_dir), "--dataset", str(data)]
    args += ["--num-samples", "3", "--max-new-tokens", "6", "--batch-size", "2"]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main([*args, "--out", str(a), "--seed", "5"]) == 0
    seen = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda *x, **kw: seen.append(kw) or real(*x, **kw))
    assert main([*args, "--out", str(b), "--seed", "5"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert seen and not seen[0]["greedy"] and len(seen[0]["seeds"]) == 3 * 3
    recs = [json.loads(l) for l in a.read_text().splitlines()]
    assert [r["case_id"] for r in recs] == ["c0", "c1", "c2"]
    for r in recs:
        assert r["strategy"] == "self-vote" and "source_teacher" not in r
        assert len(r["agreement"]) == 3 and 0 <= r["chosen_sample"] < 3
        assert r["agreement"][r["chosen_sample"]] == max(r["agreement"])
    assert main([*args, "--out", str(a), "--seed", "6"]) == 2  # another seed into the same output: refused
    assert main(["consensus", "--strategy", "self-vote", "--dataset", str(data), "--out", str(tmp_path / "c")]) == 2
    assert main([*args, "--out", str(tmp_path / "d.jsonl"), "--temperature", "0"]) == 2
