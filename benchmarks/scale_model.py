"""Memory and time model of a full CXR-MAX run with Qwen2.5-VL-7B, N = 7, derived from measured figures.

    python benchmarks/scale_model.py                    # 4 x H100, the paper's recipe, figures of RESULTS.md
    python benchmarks/scale_model.py --gpus 8 --apo-s-per-group 1.238 --image-tokens 1024

Parameter counts are exact: the model is instantiated from the released 7B configuration on the `meta` device (no
weights, no download) and the LoRA adapter is built on it with PEFT, as `apo train` builds it. Memory per GPU is
then bytes per parameter x sharding (ZeRO-2 shards gradients and optimizer states, ZeRO-3 also the weights) plus
activations measured on an H100 (`bench_apo.py --device cuda --model-config 7b`, benchmarks/RESULTS.md) and scaled
by tokens per group. Time per stage = measured seconds per unit x units / GPUs, scaled linearly by tokens; where
no measurement exists (ms-swift SFT on a GPU, vLLM) the figure is a FLOP estimate at an assumed MFU, and is
labelled so. The printed markdown is what README's "Scale" section quotes.
"""

from __future__ import annotations

import argparse
import math

# Qwen2.5-VL-7B-Instruct config.json (the sizes bench_apo.py's "7b" uses)
TEXT_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
)
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
CXR_MAX_TRAJECTORIES = 170_982  # CXR-MAX as the paper describes it: 7 teachers' trajectories
GiB = 1024**3


