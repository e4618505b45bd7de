"""APOConfig: every knob of stage 3, as one `TrainingArguments` dataclass (TRL's DPOConfig shape).

Parsed by `HfArgumentParser` from a YAML/JSON file plus command-line overrides (`parse_config`), so
`apo train --config configs/apo/demo.yaml --learning_rate 1e-4` works like any HF training script, and every
`TrainingArguments` flag (DeepSpeed, checkpointing, logging, resume) comes for free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Literal

from transformers import HfArgumentParser, TrainingArguments

from apo.errors import ApoError


def default_reentrant(world_size: int, deepspeed: bool, fsdp: bool) -> bool:
    """Gradient checkpointing's mode, ms-swift's rule: reentrant (its first forward records no autograd graph:
    15% off the tiny CPU step; LoRA grads flow through `enable_input_require_grads`) except under plain DDP, where
    reentrant recomputation marks parameters ready twice."""
    return not (world_size > 1 and not deepspeed and not fsdp)


@dataclass
class APOConfig(TrainingArguments):
    """Every stage-3 setting: the model and data, the loss (`loss`, `beta`), LoRA, the reference, plus every
    `transformers.TrainingArguments` field. Build it in code or with `parse_config(yaml_file, ["--key", "value"])`.

        config = APOConfig(output_dir="runs/apo", model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct",
                           groups_file="groups.jsonl", beta=0.1, learning_rate=5e-7, bf16=True)
    """

    # --- model ---
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base MLLM (local folder or hub id), e.g. Qwen/Qwen2.5-VL-7B-Instruct."}
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Stage-1 SFT LoRA adapter. It is merged into the base before training, so the "
            "reference policy pi_st = base+SFT and the APO LoRA (fresh) learns on top of "
            "it; the saved adapter then applies to base+SFT (see reference.json), while "
            "merged/ is standalone."
        },
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (bfloat16 when --bf16, else float32), bfloat16, float16, float32."},
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2."}
    )
    # --- data ---
    groups_file: str | None = field(
        default=None,
        metadata={
            "help": "groups.jsonl from `apo build-pairs`: {case_id, prompt, images, positive, "
            "negatives, teachers} per line; or ms-swift-style rows {messages (last turn = the chosen "
            "answer), images, rejected_responses: [...]} (apo.trainer.swift_rows); detected per row."
        },
    )
    skip_bad: bool = field(
        default=False,
        metadata={
            "help": "Leave malformed rows of groups_file out (listed with their reasons in rejects_file) "
            "instead of stopping at the first one."
        },
    )
    rejects_file: str | None = field(
        default=None, metadata={"help": "Where skip_bad lists rejected rows (default: GROUPS_FILE.rejects.jsonl)."}
    )
    max_length: int = field(
        default=4096,
        metadata={
            "help": "Max tokens per candidate row (prompt + image tokens + response). The prompt "
            "is never cut; the response is truncated to fit."
        },
    )
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Pixel budget: largest image area after resizing (default $MAX_PIXELS or 401,408 = 512 x 28 x 28; "
            "the same in every stage: a pi_st trained with another budget is refused)."
        },
    )
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "Pixel budget: smallest image area after resizing (default $MIN_PIXELS or 3,136)."},
    )
    max_negatives: int | None = field(
        default=None, metadata={"help": "Keep at most this many teacher negatives per group (the first ones)."}
    )
    packed: bool = field(
        default=True,
        metadata={
            "help": "The fast step (apo.model.packing): each group's image and prompt computed "
            "once, its candidates packed after it in one row with block attention and "
            "exact mrope positions, no padding; log-probs from a chunked lm-head. false = "
            "the plain path, 1+N padded rows each carrying the image (same numbers to "
            "1e-5 in fp32, slower)."
        },
    )
    logps_chunk_size: int = field(
        default=1024, metadata={"help": "Tokens per lm-head chunk when computing log-probs (peak logits memory)."}
    )
    # --- objective ---
    loss: Literal["apo", "dpo"] = field(
        default="apo",
        metadata={
            "help": "apo: Plackett-Luce over {t+, all teachers}; dpo: pairwise sigmoid loss over "
            "every (t+, teacher) pair (the paper's ablation)."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "Reward scale: r = beta * (log pi - log pi_ref)."})
    sft_weight: float = field(
        default=0.0, metadata={"help": "Weight of an extra NLL term on the positive (token mean); 0 = pure APO."}
    )
    # --- LoRA ---
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (PEFT); false = full fine-tuning."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "all-linear: every nn.Linear of the language model (not the vision "
            "tower, not lm_head); all-linear+vision: also the vision tower; "
            "otherwise comma-separated module names or one regex, given to PEFT."
        },
    )
    # --- reference policy ---
    precompute_ref: bool = field(
        default=False,
        metadata={
            "help": "Compute reference log-probs once, before the first step, into "
            "ref_cache_dir (reused across epochs and restarts); needed for full "
            "fine-tuning without a frozen model copy."
        },
    )
    ref_cache_dir: str | None = field(
        default=None, metadata={"help": "Where precomputed reference log-probs live (default: OUTPUT_DIR/ref_cache)."}
    )
    # --- output ---
    merge_on_save: bool = field(
        default=False, metadata={"help": "At the end, also write base(+SFT)+APO-adapter merged to OUTPUT_DIR/merged."}
    )
    # --- TrainingArguments defaults that APO needs different ---
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the group fields (the collator needs them); leave false."}
    )
    save_only_model: bool = field(default=False, metadata={"help": "Checkpoints without optimizer state."})

    def __post_init__(self):
        if self.gradient_checkpointing_kwargs is None:
            self.gradient_checkpointing_kwargs = {
                "use_reentrant": default_reentrant(
                    int(os.environ.get("WORLD_SIZE", "1")), bool(self.deepspeed), bool(self.fsdp)
                )
            }
        super().__post_init__()
        from apo.model.loading import env_budget

        lo, hi = env_budget()
        self.min_pixels = lo if self.min_pixels is None else self.min_pixels
        self.max_pixels = hi if self.max_pixels is None else self.max_pixels
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ApoError(f"need 0 < --min_pixels ({self.min_pixels}) <= --max_pixels ({self.max_pixels})")
        if self.loss not in ("apo", "dpo"):
            raise ApoError(f"--loss must be apo or dpo, not {self.loss!r}")
        if self.beta <= 0:
            raise ApoError(f"--beta must be > 0, not {self.beta}")
        if self.max_negatives is not None and self.max_negatives < 1:
            raise ApoError("--max_negatives must be >= 1")
        if self.logps_chunk_size < 1:
            raise ApoError("--logps_chunk_size must be >= 1")
        if self.torch_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ApoError(f"--torch_dtype: unknown {self.torch_dtype!r}")

    @property
    def pixels(self) -> dict:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    @property
    def dtype(self):
        import torch

        name = self.torch_dtype if self.torch_dtype != "auto" else ("bfloat16" if self.bf16 else "float32")
        return getattr(torch, name)


def parse_config(config_file: str | None = None, argv: list[str] | None = None) -> APOConfig:
    """YAML/JSON file values become defaults; `argv` (HF-style `--key value`) overrides them."""
    import json
    from pathlib import Path

    parser = HfArgumentParser(APOConfig)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ApoError(f"{path}: config file not found")
        if path.suffix == ".json":
            values = json.loads(path.read_text(encoding="utf-8"))
        else:
            import yaml

            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        known = {f.name for f in fields(APOConfig) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ApoError(f"{path}: unknown keys {unknown} (see `apo train --help-config`)")
        for a in parser._actions:  # a file value satisfies a required flag too
            if a.dest in values:
                a.required = False
        parser.set_defaults(**values)
    (config,) = parser.parse_args_into_dataclasses(args=list(argv or []), look_for_args_file=False)
    return config
