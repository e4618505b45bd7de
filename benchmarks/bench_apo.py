"""APO step vs the published recipe (ms-swift pairwise DPO) and TRL's DPOTrainer, on the same machine and data.

    python benchmarks/bench_apo.py --quick                      # CPU, tiny model, N=7: < 2 min
    python benchmarks/bench_apo.py --steps 20 --methods apo,plain,swift,trl
    python benchmarks/bench_apo.py --device cuda --model-config 7b --methods apo,plain,pairs   # GPU, random 7B
    python benchmarks/bench_apo.py --shape mimic --quick        # CPU, the real job's shapes: ~6 min

The same G groups {t+, t_1..t_N} are trained by
  apo    APOTrainer, packed path (apo.model.packing): one row per group, image + prompt once, ref = adapter off;
  plain  APOTrainer, plain path: 1+N padded rows per group, each with the image;
  pairs  the pairwise DPO computation in-repo (N groups of 1+1 through the plain path, dpo loss): what the recipe
         computes, for machines without ms-swift (the GPU image);
  swift  `swift rlhf --rlhf_type dpo` (the published recipe) on the N pairwise rows of each group, LoRA, ref = the
         adapter disabled as ms-swift does with LoRA;
  trl    trl.DPOTrainer on the same pairs.
Fairness: each method in its own subprocess; the same LoRA (r 8, alpha 32, dropout 0.05, the
language model's linear layers), max length, dtype, gradient checkpointing, beta, learning rate, data order
(sequential), no data-loader workers; one optimizer step = the same preferences (one group for APO, its N pairs for
DPO; `--dpo-batch` changes that). Time: a Trainer callback (the same one in every process) stamps each step's end;
time per step = the gap between consecutive step ends (data loading, forward, backward, optimizer, logging), median
after `--warmup` steps; start-up, model loading and saving are outside. Turns (`--lockstep`, on by default on CPU):
the processes start together, then take turns, one block of steps each, for `--rounds` rounds (A B A B ...; the
step after each pause is not measured); round k is the same groups for every method, so the speedup is the
median of the per-round ratios - a slow minute on a shared machine hits both sides of a ratio. On cuda the
methods run one after the other (`--repeat`: alternating runs, the fastest counts). Memory: on CPU the peak RSS
during the steps (VmHWM reset at train begin) minus the RSS at train begin = what training adds (activations, grads,
optimizer, logits); the absolute peaks are reported too. On CUDA, torch.cuda.max_memory_allocated over the steps.

The last line printed is one JSON object (speedup_vs_swift_dpo, peak_mem_ratio_vs_swift_dpo, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SENTENCES = [
    "the heart size is normal.",
    "there is a small left pleural effusion.",
    "no pneumothorax is seen.",
    "the lungs are clear.",
    "there is patchy opacity at the right base, likely atelectasis.",
    "mild pulmonary edema with vascular congestion.",
    "the cardiomediastinal silhouette is enlarged.",
    "a support device projects over the right atrium.",
    "blunting of the left costophrenic angle supports effusion.",
    "no focal consolidation to suggest pneumonia.",
    "findings support the diagnosis of atelectasis.",
    "there is no acute osseous abnormality.",
    "the right hemidiaphragm is elevated.",
]
# sentences per candidate: the consensus, then the teachers (terse .. verbose), like CXR-MAX's spread of lengths;
# x --response-scale (default 2.5: ~150 tokens per answer with apo.world.tiny's tokenizer, a reasoning trajectory;
# 1.0 ~ the demo benchmark's short synthetic answers, ~60 tokens)
LENGTHS = [5, 2, 9, 4, 12, 3, 7, 6, 10, 8]
SIZES = {  # Qwen2.5-VL text / vision sizes (config.json of the released checkpoints); "small" = a CPU-sized check
    "small": dict(
        text=dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=152064,
        ),
        vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256),
    ),
    "7b": dict(
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
    ),
    "3b": dict(
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
        ),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048),
    ),
}
H100_BF16_DENSE = 989e12


# ------------------------------------------------------------------------------------------------ data


def make_data(out: Path, n_groups: int, n_neg: int, image_size, scale: float = 2.5, seed: int = 0) -> dict:
    """groups.jsonl (apo build-pairs format) and the same preferences as pairwise rows (ms-swift DPO format).
    image_size: a side in pixels, or (width, height)."""
    import numpy as np
    from PIL import Image

    from apo.model.chat import swift_user_content

    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    groups, pairs = [], []
    for i in range(n_groups):
        img = out / "images" / f"cxr{i}.png"
        w, h = (image_size, image_size) if isinstance(image_size, int) else image_size
        yy, xx = np.mgrid[0:h, 0:w] / h
        xx = xx * h / w
        lung = lambda cx: 120 * np.exp(-((xx - cx) ** 2 + (yy - 0.5) ** 2) * 12)  # two dark lung fields
        lungs = 200 - lung(0.3) - lung(0.7)
        px = np.clip(lungs + rng.normal(0, 12, lungs.shape), 0, 255).astype(np.uint8)
        Image.fromarray(px).convert("RGB").save(img)
        text = lambda k: " ".join(
            rng.choice(SENTENCES, size=max(1, round(scale * LENGTHS[k % len(LENGTHS)])) + int(rng.integers(0, 2)))
        )
        g = {
            "case_id": f"b{i}",
            "prompt": "What findings support the diagnosis of atelectasis and pleural effusion?",
            "images": [str(img)],
            "positive": text(0),
            "negatives": [text(k + 1) for k in range(n_neg)],
            "teachers": [f"teacher{k}" for k in range(n_neg)],
        }
        groups.append(g)
        for neg in g["negatives"]:
            pairs.append(
                {
                    "messages": [
                        {"role": "user", "content": swift_user_content(1, g["prompt"])},
                        {"role": "assistant", "content": g["positive"]},
                    ],
                    "rejected_response": neg,
                    "images": g["images"],
                }
            )
    for name, rows in (("groups.jsonl", groups), ("pairs.jsonl", pairs)):
        with open(out / name, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return {"groups": str(out / "groups.jsonl"), "pairs": str(out / "pairs.jsonl")}


def token_counts(spec: dict) -> dict:
    """Per group, averaged: prompt tokens P (image included), candidate tokens C_j; the tokens the preference data
    holds as N DPO pairs (sum_i 2P + C+ + C_i), and what the packed row holds (P + sum_j C_j)."""
    from transformers import AutoProcessor

    from apo.trainer.collator import GroupCollator, load_groups

    proc = _processor(spec, AutoProcessor)
    col = GroupCollator(proc, spec["max_length"])
    rows, image_id = [], proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for g in load_groups(spec["data"]["groups"]):
        enc, resp = col.encode_group(g)
        P, C = enc["input_ids"].shape[1], [len(r) for r in resp]
        rows.append(
            {
                "pair_tokens_per_group": sum(2 * P + C[0] + c for c in C[1:]),
                "packed_tokens_per_group": P + sum(C),
                "prompt_tokens": P,
                "mean_response_tokens": sum(C) / len(C),
                "response_tokens_per_group": sum(C),
                "attn_pairs_per_group": P * P / 2 + sum(c * P + c * c / 2 for c in C),
                "image_tokens": int((enc["input_ids"] == image_id).sum()),
            }
        )
    return {k: statistics.mean(r[k] for r in rows) for k in rows[0]}


def _processor(spec, auto):
    return auto.from_pretrained(spec["model_dir"])


def prepare_model_dir(a, work: Path, methods) -> tuple[str, bool]:
    """(folder with the processor, and the weights unless the worker builds them): tiny = apo.world.tiny's model;
    3b/7b/small = random weights with those sizes, the tiny tokenizer, images of --image-size pixels."""
    from transformers import AutoProcessor

    src = a.model_dir
    if src is None:
        from apo.world.tiny import build_tiny_model

        src = build_tiny_model(work / "tiny", seed=0)
    if a.model_config == "tiny":
        return str(src), False
    out = work / f"model_{a.model_config}"
    proc = AutoProcessor.from_pretrained(src)
    ip, px = proc.image_processor, a.image_size**2  # ~ (image_size / 28)^2 image tokens
    ip.min_pixels = ip.max_pixels = px
    if isinstance(getattr(ip, "size", None), dict):
        ip.size = {"shortest_edge": px, "longest_edge": px}
    proc.save_pretrained(out)
    in_worker = a.device == "cuda" and not {"swift", "trl"} & set(methods)  # no 15 GB write + read on the GPU box
    if not in_worker:
        random_model(
            {"model_config": a.model_config, "device": "cpu", "attn": a.attn or "sdpa"}, proc.tokenizer
        ).save_pretrained(out)
    return str(out), in_worker


# ------------------------------------------------------------------------------------------------ measuring


def hold_for_turn(what: bytes):
    """Lockstep, in a worker: report `what` to the parent (b"r" start-up done, b"d" block done) and block until it
    writes b"g" (b"": the parent is gone, go on). No-op outside lockstep."""
    if "BENCH_GO_FD" not in os.environ:
        return
    os.write(int(os.environ["BENCH_DONE_FD"]), what)
    os.read(int(os.environ["BENCH_GO_FD"]), 1)


def install_step_timer(path: str, device: str, warmup: int, profile: bool = False, pauses=()):
    """Every Trainer built in this process gets the same timing callback (patched into CallbackHandler).

    Lockstep (the parent passes BENCH_GO_FD / BENCH_DONE_FD): the callback reports b"r" at train begin (start-up
    done) and b"d" after each global step in `pauses`, then blocks until the parent writes b"g" - a blocked read
    costs no CPU time, so the CPU clock of the steps is untouched; the wall time of each resume is recorded."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler

    def rss_kb(field="VmRSS"):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.r = {"step_end": [], "step_begin": [], "cpu_end": [], "loss": [], "resume": {}}

        def on_train_begin(self, args, state, control, **kw):
            self.r["rss_begin_kb"] = rss_kb()
            with open("/proc/self/clear_refs", "w") as fh:  # reset the peak RSS (VmHWM) to the current RSS
                fh.write("5")
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.r["cuda_begin"] = torch.cuda.memory_allocated()
            hold_for_turn(b"r")

        def on_step_begin(self, args, state, control, **kw):
            self.r["step_begin"].append(time.perf_counter())
            if profile and state.global_step == warmup:  # one steady-state step under the torch profiler
                self.prof = torch.profiler.profile()
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.r["step_end"].append(time.perf_counter())
            self.r["cpu_end"].append(time.process_time())
            if getattr(self, "prof", None) is not None:
                self.prof.__exit__(None, None, None)
                key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
                Path(path).with_suffix(".profile.txt").write_text(
                    self.prof.key_averages().table(sort_by=key, row_limit=40)
                )
                self.prof = None
            if state.global_step == warmup:  # also the peak of the steady-state steps alone
                self.r["hwm_warmup_kb"] = rss_kb("VmHWM")
                self.r["rss_steady_kb"] = rss_kb()
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            if state.global_step in pauses:
                hold_for_turn(b"d")
                self.r["resume"][state.global_step] = (time.perf_counter(), time.process_time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.r["loss"].append(logs["loss"])

        def on_train_end(self, args, state, control, **kw):
            self.r["hwm_steps_kb"] = rss_kb("VmHWM")
            if device == "cuda":
                self.r["cuda_peak"] = torch.cuda.max_memory_allocated()
            with open(path, "w") as fh:
                json.dump(self.r, fh)

    init = CallbackHandler.__init__

    def patched(self, callbacks, *a, **kw):
        init(self, list(callbacks) + [StepTimer()], *a, **kw)

    CallbackHandler.__init__ = patched


def random_model(spec, tokenizer):
    """A Qwen2.5-VL with the released checkpoint's sizes and random weights, built on the device (no download):
    bf16 on GPU, fp32 on CPU."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    s = SIZES[spec["model_config"]]
    hd = s["text"]["hidden_size"] // s["text"]["num_attention_heads"]
    vd = s["vision"]["depth"]
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>")
    }
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            **s["text"],
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [hd // 8, 3 * hd // 16, 3 * hd // 16],
            },
        ),
        vision_config=dict(
            **s["vision"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[i for i in range(vd) if i % 8 == 7 or i == vd - 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
    with torch.device(spec["device"]):
        return Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=spec["attn"])


def _sequential(config_cls) -> dict:
    """Same data order for every method (older transformers lack the field: then the Trainer's default)."""
    import dataclasses

    return (
        {"train_sampling_strategy": "sequential"}
        if any(f.name == "train_sampling_strategy" for f in dataclasses.fields(config_cls))
        else {}
    )


def worker_apo(spec, variant: str):
    """APOTrainer steps: variant apo (packed), plain (1+N rows), pairs (N groups of 1+1, dpo loss)."""

    from apo.trainer import trainer as T
    from apo.trainer.collator import load_groups
    from apo.trainer.config import APOConfig

    groups = load_groups(spec["data"]["groups"])
    if variant == "pairs":
        groups = [
            dict(g, case_id=f"{g['case_id']}/{k}", negatives=[n], teachers=[t])
            for g in groups
            for k, (n, t) in enumerate(zip(g["negatives"], g["teachers"]))
        ]
    per_step = spec["dpo_batch"] if variant == "pairs" else spec["groups_per_step"]
    cuda = spec["device"] == "cuda"
    cfg = APOConfig(
        output_dir=spec["work"] + f"/out_{variant}",
        model_name_or_path=spec["model_dir"],
        loss="dpo" if variant == "pairs" else "apo",
        beta=0.1,
        learning_rate=5e-7,
        lr_scheduler_type="constant",
        per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1,
        max_steps=spec["n_steps"],
        max_length=spec["max_length"],
        lora_r=8,
        lora_alpha=32,
        lora_dropout=0.05,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,
        dataloader_num_workers=0,
        gradient_checkpointing=spec["grad_ckpt"],
        seed=0,
        attn_implementation=spec["attn"],
        torch_dtype="bfloat16" if cuda else "float32",
        packed=variant == "apo",
        **_sequential(APOConfig),
    )
    packed = cfg.packed
    if not spec["build_in_worker"]:
        model, processor = T.build_model(cfg)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoProcessor

        processor = _processor(spec, AutoProcessor)
        model = random_model(spec, processor.tokenizer)
        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=32,
                lora_dropout=0.05,
                task_type="CAUSAL_LM",
                target_modules=T.lora_targets(model, "all-linear"),
            ),
        )
    trainer = T.APOTrainer(model=model, args=cfg, train_dataset=groups, processing_class=processor)
    info = {"items_per_step": per_step, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if packed and spec.get("check"):
        info["check"] = check_packed(model, processor, groups[:per_step], cfg.max_length)
    trainer.train()
    return info


def check_packed(model, processor, groups, max_length):
    """Packed vs plain log-probs on one batch, in the run's dtype (a bf16 run differs by bf16 rounding only)."""
    import torch

    from apo.model.logps import forward_logps
    from apo.model.packing import PackedGroupCollator, packed_logps
    from apo.trainer.collator import GroupCollator

    dev = next(model.parameters()).device
    move = lambda b: {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
    with torch.no_grad():
        a = forward_logps(model, move(GroupCollator(processor, max_length)(groups)))[0]
        b = packed_logps(model, move(PackedGroupCollator(processor, max_length)(groups)))[0]
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "max_rel_diff": ((a - b).abs() / a.abs()).max().item(),
        "mean_logp": a.mean().item(),
    }


def worker_swift(spec):
    """The published recipe's trainer, in this process exactly as `swift rlhf` runs it (single device)."""
    from swift.cli.utils import try_use_single_device_mode

    try_use_single_device_mode()
    from swift.pipelines import rlhf_main

    argv = [
        "--rlhf_type",
        "dpo",
        "--model",
        spec["model_dir"],
        "--model_type",
        "qwen2_5_vl",
        "--template",
        "qwen2_5_vl",
        "--use_hf",
        "true",
        "--dataset",
        spec["data"]["pairs"],
        "--split_dataset_ratio",
        "0",
        "--tuner_type",
        "lora",
        "--lora_rank",
        "8",
        "--lora_alpha",
        "32",
        "--lora_dropout",
        "0.05",
        "--target_modules",
        "all-linear",
        "--torch_dtype",
        "float32",
        "--beta",
        "0.1",
        "--learning_rate",
        "5e-7",
        "--lr_scheduler_type",
        "constant",
        "--per_device_train_batch_size",
        str(spec["dpo_batch"]),
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        str(spec["n_steps"]),
        "--max_length",
        str(spec["max_length"]),
        "--gradient_checkpointing",
        str(spec["grad_ckpt"]).lower(),
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--dataloader_num_workers",
        "0",
        "--train_dataloader_shuffle",
        "false",
        "--output_dir",
        spec["work"] + "/out_swift",
        "--attn_impl",
        spec["attn"],
        "--freeze_vit",
        "true",
        "--check_model",
        "false",
        "--add_version",
        "false",
    ]
    plugin = Path(spec["model_dir"]) / "swift_plugin.py"  # apo.world.tiny's: ms-swift must expand images in its vocab
    if plugin.exists():
        argv += ["--external_plugins", str(plugin)]
    rlhf_main(argv)
    return {"items_per_step": spec["dpo_batch"]}


def worker_trl(spec):
    from datasets import Dataset, Image, Sequence
    from peft import LoraConfig
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    from apo.model.chat import assistant_message, user_message
    from apo.trainer.collator import load_groups
    from apo.trainer.trainer import lora_targets

    rows = [
        {
            "images": g["images"],
            "prompt": user_message(1, g["prompt"]),
            "chosen": [assistant_message(g["positive"])],
            "rejected": [assistant_message(n)],
        }
        for g in load_groups(spec["data"]["groups"])
        for n in g["negatives"]
    ]
    ds = Dataset.from_list(rows).cast_column("images", Sequence(Image()))
    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(spec["model_dir"], attn_implementation=spec["attn"])
    cfg = DPOConfig(
        output_dir=spec["work"] + "/out_trl",
        per_device_train_batch_size=spec["dpo_batch"],
        gradient_accumulation_steps=1,
        learning_rate=5e-7,
        lr_scheduler_type="constant",
        max_steps=spec["n_steps"],
        max_length=spec["max_length"],
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        gradient_checkpointing=spec["grad_ckpt"],
        seed=0,
        **_sequential(DPOConfig),
    )
    peft = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=lora_targets(model, "all-linear")
    )
    DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=processor, peft_config=peft).train()
    return {"items_per_step": spec["dpo_batch"]}


