"""The tiny Qwen2.5-VL: real classes, loads back, trains, generates, deterministic by seed, and ms-swift reads it."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from apo.world.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_model


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _image(synth_dir) -> Image.Image:
    row = json.loads((Path(synth_dir) / "cxrmax_train.jsonl").read_text().splitlines()[0])
    return Image.open(Path(synth_dir) / row["image"]).convert("RGB")


def _messages(answer=None):
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {
                    "type": "text",
                    "text": "What findings on this chest X-ray support the diagnosis of pleural effusion?",
                },
            ],
        }
    ]
    if answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    return AutoProcessor.from_pretrained(tiny_model_dir), Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir
    )


def test_loads_with_the_auto_classes(tiny_model_dir, loaded):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    processor, model = loaded
    assert isinstance(processor, Qwen2_5_VLProcessor) and type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), Qwen2_5_VLForConditionalGeneration)
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))  # appended after the BPE, in Qwen's order
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.text_config.vocab_size >= len(tok) and 1000 <= len(tok) <= 2200
    assert sum(model.config.text_config.rope_parameters["mrope_section"]) * 2 == 64 // 4  # head_dim / 2
    assert processor.chat_template == CHAT_TEMPLATE


def test_tokenizer_speaks_radiology_and_round_trips_any_text(loaded):
    tok = loaded[0].tokenizer
    for word in ("pneumothorax", "effusion", "cardiomegaly", "atelectasis", "consolidation", "costophrenic"):
        assert len(tok.tokenize(" " + word)) == 1, (word, tok.tokenize(" " + word))
    report = "FINDINGS: There is a small left pleural effusion. No pneumothorax. IMPRESSION: Left pleural effusion."
    assert len(tok(report).input_ids) < 0.3 * len(report)
    for text in (report, "Ünïcödé ✓ 胸部X线 — tabs\tand\nnewlines", "<|im_start|>user\nhi<|im_end|>"):
        assert tok.decode(tok(text).input_ids) == text
    assert tok("<|image_pad|>").input_ids == [tok.convert_tokens_to_ids("<|image_pad|>")]


def test_forward_backward_with_an_image_through_the_chat_template(loaded, synth_dir):
    processor, model = loaded
    text = processor.apply_chat_template(
        _messages("Blunted left costophrenic angle: left pleural effusion."), tokenize=False
    )
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What findings"
    )
    batch = processor(text=[text], images=[_image(synth_dir)], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112x112 -> 8x8 patches
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 16  # 2x2 merge
    torch.manual_seed(0)
    model.train()
    model.zero_grad()
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and 5 < out.loss.item() < 10  # ~ln(vocab) at random init
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("model.visual") and g.abs().sum() > 0 for n, g in grads.items())  # the image matters
    assert any("language_model" in n and g.abs().sum() > 0 for n, g in grads.items())
    model.eval()


def test_generate_appends_tokens(loaded, synth_dir):
    processor, model = loaded
    prompt = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    batch = processor(text=[prompt], images=[_image(synth_dir)], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 6
    assert isinstance(processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :]), str)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir, tmp_path):
    state = torch.random.get_rng_state()
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert _digest(again) == _digest(tiny_model_dir)
    other = _digest(build_tiny_model(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != _digest(tiny_model_dir)["model.safetensors"]
    assert other["tokenizer.json"] == _digest(tiny_model_dir)["tokenizer.json"]  # the tokenizer does not depend on it


SWIFT_CHECK = """
import runpy, sys
import torch
from PIL import Image
from swift.model import get_processor
from swift.template import get_template
from transformers import AutoProcessor

model_dir, image_path = sys.argv[1], sys.argv[2]
runpy.run_path(model_dir + "/swift_plugin.py")
template = get_template(get_processor(model_dir, model_type="qwen2_5_vl", use_hf=True), template_type="qwen2_5_vl")
template.set_mode("train")
question = "What findings on this chest X-ray support the diagnosis of pleural effusion?"
enc = template.encode({"messages": [{"role": "user", "content": "<image>" + question},
                                    {"role": "assistant", "content": "Left pleural effusion."}],
                       "images": [image_path]})
processor = AutoProcessor.from_pretrained(model_dir)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Left pleural effusion."}]}]
ref = processor(text=[processor.apply_chat_template(messages, tokenize=False)],
                images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
assert enc["input_ids"] == ref["input_ids"][0].tolist(), (len(enc["input_ids"]), ref["input_ids"].shape)
assert torch.equal(enc["image_grid_thw"], ref["image_grid_thw"])
assert torch.allclose(enc["pixel_values"], ref["pixel_values"], atol=1e-5)
print("OK", len(enc["input_ids"]))
"""


def test_ms_swift_encodes_like_the_processor(tiny_model_dir, synth_dir, tmp_path):
    """ms-swift's qwen2_5_vl template (with the plugin written next to the model) gives the same ids and pixels.
    In a fresh process: ms-swift keeps template state per process, and the plugin must be loaded before it."""
    import subprocess
    import sys

    image_path = tmp_path / "x.png"
    _image(synth_dir).save(image_path)
    r = subprocess.run(
        [sys.executable, "-c", SWIFT_CHECK, str(tiny_model_dir), str(image_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_cli(tmp_path, capsys):
    from apo.cli import main

    assert main(["tiny-model", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert "wrote tiny Qwen2.5-VL" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "swift_plugin.py"} <= set(_digest(tmp_path / "m"))
