"""scripts/demo_summary.py: results/summary.json has every key the demo promises, as fractions, from the files
eval-report, eval-mscxrt and check_base write."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIFTS = ("refusal", "hedge", "wrong_side", "hallucination", "omission")


def _student(folder: Path, answers: list[str], f1: float, sampled: bool):
    folder.mkdir(parents=True)
    rates = {k: 0.25 for k in DRIFTS}
    metrics = {
        "drift": {"f1": f1, "side_accuracy": 0.5},
        "drift_rates": {"greedy": rates, "sampled": rates if sampled else None},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "predictions.jsonl").write_text("".join(json.dumps({"prediction": a}) + "\n" for a in answers))
    (folder / "mscxrt.json").write_text(json.dumps({"average": 0.4}))


def test_summary_has_every_key(tmp_path):
    _student(tmp_path / "base", ["a", "a", "a", "a"], 0.1, sampled=True)
    _student(tmp_path / "sft", ["a", "b", "c", None], 0.7, sampled=True)
    _student(tmp_path / "dpo", ["a", "b", "b", "b"], 0.6, sampled=False)
    _student(tmp_path / "apo", ["a", "b", "c", "d"], 0.8, sampled=True)
    seeing = {"finding_f1": 0.6, "side_accuracy": 0.9, "mscxrt_average": 0.33, "grade_accuracy": 0.4, "n_images": 200}
    seeing["examples"] = []
    (tmp_path / "base_seeing.json").write_text(json.dumps(seeing))
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo_summary.py"), "--results", str(tmp_path), "--seconds", "812.4"],
        check=True,
        capture_output=True,
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["base_seeing"] == {k: v for k, v in seeing.items() if k != "examples"}
    assert set(s["students"]) == {"base", "sft", "dpo", "apo"} and s["seconds"] == 812
    for name, st in s["students"].items():
        for key in ("finding_f1", "side_accuracy", "distinct_answer_share", "mscxrt_average", "greedy", "sampled"):
            assert key in st, (name, key)
        assert set(st["greedy"]) == set(st["sampled"]) == set(DRIFTS)
        assert 0 <= st["distinct_answer_share"] <= 1
    assert s["students"]["base"]["distinct_answer_share"] == 0.25
    assert s["students"]["sft"]["distinct_answer_share"] == 1.0  # 3 distinct of 3 answered
    assert s["students"]["dpo"]["sampled"] == {k: None for k in DRIFTS}  # greedy-only run: no sampled rates


def test_summary_carries_the_consensus_scores(tmp_path):
    _student(tmp_path / "sft", ["a", "b"], 0.7, sampled=True)
    scores = {
        name: {"exact": 0.5, "hallucination": 0.1, "omission": 0.2, "wrong_side": 0.0}
        for name in ("model", "vote", "self-vote")
    }
    scores.update(best_teacher="Qwen-VL-Max", best_teacher_exact=0.74, n_cases=128)
    (tmp_path / "consensus.json").write_text(json.dumps(scores))
    script = [sys.executable, str(ROOT / "scripts" / "demo_summary.py"), "--results", str(tmp_path), "--seconds", "1"]
    subprocess.run(
        [*script, "--consensus", str(tmp_path / "consensus.json"), "--apo-positive", "model"],
        check=True,
        capture_output=True,
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["consensus"] == scores and s["apo_positive"] == "model"  # which t+ the preference stage learned from
    for name in ("model", "vote", "self-vote"):
        assert {"exact", "hallucination", "omission", "wrong_side"} <= set(s["consensus"][name])
    # a missing scores file is an error, not a summary silently without its consensus
    bad = subprocess.run([*script, "--consensus", str(tmp_path / "none.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "none.json" in bad.stderr and "Traceback" not in bad.stderr