def run_worker(method: str, spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    timer_path = spec["work"] + f"/timer_{method}.json"
    install_step_timer(
        timer_path, spec["device"], spec["warmup"], spec.get("profile", False), set(spec.get("pauses", ()))
    )
    t0 = time.perf_counter()
    info = {
        "apo": lambda: worker_apo(spec, "apo"),
        "plain": lambda: worker_apo(spec, "plain"),
        "pairs": lambda: worker_apo(spec, "pairs"),
        "swift": lambda: worker_swift(spec),
        "trl": lambda: worker_trl(spec),
    }[method]()
    info["wall_s"] = time.perf_counter() - t0
    info.update(json.loads(Path(timer_path).read_text()))
    Path(spec["work"], f"result_{method}.json").write_text(json.dumps(info))


# ------------------------------------------------------------------------------------------------ driver


def schedule(warmup: int, steps: int, rounds: int) -> dict:
    """One method's steps as `rounds` blocks, which the methods take in turn (lockstep): block 0 = the warm-up steps
    + its share of the `steps` measured ones; every later block starts with one unmeasured step (the caches are cold
    after the other methods' block), then its share. -> n_steps (the worker's max_steps), pauses (global steps after
    which the worker waits for its next turn), measured [[global step, round], ...] (1-based steps)."""
    rounds = max(1, min(rounds, steps))
    measured, pauses, g = [], [], warmup
    for r in range(rounds):
        if r:
            pauses.append(g)
            g += 1  # the re-warm step
        for _ in range(steps // rounds + (r < steps % rounds)):
            g += 1
            measured.append([g, r])
    return {"n_steps": g, "pauses": pauses, "measured": measured}


class Worker:
    """One method's process (`--worker`). Lockstep: every method's process starts at once (the start-ups overlap);
    then `turn()` lets one of them run its next block while the others wait, blocked, at their pause."""

    def __init__(self, method: str, spec: dict, spec_path: str, lockstep: bool, argv=None):
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(spec["threads"]),
            MKL_NUM_THREADS=str(spec["threads"]),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            MODELSCOPE_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        self.method, self.spec, self.error, self.go, self.done = method, spec, None, None, None
        self.log = Path(spec["work"], f"log_{method}.txt")
        Path(spec["work"], f"result_{method}.json").unlink(missing_ok=True)
        fds = ()
        if lockstep:
            go_r, self.go = os.pipe()
            self.done, done_w = os.pipe()
            env.update(BENCH_GO_FD=str(go_r), BENCH_DONE_FD=str(done_w))
            fds = (go_r, done_w)
        self.t0 = time.perf_counter()
        with open(self.log, "w") as fh:
            self.p = subprocess.Popen(
                argv or [sys.executable, __file__, "--worker", method, "--spec", spec_path],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                pass_fds=fds,
            )
        for fd in fds:
            os.close(fd)  # the child's ends: EOF here once it exits

    def wait(self, timeout: float) -> bool:
        """The next report (start-up done, block done); False if the process ended instead or timed out."""
        import select

        if self.error or self.done is None:
            return False
        if not select.select([self.done], [], [], timeout)[0]:
            self.error = f"timed out after {timeout:.0f}s"
            self.p.kill()
            return False
        return bool(os.read(self.done, 1))

    def turn(self, timeout: float) -> bool:
        """Run the next block: True once it is done and the worker waits again."""
        if self.error or self.go is None:
            return False
        try:
            os.write(self.go, b"g")
        except BrokenPipeError:
            return False
        return self.wait(timeout)

    def finish(self, timeout: float) -> dict:
        """Let the worker run to its end; its timings and memory (or {"error": why})."""
        if self.go is not None and not self.error:
            try:
                os.write(self.go, b"g")
            except BrokenPipeError:
                pass
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            self.error = self.error or f"timed out after {timeout:.0f}s"
        for fd in (self.go, self.done):
            if fd is not None:
                os.close(fd)
        res_path = Path(self.spec["work"], f"result_{self.method}.json")
        if self.error or self.p.returncode != 0 or not res_path.exists():
            lines = self.log.read_text(errors="replace").strip().splitlines()
            why = [ln for ln in lines if "Error" in ln or "error" in ln][-2:] or lines[-2:]
            return {
                "error": (self.error or f"exit {self.p.returncode}")
                + ": "
                + " | ".join(why)
                + f" (full log: {self.log})"
            }
        r = json.loads(res_path.read_text())
        r["process_s"] = time.perf_counter() - self.t0
        return timings(self.method, self.spec, r)


def timings(method: str, spec: dict, r: dict) -> dict:
    """Per measured step: the gap since the previous step's end (wall and process CPU; never across a pause: the
    step after one is not measured) and the time inside the step; medians overall and per round."""
    ends, begins, cpu = r["step_end"], r["step_begin"], r["cpu_end"]
    steps = [(g, rnd) for g, rnd in spec["measured"] if g <= len(ends)]
    gap = {g: ends[g - 1] - ends[g - 2] for g, _ in steps}
    cpu_gap = {g: cpu[g - 1] - cpu[g - 2] for g, _ in steps}
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    groups_per_step = r["items_per_step"] / (spec["n_neg"] if method in ("swift", "trl", "pairs") else 1)
    r["step_s"] = med(list(gap.values()))
    r["in_step_s"] = med([ends[g - 1] - begins[g - 1] for g, _ in steps])
    r["cpu_step_s"] = med(list(cpu_gap.values()))
    r["wall_s_per_group"] = r["step_s"] / groups_per_step
    r["cpu_s_per_group"] = r["cpu_step_s"] / groups_per_step
    r["s_per_group"] = r["cpu_s_per_group" if spec["clock"] == "cpu" else "wall_s_per_group"]
    clock = cpu_gap if spec["clock"] == "cpu" else gap
    n_rounds = 1 + max((rnd for _, rnd in spec["measured"]), default=0)
    r["rounds_s_per_group"] = [
        med([clock[g] for g, rnd in steps if rnd == k]) / groups_per_step for k in range(n_rounds)
    ]
    if spec["device"] == "cuda":
        r["peak_mem_mb"] = r["abs_peak_mb"] = r["cuda_peak"] / 2**20
    else:  # what training adds to the loaded process; the absolute peak has the libraries' ~0.9 GB in it
        hwm = max(r["hwm_steps_kb"], r["hwm_warmup_kb"])
        r["peak_mem_mb"], r["abs_peak_mb"] = (hwm - r["rss_begin_kb"]) / 1024, hwm / 1024
        r["steady_step_mem_mb"] = (r["hwm_steps_kb"] - r["rss_steady_kb"]) / 1024
    return r


def run_lockstep(methods, spec: dict, spec_path: str, timeout: int, argv=None) -> dict:
    """All methods' processes at once; then round by round, each method runs its block while the others wait:
    A B C A B C ..., so a slow minute of a shared machine hits every method, and the rounds pair up (round k =
    the same groups for every method)."""
    workers = {m: Worker(m, spec, spec_path, lockstep=True, argv=argv and argv(m)) for m in methods}
    up = [m for m in methods if workers[m].wait(timeout)]
    print(f"[bench] started together: {', '.join(up)}", file=sys.stderr, flush=True)
    for k in range(len(spec["pauses"])):
        for m in up:
            if not workers[m].error:
                workers[m].turn(timeout)
        print(f"[bench] round {k + 1}/{len(spec['pauses']) + 1} done", file=sys.stderr, flush=True)
    return {m: workers[m].finish(timeout) for m in methods}


def run_sequential(methods, spec: dict, spec_path: str, timeout: int, repeat: int) -> dict:
    """One method's process at a time, A B A B for `repeat` rounds (a load change on a shared machine hits all
    alike); each method keeps its fastest run."""
    results = {}
    for rep in range(repeat):
        for m in methods:
            print(f"[bench] {m} (run {rep + 1}/{repeat}) ...", file=sys.stderr, flush=True)
            r = Worker(m, spec, spec_path, lockstep=False).finish(timeout)
            r["runs_ms_per_group"] = results.get(m, {}).get("runs_ms_per_group", []) + [
                round(r.get("s_per_group", float("nan")) * 1e3, 1)
            ]
            if m not in results or "error" in results[m] or r.get("s_per_group", 1e9) < results[m]["s_per_group"]:
                results[m] = r  # the run least disturbed by others' load
            else:
                results[m]["runs_ms_per_group"] = r["runs_ms_per_group"]
    return results


def flops_per_group(spec, tok) -> dict:
    """Model FLOPs of one APO step on one group (matmuls only), for MFU; gradient-checkpointing recompute is not
    counted (model FLOPs, not hardware FLOPs). Per packed row of T tokens, C of them response tokens:
      forward  F = 2*N*T + 2*H*V*C + 4*L*H*A      (N = decoder-layer weights, lm_head at label positions only,
                                                  A = (query, key) pairs the block mask allows, 4*H per pair/layer)
      policy   F + backward: activation gradients only (the base is frozen; LoRA weight grads are ~0.1%):
               2*N*T + 2*H*V*C + 8*L*H*A
      ref      F (adapter off, no grad);  vision tower: one forward (frozen, shared by policy and ref)
    "required" = policy + ref + vision (what this step must compute). "6N" = the usual training count
    6*N*T + 2*N*T(ref), which also counts the weight gradients LoRA never computes (overstates LoRA work)."""
    if spec["model_config"] == "tiny":
        return {}
    t, v = SIZES[spec["model_config"]]["text"], SIZES[spec["model_config"]]["vision"]
    H, L, I, V = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], t["vocab_size"]
    kvd = t["num_key_value_heads"] * H // t["num_attention_heads"]
    N = L * (2 * H * H + 2 * H * kvd + 3 * H * I)
    T, C, A = tok["packed_tokens_per_group"], tok["response_tokens_per_group"], tok["attn_pairs_per_group"]
    Hv, Iv, D = v["hidden_size"], v["intermediate_size"], v["depth"]
    patches = 4 * tok["image_tokens"]
    full = sum(1 for i in range(D) if i % 8 == 7 or i == D - 1)
    merger = (16 * Hv * Hv + 4 * Hv * v["out_hidden_size"]) / 4  # per patch: 4 patches merge into one token
    vision = 2 * patches * (1176 * Hv + D * (4 * Hv * Hv + 3 * Hv * Iv) + merger) + 4 * Hv * patches * (
        full * patches + (D - full) * 64
    )  # windows of 64 patches, a few full layers
    fwd = 2 * N * T + 2 * H * V * C + 4 * L * H * A
    required = fwd + (2 * N * T + 2 * H * V * C + 8 * L * H * A) + fwd + vision
    conventional = 8 * N * T + 8 * H * V * C + 16 * L * H * A + vision
    return {"required": required, "6N": conventional, "decoder_params": N}


def _decoder_flops(t: dict, T: float, labels: float, A: float) -> tuple[float, float]:
    """(forward, backward through activations) matmul FLOPs of one row of T tokens, the lm-head at `labels`
    positions, A allowed (query, key) pairs (flops_per_group's per-row terms)."""
    H, L, I, V = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], t["vocab_size"]
    kvd = t["num_key_value_heads"] * H // t["num_attention_heads"]
    N = L * (2 * H * H + 2 * H * kvd + 3 * H * I)
    return 2 * N * T + 2 * H * V * labels + 4 * L * H * A, 2 * N * T + 2 * H * V * labels + 8 * L * H * A


