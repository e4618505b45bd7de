"""The paired bootstrap of the experiment (apo.evaluation.paired) and the experiment's frozen config."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from apo.data import Case
from apo.evaluation.drift import answer_stats
from apo.evaluation.paired import COUNTS, case_counts, paired_bootstrap, rates

ROOT = Path(__file__).resolve().parents[1]


def _case(i, labels, sides=None):
    return Case(
        case_id=f"c{i}",
        images=[],
        prompt="Describe the image.",
        trajectories=[],
        labels=labels,
        meta={"sides": sides or {}},
    )


CASES = [
    _case(0, {"Pleural Effusion": 1}, {"Pleural Effusion": "left"}),
    _case(1, {"Cardiomegaly": 1}),
    _case(2, {"No Finding": 1}),
]
TEXTS = ["There is a small left pleural effusion.", "The heart is enlarged.", "The lungs are clear."]


def test_case_counts_pool_to_answer_stats():
    """Summing the per-case counts gives exactly the rates answer_stats computes on all cases at once."""
    per_case = np.array([case_counts(c, [t]) for c, t in zip(CASES, TEXTS)])
    whole = answer_stats(CASES, TEXTS)
    pooled = rates(per_case)
    assert pooled["f1"] == pytest.approx(whole["f1"])
    assert pooled["hallucination"] == pytest.approx(whole["hallucination_rate"])
    assert pooled["omission"] == pytest.approx(whole["omission_rate"])
    assert pooled["side_accuracy"] == pytest.approx(1 - whole["side_error_rate"])
    # K sampled answers of one case pool into one row
    two = case_counts(CASES[0], ["There is a small right pleural effusion.", TEXTS[0]])
    assert two[COUNTS.index("answers")] == 2 and two[COUNTS.index("side_errors")] == 1


def _arm(rng, p, seeds=4, n=150):
    out = []
    for _ in range(seeds):
        c = np.zeros((n, len(COUNTS)))
        c[:, COUNTS.index("answers")] = c[:, COUNTS.index("labelled")] = 1
        tp = rng.binomial(2, p, n)
        c[:, COUNTS.index("tp")], c[:, COUNTS.index("fn")] = tp, 2 - tp
        c[:, COUNTS.index("true_findings")], c[:, COUNTS.index("omitted")] = 2, 2 - tp
        out.append(c)
    return out


def test_bootstrap_separates_a_real_difference_and_not_noise():
    rng = np.random.default_rng(0)
    good, bad, same = _arm(rng, 0.8), _arm(rng, 0.6), _arm(rng, 0.6)
    real = paired_bootstrap(good, bad, n_boot=500)
    assert real["f1"]["low"] > 0 and real["f1"]["better_share"] == 1.0
    assert real["omission"]["high"] < 0  # lower omission is better: a - b < 0
    null = paired_bootstrap(same, bad, n_boot=500)
    assert null["f1"]["low"] < 0 < null["f1"]["high"]
    assert real["side_accuracy"] is None  # no lateral finding: not measurable, not 0
    # the pairing: a student compared with itself differs by exactly 0 in every draw
    self_diff = paired_bootstrap(bad, bad, n_boot=200)["f1"]
    assert self_diff["low"] == self_diff["high"] == 0.0
    # reproducible for a seed
    assert paired_bootstrap(good, bad, n_boot=300, seed=3) == paired_bootstrap(good, bad, n_boot=300, seed=3)


def test_bootstrap_refuses_unpaired_input():
    rng = np.random.default_rng(0)
    a = _arm(rng, 0.5, seeds=2)
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap(a, a[:1])
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap(a, [a[0], a[1][:-1]])


def _experiment():
    spec = importlib.util.spec_from_file_location("experiment", ROOT / "scripts" / "experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_frozen_config_sets_defaults_and_flags_win():
    exp = _experiment()
    cfg = ROOT / "configs" / "experiment" / "pretrained.json"
    frozen = json.loads(cfg.read_text())
    args = exp.parse_args(["--config", str(cfg)])
    assert args.seeds == frozen["seeds"] and args.base == "pretrained" and args.sft_lr == frozen["sft_lr"]
    assert Path(args.out) == ROOT / frozen["out"]  # a config's folders are the repository's
    assert 0 not in args.seeds  # the development seed is not an evaluation seed
    args = exp.parse_args(["--config", str(cfg), "--seeds", "7", "--sft-lr", "0.1"])
    assert args.seeds == [7] and args.sft_lr == 0.1 and args.cases == frozen["cases"]


def test_report_says_what_ran(tmp_path):
    """The rerun command keeps a config's overrides; the 'frozen before the evaluation seeds' claim is made only for
    the config as committed, without the development seed."""
    exp = _experiment()
    cfg = "configs/experiment/pretrained.json"
    for argv, frozen in (([], True), (["--seeds", "0", "1"], False), (["--sft-lr", "0.1"], False)):
        args = exp.parse_args(["--config", cfg, *argv])
        args.argv = ["--config", cfg, *argv]
        assert exp.frozen_claim(args) is frozen
        assert exp.rerun_command(args).endswith(" ".join(["--config", cfg, *argv]))
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"seeds": 3}))  # a scalar where a list is expected is a list of one
    args = exp.parse_args(["--config", str(single)])
    assert args.seeds == [3]
    assert exp.shown(single) == str(single.resolve())  # a config outside the repository is printed as it is


@pytest.mark.parametrize(
    "content, message",
    [
        ({"sft_steeps": 3}, "unknown setting 'sft_steeps'"),
        ({"sft_steps": "many"}, "sft_steps: 'many' is not a valid int"),
        ({"base": "imagenet"}, "base: 'imagenet' not among"),
        ({"beta": [0.1, 0.2]}, "beta: [0.1, 0.2] is a list; expected one value"),
        ({"sft_lora": [32]}, "sft_lora: [32] has 1 values; expected 2"),
        ({"seeds": []}, "seeds: [] is empty"),
        ({"sft_steps": 600.9}, "sft_steps: 600.9 is not a valid int"),
        ({"cases": True}, "cases: True is not a valid value"),
        ({"base_dir": None}, "base_dir: None is not a valid value"),
        ({"report_only": True}, "unknown setting 'report_only'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_config_is_one_line(tmp_path, capsys, content, message):
    exp = _experiment()
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as e:
        exp.parse_args(["--config", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(f) in err and message in err


def test_report_only_never_overwrites_with_nothing(tmp_path):
    """--report-only on a folder without the seeds' evaluations (a fresh clone: seed folders are not committed)
    stops with one line and leaves the committed report alone."""
    exp = _experiment()
    (tmp_path / "EXPERIMENT.md").write_text("committed")
    with pytest.raises(SystemExit, match=r"--report-only: .* lacks 2 evaluated arm\(s\) \(seed1/eval/sft"):
        exp.main(["--seeds", "1", "--arms", "sft", "apo", "--out", str(tmp_path), "--report-only"])
    assert (tmp_path / "EXPERIMENT.md").read_text() == "committed"
    assert not (tmp_path / "experiment.json").exists()


def test_sft_replay_needs_the_pretrained_base_and_its_rows_are_shared(tmp_path, capsys):
    exp = _experiment()
    args = exp.parse_args(["--base", "pretrained", "--sft-replay", "600", "300", "0", "--out", str(tmp_path)])
    assert exp.replay_rows(args) == tmp_path.resolve() / "base-pretrained-replay-600-300-0" / "replay.jsonl"
    for argv, message in (
        (["--sft-replay", "1", "0", "0"], "needs --base pretrained"),
        (["--base", "pretrained", "--sft-replay", "1", "-1", "0"], "must not be negative"),
    ):
        with pytest.raises(SystemExit) as e:
            exp.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_positive_strategy_arms_are_paired_and_their_positives_averaged():
    """Issue 14: APO on the self-vote / model t+ is compared with APO on the vote (and SFT), and each t+'s quality
    against the truth is averaged over seeds into the report."""
    exp = _experiment()
    args = exp.parse_args(["--arms", "sft", "apo", "apo_model", "apo_self_vote", "--self-vote-samples", "3"])
    assert args.self_vote_samples == 3 and args.consensus_max_length == 2048

    def seed(f1_apo, f1_model, exact_model):
        arms = {arm: {"drift.f1": f1} for arm, f1 in (("sft", 0.5), ("apo", f1_apo), ("apo_model", f1_model))}
        positives = {
            "best_teacher_exact": 0.6,
            "vote": {"exact": 0.9, "hallucination": 0.0},
            "model": {"exact": exact_model, "hallucination": 0.4},
        }
        return {"arms": arms, "teachers": {}, "positives": positives}

    agg = exp.aggregate([seed(0.6, 0.4, 0.1), seed(0.7, 0.6, 0.3)], ["sft", "apo", "apo_model"], n_boot=10)
    diff = agg["paired"]["apo_model-apo"]["drift.f1"]
    assert diff["diffs"] == pytest.approx([-0.2, -0.1]) and diff["wins"] == 0
    assert "apo_self_vote-apo" not in agg["paired"]  # an arm not run is not paired
    assert agg["positives"]["strategies"]["model"]["exact"] == pytest.approx(0.2)
    assert agg["positives"]["best_teacher_exact"] == pytest.approx(0.6)
    table = exp.positives_table(agg)
    assert "| model | 0.200 |" in table and "Best single teacher's exact on the same cases: 0.600" in table
    assert "| APO (model t⁺) − APO |" in exp.paired_table(agg)
    assert "SFT + APO (model t⁺)" in exp.main_table(agg, ["apo_model"])


def test_a_run_without_the_positive_arms_ignores_their_old_outputs(tmp_path):
    """An earlier run's positives.json (or arm folders) in the seed folder never leak into a run without those arms."""
    exp = _experiment()
    seed_dir = tmp_path / "seed1"
    seed_dir.mkdir()
    (seed_dir / "positives.json").write_text(json.dumps({"best_teacher_exact": 0.6, "vote": {"exact": 0.9}}))
    without = exp.Seed(exp.parse_args(["--out", str(tmp_path), "--arms", "sft", "apo"]), 1).collect()
    assert "positives" not in without
    with_arm = exp.Seed(exp.parse_args(["--out", str(tmp_path), "--arms", "apo", "apo_model"]), 1).collect()
    assert with_arm["positives"]["vote"]["exact"] == 0.9
