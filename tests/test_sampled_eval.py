"""Sampled drift evaluation: seeded sampling in generate(), eval-report --num-samples (reproducible, resumable),
greedy vs sampled drift_rates and teacher-signature copy rates in metrics.json."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from apo.cli import main


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from apo.model.generation import load_model

    return load_model(tiny_model_dir)


def _requests(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(112, 112), (200, 150), (84, 140)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((rng.random((h, w)) * 255).astype("uint8")).save(paths[-1])
    return [
        ([paths[0]], "Is there an effusion?"),
        ([paths[1], paths[2]], "Compare the two studies, please."),
        ([], "No image here."),
        ([paths[2]], "Describe the findings in detail, with their sides."),
        ([paths[1]], "x"),
    ]


def test_seeded_sampling_is_per_request_and_greedy_is_unchanged(tmp_path, tiny):
    import torch

    from apo.model.generation import generate, sample_seed

    model, processor = tiny
    reqs = _requests(tmp_path)
    kw = dict(max_new_tokens=10, progress=False)
    seeds = [sample_seed(0, f"case{i}", 0) for i in range(len(reqs))]
    # greedy: the sampling arguments are ignored, and the answers are transformers' own greedy search
    greedy = generate(model, processor, reqs, batch_size=3, **kw)
    assert generate(model, processor, reqs, batch_size=3, temperature=0.3, seeds=seeds, **kw) == greedy
    reference = generate(model, processor, reqs[:1], batch_size=1, fast=False, **kw)
    assert reference == greedy[:1]
    # sampled: each request's answer depends on its seed only, not on the batch it shares or its position
    a = generate(model, processor, reqs, batch_size=3, greedy=False, seeds=seeds, **kw)
    one = [generate(model, processor, [r], batch_size=1, greedy=False, seeds=[s], **kw)[0] for r, s in zip(reqs, seeds)]
    rev = generate(model, processor, reqs[::-1], batch_size=2, greedy=False, seeds=seeds[::-1], **kw)
    assert a == one == rev[::-1]
    assert a != greedy  # temperature 1 on a random model: not the argmax
    other = generate(model, processor, reqs, batch_size=3, greedy=False, seeds=[s + 1 for s in seeds], **kw)
    assert sum(x != y for x, y in zip(a, other)) >= 3
    # near-zero temperature: the draws collapse onto the greedy answer
    assert generate(model, processor, reqs, batch_size=3, greedy=False, temperature=1e-4, seeds=seeds, **kw) == greedy
    assert sample_seed(0, "case0", 0) == sample_seed(0, "case0", 0) != sample_seed(0, "case0", 1)
    assert sample_seed(0, "case0", 0) != sample_seed(1, "case0", 0) and 0 <= sample_seed(7, "x", 3) < 2**63
    with pytest.raises(ValueError, match="seeds for"):
        generate(model, processor, reqs, greedy=False, seeds=seeds[:2], **kw)
    torch.manual_seed(0)  # unseeded sampling still works (transformers' sampler)
    assert len(generate(model, processor, reqs[:2], greedy=False, **kw)) == 2


def test_eval_report_sampled_drift_reproducible_resumable(tmp_path, tiny_model_dir, synth_dir, monkeypatch):
    import apo.evaluation.metrics

    monkeypatch.setattr(apo.evaluation.metrics, "nlg_scores", lambda r, h: {"BLEU-1": 0.0})  # METEOR's JVM: ~15 s
    args = [
        "eval-report",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(synth_dir / "cxrmax_test.jsonl"),
        "--limit",
        "4",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "3",
        "--num-samples",
        "3",
        "--signatures-from",
        str(synth_dir / "cxrmax_train.jsonl"),
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    samples_a = (tmp_path / "a" / "samples.jsonl").read_bytes()
    assert samples_a == (tmp_path / "b" / "samples.jsonl").read_bytes()  # same command, fresh folder: same bytes
    recs = [json.loads(l) for l in samples_a.decode().splitlines()]
    assert len(recs) == 4 and all(len(r["samples"]) == 3 and r["seed"] == 0 and r["temperature"] == 1.0 for r in recs)
    assert all(len(set(r["samples"])) > 1 for r in recs)  # K independent draws, not one answer repeated
    preds = [json.loads(l)["prediction"] for l in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    assert all(p not in r["samples"] for p, r in zip(preds, recs))  # greedy predictions are kept apart

    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    names = {"refusal", "hedge", "wrong_side", "hallucination", "omission"}
    assert set(m["drift_rates"]) == {"greedy", "sampled"}
    assert set(m["drift_rates"]["greedy"]) == set(m["drift_rates"]["sampled"]) == names
    assert m["drift_rates"]["greedy"]["omission"] == m["drift"]["omission_rate"]
    assert m["sampling"] == {"num_samples": 3, "temperature": 1.0, "seed": 0}
    from apo.data import load_cases
    from apo.evaluation.report import sampled_drift_rates

    cases = load_cases(synth_dir / "cxrmax_test.jsonl", verify_images="none")[:4]
    assert m["drift_rates"]["sampled"] == sampled_drift_rates(cases, {r["case_id"]: r["samples"] for r in recs})
    sig = m["signature"]
    assert set(sig) == {"source", "phrases", "own", "greedy", "sampled"}
    assert sig["phrases"]["Moonshot-v1"] and any("cannot provide" in p for p in sig["phrases"]["Moonshot-v1"])
    assert sig["own"]["Claude-Sonnet-4"] > 0.5 and set(sig["greedy"]) == set(sig["phrases"])
    assert all(v in (None, 0.0) for v in sig["sampled"].values())  # a random model copies no teacher's wording

    # a different seed draws other samples; the greedy predictions stay the same
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    samples_c = [json.loads(l) for l in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    assert sum(x["samples"] != y["samples"] for x, y in zip(recs, samples_c)) >= 3
    assert (tmp_path / "c" / "predictions.jsonl").read_bytes() == (tmp_path / "a" / "predictions.jsonl").read_bytes()

    # resume: cut the file after 2 cases plus a torn line; the rerun draws the missing cases as run A did
    shutil.copytree(tmp_path / "a", tmp_path / "r")
    lines = samples_a.splitlines(keepends=True)
    (tmp_path / "r" / "samples.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][:20])
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "samples.jsonl").read_bytes() == samples_a
    # resuming with other sampling settings stops instead of mixing samples
    assert main([*args, "--temperature", "0.5", "--out", str(tmp_path / "r")]) == 2
    assert main([*args, "--num-samples", "0", "--out", str(tmp_path / "r")]) == 0  # greedy only: samples ignored
    m0 = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m0["drift_rates"]["sampled"] is None and m0["drift_rates"]["greedy"] == m["drift_rates"]["greedy"]


def test_eval_report_sampling_flags_are_checked(tmp_path, tiny_model_dir, synth_dir, capsys):
    base = ["eval-report", "--model", str(tiny_model_dir), "--dataset", str(synth_dir / "cxrmax_test.jsonl")]
    assert main([*base, "--num-samples", "-1", "--out", str(tmp_path / "x")]) == 2
    assert main([*base, "--num-samples", "2", "--temperature", "0", "--out", str(tmp_path / "x")]) == 2
    assert main([*base, "--signatures-from", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--num-samples" in err and "--temperature" in err and "nope.jsonl" in err
