"""The model card `apo train` writes next to each saved adapter / merged model (README.md, Hugging Face format).

YAML front matter the Hub reads (base_model, library_name, tags, pipeline_tag), then what a reader needs to trust
or reproduce the weights: the base model and the reference policy pi_st, the groups file and its statistics, the
loss and beta, the recipe (optimiser, steps, batch, LoRA), and the final training metrics.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from apo.io.resumable import write_text_atomic

TAGS = ["apo", "plackett-luce", "preference-optimization", "qwen2.5-vl", "medical", "vision-language"]
FINAL_METRICS = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/positive",
    "rewards/negatives",
    "logps/positive",
    "logps/negatives",
)


def _sha256(path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def groups_stats(groups: list[dict]) -> dict:
    negs = [len(g["negatives"]) for g in groups]
    return {
        "groups": len(groups),
        "negatives": sum(negs),
        "negatives_per_group": {"min": min(negs), "mean": round(sum(negs) / len(negs), 3), "max": max(negs)}
        if negs
        else None,
        "ms_swift_rows": sum("messages" in g for g in groups),
        "teachers": sorted({t for g in groups for t in g["teachers"]}),
    }


def final_metrics(log_history: list[dict]) -> dict:
    """The last logged training step's metrics, plus the run's totals (steps, runtime, mean train loss)."""
    steps = [h for h in log_history if "loss" in h]
    out = {k: steps[-1][k] for k in ("step", *FINAL_METRICS) if steps and k in steps[-1]}
    end = next((h for h in reversed(log_history) if "train_runtime" in h), {})
    out.update({k: end[k] for k in ("train_runtime", "train_loss") if k in end})
    return out


def model_card(args, groups: list[dict], log_history: list[dict], merged: bool = False, world_size: int = 1) -> str:
    """README.md text for the output of `apo train` (`merged`: the merged model in merged/)."""
    import yaml

    peft = args.use_lora and not merged
    stats = groups_stats(groups)
    meta = {
        "base_model": args.model_name_or_path,
        "library_name": "peft" if peft else "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": TAGS + (["lora"] if args.use_lora else []),
    }
    ref = (
        f"`{args.model_name_or_path}` with the SFT adapter `{args.adapter_name_or_path}` merged in"
        if args.adapter_name_or_path
        else f"`{args.model_name_or_path}` itself (no SFT adapter given)"
    )
    applies = (
        "This folder is the merged model: load it alone with `AutoModelForImageTextToText.from_pretrained`."
        if merged
        else (
            "This folder is a LoRA adapter for the reference policy above"
            + (" (base + SFT merged; `merged/` is standalone when written)." if args.adapter_name_or_path else ".")
            if peft
            else "This folder is the whole fine-tuned model."
        )
    )
    npg = stats["negatives_per_group"] or {}
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # an enum after __post_init__
    recipe = [
        ("learning rate", f"{args.learning_rate:g} ({scheduler}, warmup {args.warmup_steps} steps)"),
        ("steps", f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)"),
        (
            "batch (groups)",
            f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x "
            f"{world_size} process(es) = {batch}",
        ),
        ("max length", f"{args.max_length} tokens per candidate (prompt never cut)"),
        ("training step", "packed (one row per batch, block attention)" if args.packed else "plain (1+N padded rows)"),
        ("dtype", str(args.dtype).removeprefix("torch.")),
        (
            "LoRA",
            f"r {args.lora_r}, alpha {args.lora_alpha}, dropout {args.lora_dropout}, targets {args.lora_target_modules}"
            if args.use_lora
            else "none (full fine-tuning)",
        ),
        ("seed", str(args.seed)),
    ]
    loss = (
        "APO: Plackett-Luce, the positive ranked above all N negatives at once, L = logsumexp([r+, r_1..r_N]) - r+"
        if args.loss == "apo"
        else "pairwise DPO, -log sigmoid(r+ - r_i) over every (positive, negative) pair"
    )
    metrics = final_metrics(log_history)
    digest = _sha256(args.groups_file)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {Path(os.path.abspath(args.output_dir)).name}{' (merged)' if merged else ''}: APO preference-tuned",
        "",
        "Trained with `apo train` (Autonomous Preference Optimization, arXiv 2510.04142): a listwise preference loss "
        "ranks each group's chosen answer above its rejected ones, anchored to a frozen reference policy pi_st. "
        + applies,
        "",
        "## Models",
        "",
        f"- base model: `{args.model_name_or_path}`",
        f"- reference policy pi_st: {ref}",
        "",
        "## Data",
        "",
        f"- groups file: `{args.groups_file}`" + (f" (sha256 `{digest}`)" if digest else ""),
        f"- groups: {stats['groups']} ({stats['ms_swift_rows']} from ms-swift-style rows); negatives: "
        f"{stats['negatives']}, per group min {npg.get('min')} / mean {npg.get('mean')} / max {npg.get('max')}"
        + (f" (max_negatives {args.max_negatives})" if args.max_negatives else ""),
        f"- negatives' sources: {', '.join(stats['teachers'])}",
        "",
        "## Objective",
        "",
        f"- loss: {args.loss} ({loss})",
        f"- beta: {args.beta:g} (reward r = beta * (log pi_theta - log pi_st), summed over response tokens)",
    ]
    if args.sft_weight:
        lines.append(f"- plus {args.sft_weight:g} x NLL of the positive")
    lines += ["", "## Recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in recipe]
    lines += ["", "## Final training metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    else:
        lines.append("No training step was logged.")
    lines.append("")
    return "\n".join(lines)


def write_model_card(folder, args, groups, log_history, merged: bool = False, world_size: int = 1) -> Path:
    """README.md in `folder`, written atomically (replaces the one PEFT writes with its adapter)."""
    path = Path(folder) / "README.md"
    write_text_atomic(path, model_card(args, groups, log_history, merged, world_size))
    return path
