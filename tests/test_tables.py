"""apo.evaluation.tables: the paper's tables (markdown + LaTeX) and training curves from a fixture results folder."""

import json
import re

import pytest

from apo.cli import main
from apo.data import Case, Trajectory
from apo.errors import ApoError, DataError
from apo.evaluation.drift import drift_stats
from apo.evaluation.tables import PUBLISHED, read_results, tex_escape


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics(b1, f1, halluc):
    nlg = {
        "BLEU-1": b1,
        "BLEU-2": b1 / 2,
        "BLEU-3": b1 / 3,
        "BLEU-4": b1 / 4,
        "METEOR": 0.2,
        "ROUGE-L": 0.3,
        "CIDEr": 0.4,
    }
    return {
        "n": 24,
        "nlg": nlg,
        "clinical": {"micro": {"precision": f1, "recall": f1, "f1": f1}},
        "drift": {
            "hallucination_rate": halluc,
            "omission_rate": 0.1,
            "hedge_rate": 0.05,
            "side_error_rate": 0.2,
            "refusal_rate": 0.0,
            "accuracy": 0.9,
            "f1": f1,
            "exact": 0.5,
            "mean_words": 30.0,
        },
    }


def _mscxrt(avg):
    return {
        "per_finding": {
            "consolidation": 0.111,
            "edema": 0.222,
            "pleural_effusion": 0.333,
            "pneumonia": 0.444,
            "pneumothorax": 0.555,
        },
        "average": avg,
        **({"average_macro": round(avg - 0.1, 3)} if avg > 0.6 else {}),  # older mscxrt.json files lack it
        "n": {"edema": 3},
        "unparsed": 0,
    }


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    for run, (b1, f1, h, avg) in {
        "sft": (0.301, 0.41, 0.3, 0.501),
        "apo": (0.352, 0.52, 0.1, 0.612),
        "base": (0.101, 0.11, 0.5, 0.301),
        "dpo": (0.321, 0.45, 0.2, 0.551),
    }.items():
        _write(root / run / "metrics.json", _metrics(b1, f1, h))
        _write(root / run / "mscxrt.json", _mscxrt(avg))
    # a run with another name, eval-report's own flat drift keys (side_accuracy), no MS-CXR-T
    m = _metrics(0.2, 0.3, 0.4)
    m["drift"] = {"hallucination_rate": 0.4, "omission_rate": 0.3, "refusal_rate": 0.1, "side_accuracy": 0.75}
    _write(root / "apo_beta_0.5" / "metrics.json", m)
    log_history = [
        {
            "step": s,
            "loss": 1.0 / s,
            "rewards/margins": 0.1 * s,
            "rewards/accuracies": 0.5,
            "rewards/teacher/Grok-4": -0.1 * s,
            "rewards/teacher/GPT-5-nano": -0.05 * s,
        }
        for s in range(1, 6)
    ]
    log_history.append({"step": 5, "train_runtime": 1.0})
    _write(root / "apo" / "trainer_state.json", {"log_history": log_history})
    _write(root / "sft" / "checkpoint-2" / "trainer_state.json", {"log_history": [{"step": 1, "loss": 2.0}]})
    _write(
        root / "sft" / "checkpoint-10" / "trainer_state.json",
        {"log_history": [{"step": 1, "loss": 2.0}, {"step": 10, "loss": 1.5}]},
    )
    cases = [
        Case(
            "c0",
            [],
            "q",
            [
                Trajectory("Grok-4", "Small left pleural effusion and cardiomegaly."),
                Trajectory("GPT-5-nano", "Small left pleural effusion."),
            ],
            {"Pleural Effusion": 1},
            {"sides": {"Pleural Effusion": "left"}},
        )
    ]
    _write(root / "drift" / "drift.json", drift_stats(cases))
    return root


def _table(md, title):
    block = md.split(f"### {title}")[1].split("###")[0]
    return [l for l in block.splitlines() if l.startswith("| ") and not l.startswith("|---")]