def count_parameters(lora_r: int = 8, lora_alpha: int = 32) -> dict:
    """Exact counts for 7B: all, vision tower, and the LoRA adapter APO trains (language model's linear layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from apo.trainer.trainer import lora_targets

    hd = TEXT_7B["hidden_size"] // TEXT_7B["num_attention_heads"]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            **TEXT_7B,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [hd // 8, 3 * hd // 16, 3 * hd // 16],
            },
        ),
        vision_config=dict(
            **VISION_7B,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
        total = sum(p.numel() for p in model.parameters())
        vision = sum(p.numel() for p in model.model.visual.parameters())
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora_r, lora_alpha=lora_alpha, task_type="CAUSAL_LM", target_modules=lora_targets(model, "all-linear")
            ),
        )
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "vision": vision, "lora": lora}


def memory_per_gpu(counts: dict, gpus: int, stage: int, act_gib: float) -> dict:
    """GiB per GPU: bf16 frozen weights; LoRA weights, grads and Adam moments in fp32 (PEFT keeps adapters fp32);
    ZeRO-2 shards grads + moments over the GPUs, ZeRO-3 shards the weights too (plus ~2 layers gathered at a time)."""
    layer = (counts["total"] - counts["vision"]) / TEXT_7B["num_hidden_layers"]
    weights = 2 * counts["total"] / (gpus if stage == 3 else 1) + (2 * 2 * layer if stage == 3 else 0)
    lora_w, lora_states = 4 * counts["lora"], (4 + 8) * counts["lora"]  # fp32 grad + Adam m, v
    states = lora_states / (gpus if stage >= 2 else 1)
    parts = {"weights": weights / GiB, "adapter + grads + Adam": (lora_w + states) / GiB, "activations": act_gib}
    parts["total"] = sum(parts.values())
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--gpu-gib", type=float, default=80, help="memory per GPU (H100 SXM: 80)")
    ap.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak per GPU (H100 SXM: 989)")
    ap.add_argument("--cases", type=int, default=round(CXR_MAX_TRAJECTORIES / 7), help="groups (CXR-MAX: ~24.4k)")
    ap.add_argument("--negatives", type=int, default=7)
    ap.add_argument("--epochs", type=float, default=1)
    # token shape of a group; defaults = the measured 7B benchmark's data (RESULTS.md)
    ap.add_argument("--image-tokens", type=int, default=256, help="per image (448x448 = 256; MAX_PIXELS sets it)")
    ap.add_argument("--prompt-tokens", type=int, default=30, help="text tokens of the prompt, image excluded")
    ap.add_argument("--answer-tokens", type=int, default=136, help="mean tokens of one trajectory")
    # measured (H100, 7B shapes, bench_apo.py): seconds per group at the benchmark's shape, and the peaks
    ap.add_argument(
        "--apo-s-per-group",
        type=float,
        default=0.595,
        help="measured APO step per group (4 groups/step, grad ckpt: 0.595; 1 group/step: 1.238)",
    )
    ap.add_argument("--apo-1group-s", type=float, default=1.238, help="measured APO, 1 group per step")
    ap.add_argument(
        "--pairs-s-per-group",
        type=float,
        default=5.178,
        help="measured pairwise DPO (the published recipe's computation) per group's N pairs, 1 group "
        "per step (APO at the same setting: 1.238)",
    )
    ap.add_argument(
        "--apo-peak-gib",
        type=float,
        default=18.9,
        help="measured peak (torch.cuda.max_memory_allocated) at 1 group/step with grad ckpt, one GPU; "
        "what is not weights or adapter state is activations + workspace, scaled per group",
    )
    ap.add_argument("--groups-per-gpu-step", type=int, default=2, help="the paper's per-device batch")
    ap.add_argument(
        "--decode-ms",
        type=float,
        default=35.0,
        help="measured 7B decode step at batch 16 with 2k-token prompts (H100, HF generate)",
    )
    ap.add_argument("--consensus-batch", type=int, default=16)
    ap.add_argument("--consensus-new-tokens", type=int, default=300, help="mean consensus answer length")
    ap.add_argument("--assumed-mfu", type=float, default=0.35, help="for the unmeasured SFT / prefill estimates")
    a = ap.parse_args(argv)

    c = count_parameters()
    P = a.image_tokens + a.prompt_tokens
    group_tokens = P + (1 + a.negatives) * a.answer_tokens
    bench_tokens = 286 + 8 * 136  # the shape the seconds were measured at
    scale = group_tokens / bench_tokens
    one_gpu = memory_per_gpu(c, 1, 0, 0.0)
    act = (a.apo_peak_gib - one_gpu["total"]) * scale * a.groups_per_gpu_step

    print(
        f"Qwen2.5-VL-7B: {c['total'] / 1e9:.2f}B parameters ({c['vision'] / 1e9:.2f}B vision); "
        f"APO LoRA r8 on the language model's linear layers: {c['lora'] / 1e6:.1f}M trainable"
    )
    print(
        f"group: prompt {P} tokens (image {a.image_tokens}) + {1 + a.negatives} answers x {a.answer_tokens} = "
        f"{group_tokens} packed tokens ({scale:.2f}x the measured shape); as {a.negatives} DPO pairs: "
        f"{a.negatives * (2 * P + 2 * a.answer_tokens)} tokens\n"
    )

    print(
        f"| per GPU, {a.gpus} GPUs, {a.groups_per_gpu_step} groups/step, grad ckpt | weights | adapter+grads+Adam "
        f"| activations | total | fits {a.gpu_gib:.0f} GiB |"
    )
    print("|---|---|---|---|---|---|")
    for name, stage in (("DDP", 0), ("ZeRO-2", 2), ("ZeRO-3", 3)):
        m = memory_per_gpu(c, a.gpus, stage, act)
        print(
            f"| {name} | {m['weights']:.1f} GiB | {m['adapter + grads + Adam']:.2f} GiB | {m['activations']:.1f} GiB "
            f"| {m['total']:.1f} GiB | {'yes' if m['total'] < a.gpu_gib * 0.9 else 'no'} |"
        )

    n = a.cases * a.epochs
    apo_h = n * a.apo_s_per_group * scale / a.gpus / 3600
    decode_h = math.ceil(a.cases / a.consensus_batch) * a.consensus_new_tokens * a.decode_ms / 1000 / a.gpus / 3600
    active = c["total"] - c["vision"]
    cons_prompt = P + a.negatives * a.answer_tokens + 120  # the 7 trajectories + instructions in context
    prefill_h = 2 * active * cons_prompt * a.cases / (a.peak_tflops * 1e12 * a.assumed_mfu) / a.gpus / 3600
    sft_tokens = CXR_MAX_TRAJECTORIES / 7 * a.negatives * (P + a.answer_tokens)
    sft_h = (
        6 * active * sft_tokens / (a.peak_tflops * 1e12 * a.assumed_mfu) / a.gpus / 3600
    )  # fwd + act-grad + recompute
    print(f"\n| stage, full CXR-MAX on {a.gpus} GPUs | hours | from |")
    print("|---|---|---|")
    print(
        f"| 1 SFT (ms-swift, {sft_tokens / 1e6:.0f}M tokens, LoRA, grad ckpt) | {sft_h:.1f} | estimate: 6 x "
        f"{active / 1e9:.1f}B x tokens at {a.assumed_mfu:.0%} MFU (not measured) |"
    )
    print(
        f"| 2 consensus, decode ({a.consensus_new_tokens} tokens/answer, batch {a.consensus_batch}) | "
        f"{decode_h:.1f} | measured {a.decode_ms:.0f} ms/step (HF generate, H100) |"
    )
    print(
        f"| 2 consensus, prefill ({cons_prompt} tokens/case) | {prefill_h:.2f} | estimate at {a.assumed_mfu:.0%} MFU |"
    )
    print(
        f"| 3 APO ({n:.0f} groups, reference pass included) | {apo_h:.1f} | measured {a.apo_s_per_group} s/group "
        f"x {scale:.2f} (tokens) |"
    )
    print(f"| total | {sft_h + decode_h + prefill_h + apo_h:.1f} | |")
    pairs_h = n * a.pairs_s_per_group * scale / a.gpus / 3600
    apo1_h = n * a.apo_1group_s * scale / a.gpus / 3600
    print(f"| (3 APO at 1 group/step) | {apo1_h:.1f} | measured {a.apo_1group_s} s/group |")
    print(
        f"| (3 as pairwise DPO, the published recipe: {n * a.negatives:.0f} pairs) | {pairs_h:.1f} | measured "
        f"{a.pairs_s_per_group} s per group's pairs at 1 group/step (APO there: {a.apo_1group_s} s) |"
    )
    return {
        "params": c,
        "apo_hours": apo_h,
        "pairs_hours": pairs_h,
        "consensus_hours": decode_h + prefill_h,
        "sft_hours": sft_h,
    }


if __name__ == "__main__":
    main()
