"""apo.evaluation.drift: per-teacher drift rates on hand-made cases with known answers; the CLI on the synthetic
benchmark."""

import json

import pytest

from apo.cli import main
from apo.consensus import load_consensus
from apo.constants import OBSERVATIONS
from apo.data import Case, Trajectory
from apo.errors import ApoError, DataError
from apo.evaluation.drift import answer_stats, drift_stats, js_divergence


def _labels(**pos):
    lab = dict.fromkeys(OBSERVATIONS)
    lab.update({k.replace("_", " "): v for k, v in pos.items()})
    return lab


TRUTH = [  # (labels, sides)
    (_labels(Pleural_Effusion=1), {"Pleural Effusion": "left"}),
    (_labels(Cardiomegaly=1), {}),
    (_labels(No_Finding=1, Pneumothorax=0), {}),
    (_labels(Pneumothorax=1), {"Pneumothorax": "right"}),
]
ANSWERS = {
    "A": [
        "Small left pleural effusion.",
        "Cardiomegaly.",
        "No acute cardiopulmonary abnormality.",
        "Small right pneumothorax.",
    ],  # right every time
    "B": [
        "Small right pleural effusion.",
        "Cardiomegaly.",
        "The lungs are clear.",
        "Small left pneumothorax.",
    ],  # wrong side
    "C": [
        "Small left pleural effusion and cardiomegaly.",
        "Cardiomegaly.",
        "Right lower lobe pneumonia.",
        "Small right pneumothorax.",
    ],  # hallucinates twice
    "D": [
        "I cannot provide a diagnosis.",
        "The heart may be enlarged.",
        "No pneumothorax.",
        "The lungs are clear.",
    ],  # refuses, hedges, omits
}


@pytest.fixture
def cases():
    return [
        Case(
            f"c{i}",
            [],
            "What findings support the diagnosis?",
            [Trajectory(t, ANSWERS[t][i]) for t in ANSWERS],
            dict(lab),
            {"sides": sides},
        )
        for i, (lab, sides) in enumerate(TRUTH)
    ]


def test_rates_per_teacher(cases):
    s = drift_stats(cases)
    assert s["sources"] == ["A", "B", "C", "D"] and s["n_cases"] == 4 and s["n_labelled"] == 4
    a, b, c, d = (s["per_teacher"][t] for t in "ABCD")
    # A is right about everything, No Finding included (derived from the other labels where blank)
    assert a["accuracy"] == 1 and a["f1"] == 1 and a["exact"] == 1
    assert a["hallucination_rate"] == a["omission_rate"] == a["side_error_rate"] == a["refusal_rate"] == 0
    # B: both lateral findings on the wrong side, otherwise right
    assert b["side_error_rate"] == 1 and b["side_n"] == 2 and b["f1"] == 1 and b["hallucination_rate"] == 0
    # C: cardiomegaly in case 0 and pneumonia in case 2 are not in the truth -> 2 of 4 answers
    assert c["hallucination_rate"] == 0.5 and c["omission_rate"] == 0 and c["exact"] == 0.5
    assert c["per_observation"]["Pneumonia"]["fp"] == 1 and c["per_observation"]["Cardiomegaly"]["fp"] == 1
    # D: refuses 1 of 4; of the 2 true findings left, one hedged (-1) and one unmentioned -> both omitted
    assert d["refusal_rate"] == 0.25 and d["answered"] == 3 and d["labelled"] == 3
    assert d["omission_rate"] == 1 and d["hedge_rate"] == 0.5 and d["true_findings"] == 2
    assert d["hallucination_rate"] == 0
    assert d["mean_words"] == pytest.approx(sum(len(t.split()) for t in ANSWERS["D"]) / 4)
    assert d["label_distribution"]["Cardiomegaly"] == {"1": 0, "0": 0, "-1": 1, "None": 3}


def test_consensus_and_divergence(cases):
    consensus = {c.case_id: ANSWERS["A"][i] for i, c in enumerate(cases)}
    s = drift_stats(cases, consensus)
    per = s["per_teacher"]
    assert s["sources"][-1] == "consensus" and s["n_consensus"] == 4
    assert per["consensus"]["f1"] == 1 and per["consensus"]["consensus_f1"] == 1
    assert per["B"]["consensus_f1"] == 1 and per["B"]["consensus_exact"] == 1  # same findings, sides aside
    assert per["C"]["consensus_f1"] == pytest.approx(0.75) and per["C"]["consensus_exact"] == 0.5  # tp 3, fp 2
    m = s["divergence"]["matrix"]
    for x in s["sources"]:
        assert m[x][x] == pytest.approx(0, abs=1e-12)
        for y in s["sources"]:
            assert m[x][y] == pytest.approx(m[y][x]) and 0 <= m[x][y] <= 1
    assert m["A"]["consensus"] == pytest.approx(0, abs=1e-12)  # same texts
    assert m["A"]["D"] > m["A"]["B"] > 0
    # a list aligned with the cases works as well; None = no consensus for that case
    s2 = drift_stats(cases, [ANSWERS["A"][0], None, None, None])
    assert s2["n_consensus"] == 1 and s2["per_teacher"]["consensus"]["answers"] == 1


def test_js_divergence_bounds():
    one = {o: {"1": 4, "0": 0, "-1": 0, "None": 0} for o in OBSERVATIONS}
    other = {o: {"1": 0, "0": 4, "-1": 0, "None": 0} for o in OBSERVATIONS}
    assert js_divergence(one, one) == 0 and js_divergence(one, other) == pytest.approx(1.0)


