"""Stage 1 for real: scripts/SFT-Qwen2.5.sh runs `swift sft` on the tiny model, the loss falls, LoRA weights move,
and the merged model loads with from_pretrained."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sft_launcher_trains_lora(tmp_path, tiny_model_dir, synth_dir):
    from safetensors.torch import load_file

    from apo.cli import main

    sft_rows = tmp_path / "sft.jsonl"
    assert main(["prepare-sft", "--dataset", str(synth_dir / "cxrmax_train.jsonl"), "--out", str(sft_rows)]) == 0
    out = tmp_path / "sft"
    env = {
        **os.environ,
        "MODEL": str(tiny_model_dir),
        "DATASET": str(sft_rows),
        "OUTPUT_DIR": str(out),
        "TORCH_DTYPE": "float32",
        "BATCH_SIZE": "4",
        "GRAD_ACC": "1",
        "LEARNING_RATE": "1e-2",
        "LORA_RANK": "16",
        "LORA_ALPHA": "32",
        "MAX_STEPS": "12",
        "SAVE_STEPS": "12",
        "LOGGING_STEPS": "1",
        "MAX_LENGTH": "1024",
        "GRADIENT_CHECKPOINTING": "true",
        "DATALOADER_WORKERS": "0",
        "REPORT_TO": "none",
        "MERGE_LORA": "true",
        "WARMUP_RATIO": "0",
    }
    r = subprocess.run(
        ["bash", str(ROOT / "scripts/SFT-Qwen2.5.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    logs = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    losses = [float(x["loss"]) for x in logs if "loss" in x]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it learns

    # LoRA B starts at zero: every B that is non-zero now was moved by gradients (also through checkpointing).
    adapter = load_file(out / "last" / "adapter_model.safetensors")
    b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert b and all(v.abs().sum() > 0 for v in b.values())
    assert any("language_model" in k and "mlp" in k for k in b) and not any("visual" in k for k in b)  # freeze_vit

    # ms-swift encoded 16 image tokens per image (the tiny model's plugin): no silently collapsed images.
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    merged = out / "merged"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged)
    AutoProcessor.from_pretrained(merged)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    name = next(n for n, _ in base.named_parameters() if "layers.0.mlp.down_proj" in n)
    assert not base.get_parameter(name).equal(model.get_parameter(name))