def test_tables_from_results(results, tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["tables", "--results", str(results), "--out", str(out)]) == 0
    md = (out / "tables.md").read_text()
    # MS-CXR-T: measured rows in ablation order, then the paper's numbers, labelled, in their own rows
    rows = _table(md, "MS-CXR-T")
    assert rows[0].startswith("| run | consolidation | edema | pleural effusion | pneumonia | pneumothorax | average |")
    assert [r.split("|")[1].strip() for r in rows[1:5]] == ["base", "sft", "dpo", "apo"]
    assert rows[0].endswith("| average | class-balanced |")
    assert rows[4] == "| apo | 0.111 | 0.222 | 0.333 | 0.444 | 0.555 | 0.612 | 0.512 |"
    assert rows[3] == "| dpo | 0.111 | 0.222 | 0.333 | 0.444 | 0.555 | 0.551 |  |"
    assert rows[5] == f"| *APO 7B — {PUBLISHED}* | 0.84 |  |  |  | 0.96 | 0.78 |  |"
    assert rows[6] == f"| *best prior — {PUBLISHED}* |  |  |  |  |  | 0.69 |  |"
    assert len(rows) == 7  # apo_beta_0.5 has no MS-CXR-T result
    # report generation: BLEU-1 reference rows; the run with another name is there too
    rows = _table(md, "Report generation")
    assert any(r.startswith("| apo_beta_0.5 | 0.200 |") for r in rows)
    assert f"| *APO 7B — {PUBLISHED}* | 0.56 |" in md and f"| *best prior — {PUBLISHED}* | 0.43 |" in md
    assert "| apo | 0.352 | 0.176 | 0.117 | 0.088 | 0.200 | 0.300 | 0.400 | 0.520 | 0.520 | 0.520 | 24 |" in rows
    # no published number leaks into a measured row
    for r in _table(md, "MS-CXR-T")[1:5] + _table(md, "Report generation")[1:6]:
        assert PUBLISHED not in r and not re.search(r"\| 0\.(78|69|96|84|56|43)0? \|", r)
    # ablation: headline numbers + drift of each run's answers; side error from eval-report's side_accuracy
    rows = _table(md, "Ablation")
    # (greedy and sampled side by side; these metrics.json files predate drift_rates: greedy only, sampled blank)
    assert "| apo | 0.612 | 0.352 | 0.300 | 0.520 | 0.100 |  | 0.100 |  | 0.050 |  | 0.200 |  | 0.000 |  |" in rows
    assert "| apo_beta_0.5 |  | 0.200 | 0.300 | 0.300 | 0.400 |  | 0.300 |  |  |  | 0.250 |  | 0.100 |  |" in rows
    # teachers on their own trajectories, students alongside
    rows = _table(md, "Teachers")
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names[:2] == ["GPT-5-nano", "Grok-4"] and "student: apo" in names  # CXR-MAX's teacher order
    grok = rows[2].split("|")
    assert grok[2].strip() == "0.929" and grok[5].strip() == "1.000"  # accuracy 13/14, hallucination 1 of 1
    # LaTeX: balanced, one environment per table, every row as wide as its header
    tex = (out / "tables.tex").read_text()
    assert tex.count("{") == tex.count("}") and tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 4
    assert r"apo\_beta\_0.5" in tex and r"\textit{APO 7B --- paper (published)}" in tex
    for block in tex.split(r"\begin{tabular}")[1:]:
        spec = re.match(r"\{(l r*)\}".replace(" ", ""), block).group(1)
        body = block.split(r"\toprule")[1].split(r"\bottomrule")[0]
        for line in body.splitlines():
            if line.endswith(r"\\"):
                assert line.count("&") == len(spec) - 1, line
    # training curves from the run's own state and from sft's latest checkpoint
    for run in ("apo", "sft"):
        assert (out / f"curves_{run}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "curves_base.png").exists()
    printed = capsys.readouterr().out
    assert "MS-CXR-T" in printed and "| apo | 0.111 |" in printed


def test_read_results_picks_latest_checkpoint(results):
    res = read_results(results)
    assert res["runs"]["sft"]["trainer_state"].parent.name == "checkpoint-10"
    assert list(res["runs"]) == ["base", "sft", "dpo", "apo", "apo_beta_0.5"]


def test_errors(tmp_path):
    with pytest.raises(ApoError, match="no such folder"):
        read_results(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ApoError, match="no results found"):
        read_results(tmp_path / "empty")
    (tmp_path / "bad" / "apo").mkdir(parents=True)
    (tmp_path / "bad" / "apo" / "metrics.json").write_text("{oops")
    with pytest.raises(DataError, match="metrics.json"):
        read_results(tmp_path / "bad")
    assert main(["tables", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


def test_tex_escape():
    assert tex_escape("a_b & 50% #1 {x}") == r"a\_b \& 50\% \#1 \{x\}"


def teststudent_drift_shapes():
    from apo.evaluation.tables import student_drift

    cases = [Case("c0", [], "q", [Trajectory("Grok-4", "x")], {"Pleural Effusion": 1}, {})]
    nested = drift_stats(cases, ["Small pleural effusion and cardiomegaly."])  # eval-report's answers as consensus
    d = student_drift({"drift": nested})
    assert d["hallucination_rate"] == 1 and d["answers"] == 1
    assert student_drift({"drift": {"side_accuracy": 0.75}})["side_error_rate"] == 0.25
    assert student_drift({}) is None and student_drift({"drift": "n/a"}) is None


def test_ablation_shows_greedy_and_sampled_drift_and_signature_copies(results, tmp_path):
    """A metrics.json with drift_rates / signature (eval-report --num-samples --signatures-from) next to old ones."""
    m = _metrics(0.3, 0.4, 0.9)  # its old-style `drift` must not be used when drift_rates is there
    rates = {"hallucination": 0.1, "omission": 0.2, "hedge": 0.0, "wrong_side": None, "refusal": 0.0}
    m["drift_rates"] = {"greedy": rates, "sampled": dict(rates, refusal=0.25, hedge=0.125)}
    m["signature"] = {
        "phrases": {"Grok-4": ["the image is clear"], "GLM-4.5V": [], "Moonshot-v1": ["i cannot provide"]},
        "own": {"Grok-4": 1.0, "GLM-4.5V": None, "Moonshot-v1": 0.375},
        "greedy": {"Grok-4": 0.5, "GLM-4.5V": None, "Moonshot-v1": 0.0},
        "sampled": {"Grok-4": 0.25, "GLM-4.5V": None, "Moonshot-v1": 0.125},
    }
    _write(results / "sft" / "metrics.json", m)
    out = tmp_path / "tables"
    assert main(["tables", "--results", str(results), "--out", str(out)]) == 0
    md = (out / "tables.md").read_text()
    rows = _table(md, "Ablation")
    assert rows[0].endswith(
        "| hallucination g | hallucination s | omission g | omission s | hedge g | hedge s | "
        "side error g | side error s | refusal g | refusal s |"
    )
    assert (
        "| sft | 0.501 | 0.300 | 0.300 | 0.400 | 0.100 | 0.100 | 0.200 | 0.200 | 0.000 | 0.125 |  |  | 0.000 | 0.250 |"
        in rows
    )
    assert any(r.startswith("| base | 0.301 | 0.101 |") and r.endswith("| 0.000 |  |") for r in rows)  # old file
    rows = _table(md, "Teacher signature")
    assert rows[0] == "| run | Grok-4 g | Grok-4 s | Moonshot-v1 g | Moonshot-v1 s |"  # GLM: no phrase, no column
    assert rows[1:] == [
        "| teachers (own answers) | 1.000 | 1.000 | 0.375 | 0.375 |",
        "| sft | 0.500 | 0.250 | 0.000 | 0.125 |",
    ]
    tex = (out / "tables.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 5
