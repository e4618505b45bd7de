"""benchmarks/scale_model.py: the parameter counts it builds the README's scale model on are exact."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import scale_model as S  # noqa: E402


def test_counts_and_memory_model():
    c = S.count_parameters()
    assert c["total"] == 8_292_166_656  # Qwen2.5-VL-7B-Instruct's published size (model card: 8.29B)
    h, f, kv = 3584, 18944, 4 * 128  # LoRA r8 on q,k,v,o,gate,up,down of 28 layers: r * (in + out) each
    assert c["lora"] == 28 * 8 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + f) + (f + h))
    z2, z3 = S.memory_per_gpu(c, 4, 2, 5.0), S.memory_per_gpu(c, 4, 3, 5.0)
    assert abs(z2["weights"] - 2 * c["total"] / 2**30) < 1e-9  # ZeRO-2 keeps every weight on every GPU
    assert z3["weights"] < z2["weights"] / 3 and z3["total"] < z2["total"]
    assert S.memory_per_gpu(c, 4, 0, 5.0)["adapter + grads + Adam"] > z2["adapter + grads + Adam"]


def test_time_model_scales_with_gpus_and_tokens(capsys):
    four, eight = S.main([]), S.main(["--gpus", "8"])
    assert abs(four["apo_hours"] / eight["apo_hours"] - 2) < 1e-9
    assert four["pairs_hours"] > 3 * four["apo_hours"]
    longer = S.main(["--answer-tokens", "272"])
    assert longer["apo_hours"] > 1.5 * four["apo_hours"]
    assert "| ZeRO-3 |" in capsys.readouterr().out
