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
        default=0.0,
        metadata={
            "help": "Weight of an extra NLL term on the positive (token mean over the positives of the step's "
            "micro-batch on every process together); 0 = pure APO."
        },
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
        for name, low in (("lora_r", 1), ("lora_alpha", 1), ("max_length", 1)):
            if getattr(self, name) < low:
                raise ApoError(f"--{name} must be >= {low}, not {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ApoError(f"--lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if self.learning_rate < 0:
            raise ApoError(f"--learning_rate must be >= 0, not {self.learning_rate}")
        if self.sft_weight < 0:
            raise ApoError(f"--sft_weight must be >= 0, not {self.sft_weight}")

    @property
    def pixels(self) -> dict:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    @property
    def dtype(self):
        import torch

        name = self.torch_dtype if self.torch_dtype != "auto" else ("bfloat16" if self.bf16 else "float32")
        return getattr(torch, name)


def _expected(tp) -> tuple[tuple, str, tuple | None]:
    """(accepted Python types, what to call them, allowed values or None) of a config field's annotation."""
    import enum
    import types
    import typing

    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        enums = [a for a in inner if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # TrainingArguments' `IntervalStrategy | str`: the enum's values are what it takes
            acc, what, choices = _expected(enums[0])
            return (
                (acc + (type(None),), what + " or null", choices + (None,))
                if type(None) in args
                else (acc, what, choices)
            )
        if len(inner) == 1:
            acc, what, choices = _expected(inner[0])
            return acc + (type(None),), what + " or null", choices
        return (object,), "", None
    if origin is typing.Literal:
        return (str,), "one of " + ", ".join(map(str, args)), args
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return (str,), "one of " + ", ".join(str(m.value) for m in tp), tuple(m.value for m in tp)
    if tp is bool:
        return (bool,), "true or false", None
    if tp is int:
        return (int,), "an integer", None
    if tp is float:
        return (int, float), "a number", None
    if tp is str:
        return (str,), "a string", None
    return (object,), "", None


def check_value(name: str, value, where: str) -> None:
    """A config-file value of the right type for its field, or ApoError `FILE: key NAME: expected ..., got ...`."""
    import typing

    hints = typing.get_type_hints(APOConfig)
    if name not in hints:
        return
    acc, what, choices = _expected(hints[name])
    ok = isinstance(value, acc) and not (isinstance(value, bool) and bool not in acc)
    if ok and choices is not None and value is not None and value not in choices:
        ok = False
    if not ok:
        raise ApoError(f"{where}: key {name}: expected {what}, got {value!r} ({type(value).__name__})")


def _read_values(path) -> dict:
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ApoError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ApoError(f"{path}: cannot read config file ({e.strerror or e})") from None
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApoError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    else:
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ApoError(f"{where}: YAML syntax error ({problem})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ApoError(f"{path}: a config file must be a mapping of key: value, got {type(values).__name__}")
    return values


def parse_config(config_file: str | None = None, argv: list[str] | None = None) -> APOConfig:
    """YAML/JSON file values become defaults; `argv` (HF-style `--key value`) overrides them. Every mistake is one
    ApoError line naming the file (and line) or the flag, the key and what was expected."""
    import difflib
    from pathlib import Path

    parser = HfArgumentParser(APOConfig)

    def fail(message):  # argparse would print 100 lines of usage and exit
        raise ApoError(f"command line: {message} (see `apo train --help-config`)")

    parser.error = fail
    known = {f.name for f in fields(APOConfig) if f.init}
    where = "command line"
    if config_file:
        path = Path(config_file)
        where = str(path)
        if not path.is_file():
            raise ApoError(f"{path}: config file not found")
        values = _read_values(path)
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            hint = difflib.get_close_matches(unknown[0], known, n=1)
            raise ApoError(
                f"{path}: unknown keys {unknown}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + " (see `apo train --help-config`)"
            )
        for k, v in values.items():
            check_value(k, v, str(path))
        for a in parser._actions:  # a file value satisfies a required flag too
            if a.dest in values:
                a.required = False
        parser.set_defaults(**values)
    argv = list(argv or [])
    for a in argv:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0].replace("-", "_")
            if name not in known and name not in ("help",):
                hint = difflib.get_close_matches(name, known, n=1)
                raise ApoError(
                    f"command line: unknown option {a.split('=', 1)[0]}"
                    + (f" (did you mean --{hint[0]}?)" if hint else "")
                    + " (see `apo train --help-config`)"
                )
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ApoError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # TrainingArguments.__post_init__ checks
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ApoError(f"{where}: {first}") from None
    return config