def _vision_flops(v: dict, image_tokens: float) -> float:
    Hv, Iv, D, patches = v["hidden_size"], v["intermediate_size"], v["depth"], 4 * image_tokens
    full = sum(1 for i in range(D) if i % 8 == 7 or i == D - 1)
    merger = (16 * Hv * Hv + 4 * Hv * v["out_hidden_size"]) / 4
    return 2 * patches * (1176 * Hv + D * (4 * Hv * Hv + 3 * Hv * Iv) + merger) + 4 * Hv * patches * (
        full * patches + (D - full) * 64
    )


def ideal_flops(dims: dict, P: float, image_tokens: float, C: float, n: int) -> dict:
    """Model FLOPs per group {t+, N negatives}, counted analytically (matmuls; no recompute): prompt P tokens (image
    included), every answer C tokens. A row costs policy forward + backward (activation grads; the base is frozen)
    + reference forward, the lm-head at answer tokens only.
      pairwise DPO: 2N full rows (P + C), each with its own image encoding in the policy and the reference pass;
      APO (packed): one row P + (1+N) C, image and prompt once, the image encoded once.
    `full_logits`: DPO as ms-swift / TRL run it, the lm-head over every position of each row."""
    t, v = dims["text"], dims["vision"]

    def row(T, labels, A):
        f, b = _decoder_flops(t, T, labels, A)
        return 2 * f + b  # policy fwd + bwd, reference fwd

    vis = _vision_flops(v, image_tokens)
    apo = row(P + (1 + n) * C, (1 + n) * C, P * P / 2 + (1 + n) * (C * P + C * C / 2)) + vis
    dpo = 2 * n * (row(P + C, C, (P + C) ** 2 / 2) + 2 * vis)
    dpo_full = 2 * n * (row(P + C, P + C, (P + C) ** 2 / 2) + 2 * vis)
    return {
        "apo": apo,
        "dpo": dpo,
        "dpo_full_logits": dpo_full,
        "ratio": dpo / apo,
        "ratio_full_logits": dpo_full / apo,
    }