def test_answer_stats_without_labels():
    cases = [Case("x", [], "q", [], None, {})]
    s = answer_stats(cases, ["Small left pleural effusion."])
    assert s["answers"] == 1 and s["labelled"] == 0 and s["f1"] is None and s["hallucination_rate"] is None


def test_load_consensus(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"case_id": "c0", "text": "ok", "strategy": "vote"}\n\n{"case_id": 1, "text": "t"}\n')
    assert {k: r["text"] for k, r in load_consensus(p).items()} == {"c0": "ok", "1": "t"}
    p.write_text('{"case_id": "c0", "text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"c.jsonl:2"):
        load_consensus(p)
    p.write_text('{"case_id": "c0"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1"):
        load_consensus(p)
    with pytest.raises(ApoError):
        load_consensus(tmp_path / "missing.jsonl")


def test_cli_on_synthetic_benchmark(synth_dir, tmp_path, capsys):
    data = synth_dir / "cxrmax_train.jsonl"
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    cons = tmp_path / "consensus.jsonl"  # the terse teacher's answers as a stand-in t+
    cons.write_text(
        "".join(
            json.dumps({"case_id": r["case_id"], "text": r["response"]}) + "\n"
            for r in rows
            if r["model"] == "GPT-5-nano"
        )
    )
    out = tmp_path / "drift"
    assert main(["drift", "--dataset", str(data), "--consensus", str(cons), "--out", str(out)]) == 0
    s = json.loads((out / "drift.json").read_text())
    per = s["per_teacher"]
    assert len(s["sources"]) == 8 and s["n_consensus"] == s["n_cases"] > 0
    rate = lambda k: {t: per[t][k] or 0 for t in s["sources"] if t != "consensus"}  # noqa: E731
    # the designed drift profiles are what the labeler reads back
    assert max(rate("hallucination_rate"), key=rate("hallucination_rate").get) in ("Grok-4", "Qwen-VL-Max")
    assert max(rate("side_error_rate"), key=rate("side_error_rate").get) == "Gemini-2.5-flash-lite"
    assert (
        max(rate("refusal_rate"), key=rate("refusal_rate").get) == "Moonshot-v1"
        and per["Moonshot-v1"]["refusal_rate"] > 0
    )
    assert max(rate("hedge_rate"), key=rate("hedge_rate").get) == "Claude-Sonnet-4"
    assert per["consensus"]["consensus_f1"] == 1
    md = (out / "DRIFT.md").read_text()
    assert "| Gemini-2.5-flash-lite |" in md and "## Pairwise divergence" in md
    for png in ("error_rates.png", "js_divergence.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Teacher drift" in capsys.readouterr().out
    # a consensus file that matches no case is a user error
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"case_id": "nope", "text": "x"}\n')
    assert main(["drift", "--dataset", str(data), "--consensus", str(bad), "--out", str(tmp_path / "d2")]) == 2


def test_exact_with_side_needs_every_true_side(cases):
    per = drift_stats(cases)["per_teacher"]
    assert per["A"]["exact"] == 1 and per["A"]["exact_with_side"] == 1
    # B names the right findings on the wrong side twice: exact by findings, not with sides
    assert per["B"]["exact"] == 1 and per["B"]["exact_with_side"] == 0.5
    assert per["B"]["counts"]["exact"] == 4 and per["B"]["counts"]["exact_with_side"] == 2


def test_consensus_quality_scores_strategies_beside_the_best_teacher(cases):
    from apo.evaluation.drift import consensus_quality

    strategies = {
        "truthful": {c.case_id: ANSWERS["A"][i] for i, c in enumerate(cases)},
        "mirrored": {c.case_id: ANSWERS["B"][i] for i, c in enumerate(cases)},
        "refuses": {c.case_id: "I cannot provide a diagnosis." for c in cases},
    }
    q = consensus_quality(cases, strategies)
    assert q["n_cases"] == 4 and q["best_teacher"] == "A" and q["best_teacher_exact"] == 1
    assert q["truthful"]["exact"] == 1 and q["truthful"]["wrong_side"] == 0
    assert q["mirrored"]["exact"] == 0.5 and q["mirrored"]["exact_findings"] == 1 and q["mirrored"]["wrong_side"] == 1
    assert q["refuses"]["exact"] == 0 and q["refuses"]["refusal"] == 1  # a refusal is not an exact answer
    # only cases every strategy answered are scored, teachers included
    strategies["partial"] = {cases[1].case_id: "Cardiomegaly."}
    q = consensus_quality(cases, strategies)
    assert q["n_cases"] == 1 and q["partial"]["exact"] == 1 and q["mirrored"]["exact"] == 1


def test_consensus_quality_script_one_line_errors(tmp_path, synth_dir):
    import subprocess
    import sys

    script = [sys.executable, "scripts/consensus_quality.py"]
    bad = subprocess.run(
        [*script, "--dataset", "x.jsonl", "--consensus", "vote", "--out", str(tmp_path / "q.json")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "expected NAME=PATH" in bad.stderr
    missing = subprocess.run(
        [*script, "--dataset", str(synth_dir / "cxrmax_train.jsonl"), "--consensus", f"vote={tmp_path}/none.jsonl"]
        + ["--out", str(tmp_path / "q.json")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "none.jsonl" in missing.stderr
    assert not (tmp_path / "q.json").exists()
