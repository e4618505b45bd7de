"""The benchmarks' machinery: the consensus benchmark end to end at a toy size, bench_apo's lockstep driver with fake
workers (their figures are read from the runs or synthetic, never a clock asserted)."""


def test_bench_consensus_runs_every_variant_on_the_same_cases(tmp_path, tiny_model_dir, synth_dir):
    from benchmarks.bench_consensus import main

    summary = main(
        [
            "--cases",
            "3",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
            "--repeat",
            "2",
            "--model-dir",
            str(tiny_model_dir),
            "--dataset",
            str(synth_dir / "cxrmax_train.jsonl"),
            "--work",
            str(tmp_path),
        ]
    )
    results = summary["results"]
    assert set(results) == {"loop", "unsorted", "batched", "defaults"}
    for r in results.values():
        assert len(r["all_seconds"]) == 2 and r["seconds"] > 0
        assert r["same_text_as_loop"] == 1.0  # greedy: every variant writes the loop's answers
    assert summary["speedup_batched_vs_loop"] > 0 and "speedup_batched_vs_defaults" in summary


FAKE_WORKER = """
import json, sys, time
sys.path.insert(0, {bench!r})
from bench_apo import hold_for_turn

method, spec_path = sys.argv[1:]
spec = json.load(open(spec_path))
cost = {{"apo": 1.0, "swift": 3.0}}[method]  # synthetic step times: the arithmetic is checked, not a clock
r = {{"step_begin": [], "step_end": [], "cpu_end": [], "items_per_step": 1 if method == "apo" else spec["n_neg"],
      "rss_begin_kb": 0, "hwm_warmup_kb": 1024, "hwm_steps_kb": 2048 * cost, "rss_steady_kb": 0}}
hold_for_turn(b"r")
for g in range(1, spec["n_steps"] + 1):
    cold = 100.0 if g - 1 in spec["pauses"] else 1.0  # the step after a pause
    r["step_begin"].append(g * 10.0)
    r["step_end"].append(g * 10.0 + 1)
    r["cpu_end"].append((r["cpu_end"][-1] if r["cpu_end"] else 0.0) + cost * cold * g)
    with open(spec["work"] + "/order.txt", "a") as fh:
        fh.write(f"{{method}} {{g}}\\n")
    if g in spec["pauses"]:
        hold_for_turn(b"d")
json.dump(r, open(spec["work"] + f"/result_{{method}}.json", "w"))
"""


def test_lockstep_runs_the_methods_in_turns_and_pairs_their_rounds(tmp_path):
    """Both processes start at once; each round one method runs its block while the other waits; the step after
    a pause is never measured; per-round medians come out in round order."""
    import json
    import sys
    from pathlib import Path

    from benchmarks.bench_apo import run_lockstep, schedule

    plan = schedule(warmup=2, steps=9, rounds=3)
    assert plan["n_steps"] == 2 + 9 + 2 and plan["pauses"] == [5, 9]
    assert [g for g, _ in plan["measured"]] == [3, 4, 5, 7, 8, 9, 11, 12, 13]  # not 6, 10: first after a pause
    assert schedule(warmup=1, steps=4, rounds=1) == {
        "n_steps": 5,
        "pauses": [],
        "measured": [[2, 0], [3, 0], [4, 0], [5, 0]],
    }
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    (tmp_path / "fake.py").write_text(FAKE_WORKER.format(bench=bench))
    spec = {"work": str(tmp_path), "threads": 1, "n_neg": 7, "clock": "cpu", "device": "cpu", "warmup": 2, **plan}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    results = run_lockstep(
        ["apo", "swift"],
        spec,
        str(tmp_path / "spec.json"),
        timeout=60,
        argv=lambda m: [sys.executable, str(tmp_path / "fake.py"), m, str(tmp_path / "spec.json")],
    )
    order = [line.split() for line in (tmp_path / "order.txt").read_text().splitlines()]
    blocks = [(m, int(g)) for m, g in order]
    expect = [(m, g) for lo, hi in ((1, 5), (6, 9), (10, 13)) for m in ("apo", "swift") for g in range(lo, hi + 1)]
    assert blocks == expect
    apo, swift = results["apo"], results["swift"]
    assert "error" not in apo and "error" not in swift
    # step g costs cost * g: round medians = the middle step's; a cold step counted would move them
    assert apo["rounds_s_per_group"] == [4.0, 8.0, 12.0] and apo["s_per_group"] == 8.0
    assert swift["rounds_s_per_group"] == [12.0, 24.0, 36.0]  # 7 pairs a step = one group a step
    assert apo["peak_mem_mb"] == 2.0 and swift["peak_mem_mb"] == 6.0


def test_lockstep_reports_a_worker_that_dies_and_finishes_the_others(tmp_path):
    import json
    import sys
    from pathlib import Path

    from benchmarks.bench_apo import run_lockstep, schedule

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    (tmp_path / "fake.py").write_text(FAKE_WORKER.format(bench=bench))
    (tmp_path / "dies.py").write_text("import sys; print('ValueError: no such model'); sys.exit(3)\n")
    spec = {
        "work": str(tmp_path),
        "threads": 1,
        "n_neg": 7,
        "clock": "cpu",
        "device": "cpu",
        "warmup": 1,
        **schedule(warmup=1, steps=4, rounds=2),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = {"apo": "fake.py", "swift": "dies.py"}
    results = run_lockstep(
        ["swift", "apo"],
        spec,
        str(tmp_path / "spec.json"),
        timeout=60,
        argv=lambda m: [sys.executable, str(tmp_path / script[m]), m, str(tmp_path / "spec.json")],
    )
    assert "exit 3" in results["swift"]["error"] and "no such model" in results["swift"]["error"]
    assert results["apo"]["rounds_s_per_group"] == [2.5, 5.5]  # steps 2,3 | (4 cold) 5,6


def test_ideal_flop_ratio_counts_the_shared_image_and_prompt():
    """bench_apo --shape mimic's analytic count: DPO = 2N full rows (policy fwd+bwd + reference fwd, an image each),
    APO = one packed row; with no prompt and a free image the ratio is 2N/(N+1) on answer tokens."""
    from benchmarks.bench_apo import SIZES, ideal_flops, tiny_dims

    d = tiny_dims()
    assert d["text"]["vocab_size"] == 152064 and d["text"]["hidden_size"] == 64
    free = {"text": SIZES["7b"]["text"], "vision": dict(SIZES["7b"]["vision"], depth=0, hidden_size=0)}
    r = ideal_flops(free, P=0, image_tokens=0, C=100, n=7)
    assert abs(r["ratio"] - 14 / 8) < 0.05  # attention pairs make it a little different from 14/8
    real = ideal_flops(SIZES["7b"], P=560, image_tokens=480, C=420, n=7)
    assert 3 < real["ratio"] < 5 and real["ratio_full_logits"] > real["ratio"]
