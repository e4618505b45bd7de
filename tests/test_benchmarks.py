"""The consensus benchmark runs end to end at a toy size (its figures are read from the run, never asserted)."""


def test_bench_consensus_runs_every_variant_on_the_same_cases(tmp_path, tiny_model_dir, synth_dir):
    from benchmarks.bench_consensus import main

    summary = main(["--cases", "3", "--batch-size", "2", "--max-new-tokens", "3", "--repeat", "2",
                    "--model-dir", str(tiny_model_dir), "--dataset", str(synth_dir / "cxrmax_train.jsonl"),
                    "--work", str(tmp_path)])
    results = summary["results"]
    assert set(results) == {"loop", "unsorted", "batched", "defaults"}
    for r in results.values():
        assert len(r["all_seconds"]) == 2 and r["seconds"] > 0
        assert r["same_text_as_loop"] == 1.0  # greedy: every variant writes the loop's answers
    assert summary["speedup_batched_vs_loop"] > 0 and "speedup_batched_vs_defaults" in summary
