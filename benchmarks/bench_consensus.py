"""Consensus generation (stage 2): batched generation with the KV cache vs a per-case loop, same model, same cases.

    python benchmarks/bench_consensus.py                          # CPU, tiny model, 32 synthetic cases: ~30 s
    python benchmarks/bench_consensus.py --model-config small --cases 16 --max-new-tokens 64   # weight-bound CPU
    python benchmarks/bench_consensus.py --device cuda --model-dir DIR --cases 256 --batch-size 32
    python benchmarks/bench_consensus.py --device cuda --model-dir DIR --backends loop,batched,vllm   # + vLLM

Every variant runs `apo.consensus.model_records` - the code `apo consensus --strategy model` runs - on the same
cases (image + question + the 7 teacher trajectories, fitted to --max-length), greedy, --max-new-tokens each:
  loop      one case per generate() call (batch size 1, KV cache): what a per-case script does;
  unsorted  --batch-size cases per call in input order (left padding to the longest prompt of the batch);
  batched   --batch-size cases per call, longest prompts first (what `apo consensus` does): less padding;
  defaults  as batched, with transformers' own KV cache and attention kernel instead of apo.model.decoding's:
            what apo.model.decoding adds (on CUDA it is off unless --fast on, so there batched == defaults);
  vllm      the same requests through `--backend vllm` (GPU, vLLM installed; continuous batching).
Every variant (loop, unsorted, batched) runs the same `apo.model.generation.generate` code, apo.model.decoding's fast
path included. Time: wall clock around each variant's calls, after warm-up calls; with --repeat R the variants take
turns R times (A B C A B C ...) and each keeps its median; the model is loaded once, outside. The
cases are the synthetic CXR-MAX of `apo synth` (or --dataset), the model apo.world.tiny's random tiny Qwen2.5-VL (or
--model-dir): generation then often runs to --max-new-tokens (a random model rarely says <|im_end|>), the same
work for every variant. Outputs are compared with the loop's (greedy: the same text unless padding changes a
near-tie in fp arithmetic). The last line printed is one JSON object with `speedup_batched_vs_loop`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(a, work: Path):
    """(cases, model folder): synthetic data and the tiny model unless given."""
    from apo.data import load_cases

    dataset = a.dataset
    if dataset is None:
        from apo.world.synth import generate as synth

        synth(work / "data", cases=max(a.cases * 2, 10), seed=a.seed)
        dataset = work / "data" / "cxrmax_train.jsonl"
    cases = [c for c in load_cases(dataset) if c.trajectories][: a.cases]
    if len(cases) < a.cases:
        sys.exit(f"{dataset}: only {len(cases)} cases with trajectories, --cases {a.cases} asked")
    model_dir = a.model_dir
    if model_dir is None:
        from apo.world.tiny import build_tiny_model

        model_dir = build_tiny_model(work / "model", seed=a.seed)
        if a.model_config != "tiny":  # random weights of bench_apo's sizes, the tiny tokenizer and processor
            from transformers import AutoProcessor

            from benchmarks.bench_apo import random_model

            out = work / f"model_{a.model_config}"
            proc = AutoProcessor.from_pretrained(model_dir)
            random_model(
                {"model_config": a.model_config, "device": "cpu", "attn": "sdpa"}, proc.tokenizer
            ).save_pretrained(out)
            proc.save_pretrained(out)
            model_dir = out
    return cases, str(model_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="per answer (consensus answers: hundreds)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument(
        "--backends", default="loop,unsorted,batched,defaults", help="comma list of loop,unsorted,batched,defaults,vllm"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--model-dir", default=None, help="a local Qwen2.5-VL folder (default: built here, see --model-config)"
    )
    ap.add_argument(
        "--model-config",
        default="tiny",
        choices=["tiny", "small", "3b", "7b"],
        help="without --model-dir: apo.world.tiny's model (64 wide, 2 layers: per-step overhead-bound), or "
        "random weights of bench_apo's sizes (small: 256 wide, 4 layers, Qwen's 152k vocabulary; "
        "weight-bandwidth-bound like a real model)",
    )
    ap.add_argument("--dataset", default=None, help="CXR-MAX-format cases (default: `apo synth` output, built here)")
    ap.add_argument(
        "--fast",
        choices=["auto", "on"],
        default="auto",
        help="apo.model.decoding in loop/unsorted/batched: auto = what `apo consensus` does (on CPU only), "
        "on = on any device (to check it on a GPU against `defaults`)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (each times every variant once); the median counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="keep the work folder here")
    a = ap.parse_args(argv)

    import torch

    from apo.consensus import model_records
    from apo.model.loading import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = set(backends) - {"loop", "unsorted", "batched", "defaults", "vllm"}
    if unknown:
        sys.exit(f"--backends: unknown {sorted(unknown)}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_consensus_"))
    work.mkdir(parents=True, exist_ok=True)
    cases, model_dir = prepare(a, work)

    import apo.model.generation as G

    results, texts, times, prompt_tokens = {}, {}, {}, []
    runs = {}  # name -> callable giving the records
    model = plain = None
    if set(backends) - {"vllm"}:
        model, processor = load_model(model_dir, device=a.device, dtype=a.dtype)

        def records(cs, bs, net=model, **kw):
            kw.setdefault("fast", None if a.fast == "auto" else True)
            original = G.generate  # model_records calls apo.model.generation.generate: pass the variant's options on
            G.generate = lambda *x, **k: original(*x, **k, **kw)
            try:
                return model_records(net, processor, cs, a.max_length, a.max_new_tokens, bs)
            finally:
                G.generate = original

        for name in backends:
            if name == "loop":
                runs[name] = lambda: [r for c in cases for r in records([c], 1)]
            elif name == "unsorted":
                runs[name] = lambda: records(cases, a.batch_size, sort_by_length=False)
            elif name == "batched":
                runs[name] = lambda: records(cases, a.batch_size)
            elif name == "defaults":  # a model of its own: the fast path switches the model it runs on
                plain, _ = load_model(model_dir, device=a.device, dtype=a.dtype)
                runs[name] = lambda: records(cases, a.batch_size, net=plain, fast=False)
        records(cases[:1], 1)  # warm-up: kernels, allocator, tokenizer caches
        records(cases[:2], 2)
        if "defaults" in runs:
            records(cases[:2], 2, net=plain, fast=False)

    def time_rounds(runs):
        nonlocal prompt_tokens
        for _ in range(a.repeat):  # rounds: every variant once per round, so a noisy minute hits them all alike
            for name, run in runs.items():
                t = time.perf_counter()
                recs = run()
                times.setdefault(name, []).append(time.perf_counter() - t)
                texts[name] = [r["text"] for r in recs]
                prompt_tokens = [r["prompt_tokens"] for r in recs]

    time_rounds(runs)
    if "vllm" in backends:  # after the others, their models freed: vLLM takes most of a GPU's memory
        from apo.model.generation import VllmEngine

        runs.clear()
        model = plain = None
        engine = VllmEngine(model_dir, max_model_len=a.max_length, dtype=a.dtype)
        vllm_records = lambda cs: model_records(
            engine, engine.processor, cs, a.max_length, a.max_new_tokens, a.batch_size
        )
        vllm_records(cases[:2])
        time_rounds({"vllm": lambda: vllm_records(cases)})
    for name, ts in times.items():
        sec = statistics.median(ts)
        results[name] = {
            "seconds": round(sec, 3),
            "cases_per_s": round(len(cases) / sec, 3),
            "all_seconds": [round(t, 3) for t in ts],
        }
        print(f"{name:9s} {sec:8.2f} s  {len(cases) / sec:7.2f} cases/s", flush=True)

    base = "loop" if "loop" in texts else next(iter(texts))
    for name in texts:
        results[name]["same_text_as_" + base] = round(
            sum(x == y for x, y in zip(texts[name], texts[base])) / len(cases), 3
        )
    summary = {
        "cases": len(cases),
        "batch_size": a.batch_size,
        "max_new_tokens": a.max_new_tokens,
        "device": a.device,
        "threads": torch.get_num_threads(),
        "model": model_dir,
        "repeat": a.repeat,
        "prompt_tokens_median": statistics.median(prompt_tokens),
        "prompt_tokens_range": [min(prompt_tokens), max(prompt_tokens)],
        "torch": torch.__version__,
        "results": results,
    }
    for name in ("batched", "unsorted", "defaults", "vllm"):
        if name in results and "loop" in results:
            summary[f"speedup_{name}_vs_loop"] = round(results["loop"]["seconds"] / results[name]["seconds"], 2)
    if "batched" in results and "unsorted" in results:
        summary["speedup_sorted_vs_unsorted"] = round(results["unsorted"]["seconds"] / results["batched"]["seconds"], 2)
    if "batched" in results and "defaults" in results:
        summary["speedup_batched_vs_defaults"] = round(
            results["defaults"]["seconds"] / results["batched"]["seconds"], 2
        )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