def tiny_dims() -> dict:
    from apo.world.tiny import TEXT, VISION

    return {
        "text": dict({k: TEXT[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
                     num_attention_heads=TEXT["num_attention_heads"], num_key_value_heads=TEXT["num_key_value_heads"],
                     vocab_size=152064),
        "vision": dict({k: VISION[k] for k in ("depth", "hidden_size", "intermediate_size")},
                       out_hidden_size=TEXT["hidden_size"]),
    }  # fmt: skip


def prepare_mimic(a, work: Path) -> str:
    """--shape mimic: apo.world.tiny's model with Qwen2.5-VL's exact tokenizer (vocabulary 151,665, embedding
    152,064) and the default pixel budget saved into its processor (ms-swift reads the same as MAX_PIXELS)."""
    from transformers import AutoProcessor

    from apo.model.loading import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, apply_pixel_budget
    from apo.world.tiny import build_tiny_model

    src = build_tiny_model(work / "tiny_exact", seed=0, tokenizer="qwen2.5-vl")
    proc = AutoProcessor.from_pretrained(src)
    apply_pixel_budget(proc, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    proc.save_pretrained(src)
    os.environ["MAX_PIXELS"], os.environ["MIN_PIXELS"] = str(DEFAULT_MAX_PIXELS), str(DEFAULT_MIN_PIXELS)
    return src


MIMIC = dict(image_size=(2544, 3056), response_scale=8.0, max_length=4096, dpo_batch=2, n_negatives=7)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: apo + swift, few steps (< 2 min)")
    ap.add_argument(
        "--shape",
        choices=["default", "mimic"],
        default="default",
        help="mimic: the real job's shapes on a CPU-sized model: Qwen2.5-VL's exact vocabulary (the tiny model with "
        "--tokenizer qwen2.5-vl), 2,544 x 3,056 images under the default pixel budget (480 image tokens), "
        "~300-word answers, N = 7, max length 4,096, ms-swift DPO at the DPO launcher's 2 pairs per step",
    )
    ap.add_argument(
        "--methods",
        default=None,
        help="comma list of apo,plain,pairs,swift,trl (default: all on CPU; apo,plain,pairs on cuda)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model-config", default="tiny", choices=["tiny", "small", "3b", "7b"])
    ap.add_argument(
        "--model-dir",
        default=None,
        help="a local Qwen2.5-VL folder (default: apo.world.tiny's, built here); for 3b/7b only its processor is used",
    )
    ap.add_argument("--n-negatives", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8, help="measured steps per method")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--groups-per-step", type=int, default=1)
    ap.add_argument("--dpo-batch", type=int, default=None, help="pairs per DPO step (default N: one group's)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--response-scale", type=float, default=2.5, help="answer length multiplier (see LENGTHS)")
    ap.add_argument("--image-size", type=int, default=448, help="3b/7b: image side in pixels (tokens ~ (s/28)^2)")
    ap.add_argument("--attn", default=None, help="attention kernel (default sdpa)")
    ap.add_argument(
        "--no-grad-ckpt", action="store_true", help="gradient checkpointing off (on by default, as ms-swift's default)"
    )
    ap.add_argument("--profile", action="store_true", help="write a torch.profiler table of one step per method")
    ap.add_argument("--check", action="store_true", help="apo: first compare packed and plain log-probs on a batch")
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="time per step: process CPU time (default on CPU: with one thread per method it is the "
        "compute time, unmoved by other users' load on a shared machine) or wall time (default on "
        "cuda, after a synchronize); both are reported",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per method (1: robust on a shared CPU)")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument(
        "--lockstep",
        choices=["auto", "on", "off"],
        default="auto",
        help="start every method's process at once and let them take turns, a block of steps each, "
        "for --rounds rounds (auto: on CPU; off on cuda, where the methods would share the GPU's "
        "memory): the speedup is the median of the per-round ratios (same groups, adjacent minutes)",
    )
    ap.add_argument("--rounds", type=int, default=None, help="lockstep rounds (default 4, 6 with --quick)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="without lockstep: runs per method, alternating; the fastest run counts (default 1)",
    )
    ap.add_argument("--work", default=None, help="keep the work folder here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_worker(a.worker, a.spec)
    if a.shape == "mimic":
        if a.model_config != "tiny" or a.model_dir:
            ap.error("--shape mimic builds its own model (the tiny one with the exact tokenizer)")
        a.max_length, a.response_scale, a.n_negatives = MIMIC["max_length"], MIMIC["response_scale"], 7
        a.dpo_batch = a.dpo_batch or MIMIC["dpo_batch"]

    lockstep = a.lockstep == "on" or (a.lockstep == "auto" and a.device == "cpu")
    if a.quick:  # 24 measured steps per method in 6 rounds: ~75 s of wall time with the start-ups overlapping
        a.steps, a.warmup = (24 if lockstep else min(a.steps, 8)), 2
        a.rounds = a.rounds or 6
        a.methods = a.methods or "apo,swift"
        if a.shape == "mimic":  # ~10 s (APO) and ~13 s (ms-swift DPO) per step on one CPU thread: ~6 min in all
            a.steps, a.rounds = 12, 4
    if lockstep and (a.repeat or 1) > 1:
        ap.error("--repeat is for --lockstep off (in lockstep the rounds are the repeats)")
    methods = (a.methods or ("apo,plain,pairs" if a.device == "cuda" else "apo,plain,swift,trl")).split(",")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_apo_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.shape == "mimic":
        model_dir, in_worker = prepare_mimic(a, work), False
    else:
        model_dir, in_worker = prepare_model_dir(a, work, methods)
    a.warmup = max(a.warmup, 1)  # the first step's gap has no previous step end
    a.repeat = a.repeat or 1
    plan = schedule(a.warmup, a.steps, (a.rounds or 4) if lockstep else 1)
    n_steps = plan["n_steps"]
    dpo_batch = a.dpo_batch or a.n_negatives
    n_groups = max(a.groups_per_step * n_steps, -(-dpo_batch * n_steps // a.n_negatives))
    spec = {
        "work": str(work),
        "model_dir": model_dir,
        "build_in_worker": in_worker,
        "model_config": a.model_config,
        "device": a.device,
        "n_neg": a.n_negatives,
        "n_steps": n_steps,
        "warmup": a.warmup,
        "groups_per_step": a.groups_per_step,
        "dpo_batch": dpo_batch,
        "max_length": a.max_length,
        "image_size": a.image_size,
        "attn": a.attn or "sdpa",
        "grad_ckpt": not a.no_grad_ckpt,
        "threads": a.threads,
        "check": a.check,
        "clock": a.clock or ("cpu" if a.device == "cpu" else "wall"),
        "profile": a.profile,
        "lockstep": lockstep,
        **plan,
        "shape": a.shape,
        "data": make_data(
            work / "data",
            n_groups,
            a.n_negatives,
            MIMIC["image_size"] if a.shape == "mimic" else (a.image_size if a.model_config != "tiny" else 112),
            a.response_scale,
        ),
    }
    spec_path = str(work / "spec.json")
    Path(spec_path).write_text(json.dumps(spec, indent=1))
    tok = token_counts(spec)

    if lockstep:
        results = run_lockstep(methods, spec, spec_path, a.timeout)
    else:
        results = run_sequential(methods, spec, spec_path, a.timeout, a.repeat)
    report = summarise(a, spec, tok, results)
    print(json.dumps(report))
    return 0


def summarise(a, spec, tok, results) -> dict:
    import platform

    import torch
    import transformers

    def version(name):
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return None

    flops = flops_per_group(spec, tok)
    peak = H100_BF16_DENSE
    rows = []
    for m, r in results.items():
        if "error" in r:
            rows.append(f"{m:6s} FAILED: {r['error'][:400]}")
            continue
        r["tokens_per_s"] = tok["pair_tokens_per_group"] / r["s_per_group"]
        if m == "apo" and flops and spec["device"] == "cuda":
            r["mfu"] = flops["required"] / r["s_per_group"] / peak
            r["mfu_6n"] = flops["6N"] / r["s_per_group"] / peak
            r["tflops"] = flops["required"] / r["s_per_group"] / 1e12
        rows.append(
            f"{m:6s} {r['s_per_group'] * 1e3:8.1f} ms/group ({spec['clock']})  "
            f"wall {r['wall_s_per_group'] * 1e3:8.1f}  cpu {r['cpu_s_per_group'] * 1e3:8.1f}  "
            f"(wall in-step {r['in_step_s'] * 1e3:7.1f}/step)  "
            f"{r['tokens_per_s']:8.0f} pair-tok/s  "
            f"train mem +{r['peak_mem_mb']:7.1f} MB (abs peak {r['abs_peak_mb']:7.1f} MB)  "
            f"loss {r['loss'][:1]} -> {r['loss'][-1:]}  proc {r['process_s']:.0f}s"
            + (f"  {r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%} (6N count: {r['mfu_6n']:.1%})" if "mfu" in r else "")
        )
    where = torch.cuda.get_device_name() if spec["device"] == "cuda" else f"{spec['threads']} threads"
    print(
        f"# device {spec['device']} ({platform.processor() or platform.machine()}, {where}), clock {spec['clock']}, "
        f"model {spec['model_config']}, N={spec['n_neg']}, {a.steps} steps after warm-up"
        + (f" in {len(spec['pauses']) + 1} lockstep rounds, " if spec["lockstep"] else ", ")
        + f"grad ckpt {spec['grad_ckpt']}, attn {spec['attn']}",
        file=sys.stderr,
    )
    print(
        f"# tokens/group: prompt {tok['prompt_tokens']:.0f}, mean response {tok['mean_response_tokens']:.0f}, "
        f"as N pairs {tok['pair_tokens_per_group']:.0f}, packed {tok['packed_tokens_per_group']:.0f}",
        file=sys.stderr,
    )
    for row in rows:
        print(row, file=sys.stderr)
    ok = {m: r for m, r in results.items() if "error" not in r}
    out = {
        "device": spec["device"],
        "clock": spec["clock"],
        "model_config": spec["model_config"],
        "n_negatives": spec["n_neg"],
        "steps": a.steps,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ms_swift": version("ms-swift"),
        "trl": version("trl"),
        **{k: round(v, 1) for k, v in tok.items()},
    }
    for m, r in ok.items():
        out[f"{m}_ms_per_group"] = round(r["s_per_group"] * 1e3, 2)
        out[f"{m}_wall_ms_per_group"] = round(r["wall_s_per_group"] * 1e3, 2)
        out[f"{m}_cpu_ms_per_group"] = round(r["cpu_s_per_group"] * 1e3, 2)
        out[f"{m}_peak_mem_mb"] = round(r["peak_mem_mb"], 1)
        out[f"{m}_abs_peak_mb"] = round(r["abs_peak_mb"], 1)
        out[f"{m}_tokens_per_s"] = round(r["tokens_per_s"], 1)
        if len(r.get("runs_ms_per_group", ())) > 1:
            out[f"{m}_runs_ms_per_group"] = r["runs_ms_per_group"]
        if len(r["rounds_s_per_group"]) > 1:
            out[f"{m}_rounds_ms_per_group"] = [round(x * 1e3, 1) for x in r["rounds_s_per_group"]]
        if "check" in r:
            out["packed_vs_plain_check"] = r["check"]
        if "mfu" in r:
            out.update(
                apo_mfu=round(r["mfu"], 4),
                apo_mfu_6n=round(r["mfu_6n"], 4),
                apo_tflops=round(r["tflops"], 1),
                mfu_peak_flops=peak,
            )
    for m, r in results.items():
        if "error" in r:
            out[f"{m}_error"] = r["error"][:300]
    if "apo" in ok:
        apo = ok["apo"]
        for m, key in (("swift", "swift_dpo"), ("trl", "trl_dpo"), ("plain", "plain"), ("pairs", "pairs_dpo")):
            if m in ok:
                pooled = round(ok[m]["s_per_group"] / apo["s_per_group"], 3)
                out[f"speedup_vs_{key}"] = pooled
                if spec["lockstep"]:  # paired: the same groups in adjacent time, round by round
                    per_round = [o / x for o, x in zip(ok[m]["rounds_s_per_group"], apo["rounds_s_per_group"])]
                    out[f"speedup_vs_{key}"] = round(statistics.median(per_round), 3)
                    out[f"pooled_speedup_vs_{key}"] = pooled
                    out[f"round_speedups_vs_{key}"] = [round(x, 2) for x in per_round]
                out[f"wall_speedup_vs_{key}"] = round(ok[m]["wall_s_per_group"] / apo["wall_s_per_group"], 3)
                out[f"peak_mem_ratio_vs_{key}"] = round(apo["peak_mem_mb"] / ok[m]["peak_mem_mb"], 3)
                out[f"abs_peak_mem_ratio_vs_{key}"] = round(apo["abs_peak_mb"] / ok[m]["abs_peak_mb"], 3)
    if flops:
        out["flops_per_group"] = {k: float(f"{v:.4g}") for k, v in flops.items()}
    out["shape"] = spec.get("shape", "default")
    if out["shape"] == "mimic":  # the FLOP-derived ratio at the measured model's and at Qwen2.5-VL-7B's dimensions
        P, img, C = tok["prompt_tokens"], tok["image_tokens"], tok["mean_response_tokens"]
        measured = ideal_flops(tiny_dims(), P, img, C, spec["n_neg"])
        at_7b = ideal_flops(SIZES["7b"], P, img, C, spec["n_neg"])
        out["ideal_flop_ratio"] = round(measured["ratio"], 3)
        out["ideal_flop_ratio_full_logits"] = round(measured["ratio_full_logits"], 3)
        out["ideal_flop_ratio_7b"] = round(at_7b["ratio"], 3)
        out["ideal_flop_ratio_7b_full_logits"] = round(at_7b["ratio_full_logits"], 3)
        out["flops_per_group_7b"] = {k: float(f"{at_7b[k]:.4g}") for k in ("apo", "dpo", "dpo_full_logits")}
        out["dpo_pairs_per_step"] = spec["dpo_batch"]
        # the last line keeps the headline keys together
        out = {
            **{k: out.pop(k) for k in ("speedup_vs_swift_dpo", "peak_mem_ratio_vs_swift_dpo") if k in out},
            "ideal_flop_ratio": out.pop("ideal_flop_ratio"),
            **out,
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
