#!/usr/bin/env python
"""Soak test (outside CI): kill and resume the long-running stages at random moments for N minutes.

    .venv/bin/python scripts/soak.py --minutes 20 --work /tmp/apo-soak \
        [--stages vote,model,eval-report,eval-mscxrt,train]

Builds the tiny model and a small world (tests/reliability/world.py), runs each stage once uninterrupted as the
reference, then repeats until time is up: pick a stage, SIGKILL it 1-4 times at a random moment (a delay drawn over
the reference run's duration, or after a random number of new output records; each run resumes the last one's
files; sometimes half a record is appended, as a kill mid-write leaves it), then let it finish. Invariants:
after every kill the output holds only whole, distinct records; at the end it is byte-identical to the reference
(greedy decoding; metrics files too) or, for `apo train --resume`, the adapter weights equal the reference's.
Prints a summary; exit status 1 if any invariant failed.
"""

import argparse
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability.faults import (  # noqa: E402 (needs the repo on sys.path)
    after_records,
    after_seconds,
    complete_lines,
    kill_when,  # noqa: E402
    partial_keys,
    run_apo,
    tear,
)
from tests.reliability.world import build  # noqa: E402

STAGES = ("vote", "model", "eval-report", "eval-mscxrt", "train", "train-ref")


def stage_specs(w, model, work):
    """stage -> (argv without --out/--output_dir, output flag, records file inside the output, files to compare)."""
    data = ["--dataset", w["data"], "--image-root", w["root"]]
    gen = ["--model", model, "--max-new-tokens", 6, "--batch-size", 2]
    specs = {
        "vote": (["consensus", "--strategy", "vote", *data], "--out", None, [None]),
        "model": (["consensus", "--strategy", "model", *data, *gen, "--max-length", 1024], "--out", None, [None]),
        "eval-report": (
            ["eval-report", *data, *gen],
            "--out",
            "predictions.jsonl",
            ["predictions.jsonl", "metrics.json"],
        ),
        "eval-mscxrt": (
            ["eval-mscxrt", "--csv", w["csv"], "--image-root", w["root"], *gen],
            "--out",
            "mscxrt_predictions.jsonl",
            ["mscxrt_predictions.jsonl", "mscxrt.json", "unparsed.jsonl"],
        ),
        "train": (
            [
                "train",
                "--config",
                REPO / "configs/apo/demo.yaml",
                "--model_name_or_path",
                model,
                "--groups_file",
                w["groups"],
                "--max_steps",
                8,
                "--save_strategy",
                "steps",
                "--save_steps",
                1,
                "--save_total_limit",
                2,
                "--lora_dropout",
                0.1,
                "--learning_rate",
                1e-3,
                "--merge_on_save",
                "false",
                "--resume",
            ],
            "--output_dir",
            None,
            None,
        ),
    }
    # the same run with reference log-probs precomputed into OUTPUT_DIR/ref_cache first (killed there too)
    specs["train-ref"] = ([*specs["train"][0], "--precompute_ref", "true"], "--output_dir", None, None)
    return specs


def records_file(out, inner):
    return Path(out) / inner if inner else Path(out)


def same_adapter(a, b) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(Path(a) / "adapter_model.safetensors")), load_file(str(Path(b) / "adapter_model.safetensors"))
    return x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-6) for k in x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--work", default="/tmp/apo-soak", help="scratch folder (emptied first)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=12)
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    rng = random.Random(args.seed)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "soak.log"

    from apo.world.tiny import build_tiny_model

    model = build_tiny_model(work / "model", seed=0)
    w = build(work / "world", n_cases=args.cases, n_pairs=args.cases)
    specs = stage_specs(w, model, work)
    refs, durations = {}, {}
    for s in stages:
        argv, flag, inner, _ = specs[s]
        out = work / "ref" / (s + (".jsonl" if inner is None and not s.startswith("train") else ""))
        out.parent.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        rc = run_apo([*argv, flag, out], log)
        durations[s] = time.monotonic() - t
        if rc != 0:
            sys.exit(f"reference run of {s} failed (rc {rc}); see {log}")
        refs[s] = out
        print(f"reference {s}: {durations[s]:.1f} s", flush=True)

    stats = {s: Counter() for s in stages}
    failures = []
    deadline = time.monotonic() + 60 * args.minutes
    round_ = 0
    while time.monotonic() < deadline:
        round_ += 1
        s = rng.choice(stages)
        argv, flag, inner, compare = specs[s]
        out = work / "runs" / f"{round_}-{s}" / ("out.jsonl" if inner is None and not s.startswith("train") else "out")
        out.parent.mkdir(parents=True, exist_ok=True)
        train = s.startswith("train")
        rec = None if train else records_file(out, inner)
        n = 0 if train else complete_lines(records_file(refs[s], inner))
        try:
            for _ in range(rng.randint(1, 4)):
                if not train and rng.random() < 0.5 and complete_lines(rec) < n - 1:
                    k = complete_lines(rec) + rng.randint(1, max(1, n - 1 - complete_lines(rec)))
                    when, how = after_records(rec, k), f"after {k} records"
                else:
                    d = rng.uniform(0, durations[s])
                    when, how = after_seconds(d), f"after {d:.2f} s"
                r = kill_when([*argv, flag, out], when, log)
                stats[s]["runs"] += 1
                stats[s]["kills landed" if r["killed"] else "finished before the kill"] += 1
                if train:
                    cache = out / "ref_cache"
                    for f in cache.glob("ref_logps.*.jsonl") if cache.is_dir() else []:
                        partial_keys(f, key="key")  # the reference cache: whole, distinct records too
                else:
                    partial_keys(rec)  # raises on a broken or duplicated record
                    if r["killed"] and rec.exists() and rng.random() < 0.3:
                        tear(rec)
                        stats[s]["torn lines injected"] += 1
                print(
                    f"[{round_}] {s}: kill {how}: {'killed' if r['killed'] else 'finished'} at {r['at']:.2f} s",
                    flush=True,
                )
            rc = run_apo([*argv, flag, out], log)
            if rc != 0:
                raise AssertionError(f"final run exited {rc}")
            if train:
                ok = same_adapter(out, refs[s])
            else:
                ok = all(records_file(out, f).read_bytes() == records_file(refs[s], f).read_bytes() for f in compare)
                keys = partial_keys(rec)
                ok = ok and len(keys) == len(set(keys)) == n
            if not ok:
                raise AssertionError("final output differs from the uninterrupted run")
            stats[s]["chains ok"] += 1
        except (AssertionError, ValueError, KeyError) as e:  # ValueError/KeyError: a record that does not parse
            stats[s]["chains FAILED"] += 1
            failures.append(f"round {round_} {s}: {e.__class__.__name__}: {e} (kept in {out.parent})")
            print(f"[{round_}] {s}: FAILED: {e}", flush=True)
            continue
        shutil.rmtree(out.parent, ignore_errors=True)

    print(f"\nsoak: {round_} rounds in {args.minutes:g} min (log: {log})")
    for s in stages:
        print(f"  {s:<12} " + ", ".join(f"{k} {v}" for k, v in sorted(stats[s].items())))
    for f in failures:
        print("  " + f)
    print("soak: " + ("FAILED" if failures else "all invariants held"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
