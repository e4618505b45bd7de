"""Autonomous Preference Optimization (APO): learn -> compare -> critique.

The stages of the paper (arXiv 2510.04142), one module each, dependencies pointing one way:
  data         canonical case record and its loaders (CXR-MAX layouts, ms-swift rows, MIMIC-CXR-JPG paths)
  sft          stage 1 data for ms-swift (`apo prepare-sft`)
  consensus    stage 2, the in-context consensus trajectory t+ (`apo consensus`), and reading it back
  pairs        preference groups {t+, teachers} and the pairwise DPO export (`apo build-pairs`)
  loss         the Plackett-Luce APO loss (and DPO for the ablation), pure functions
  trainer/     stage 3 (`apo train`): APOConfig (config), groups -> batches (collator), APOTrainer (trainer),
               complete-checkpoint records (checkpoint), the command (cli)
  audit        the pre-flight (`apo audit`): per-stage lengths under the pixel budget, rows lost, memory per GPU
Around them:
  model/       loading (base + adapter, dtype, device, offline rule, the one pixel budget), chat (the one prompt
               format), generation, decoding (KV cache, attention for generation), attention (kernel wrapping),
               packing (the packed training step), logps (sequence log-probs)
  io/          records (reading JSONL/JSON/parquet/dataset folders, line numbers, rejects), resumable (append-only
               result files), jobs (sharding over ranks, a lock and an identity record per output, outputs
               checked before work), mimic (MIMIC ids and paths)
  evaluation/  labeler, metrics, report (`apo eval-report`), mscxrt (`apo eval-mscxrt`), drift (`apo drift`),
               tables (`apo tables`)
  world/       the embedded demo world: synth/ (the synthetic CXR-MAX-format benchmark, `apo synth`), tiny (the tiny
               Qwen2.5-VL models, `apo tiny-model`), qwen_vocab (Qwen2.5-VL's exact tokenizer, built offline)
  cli          the `apo` console script; constants, errors (ApoError, DataError: one line `file:record: reason`)

The public API, for one's own training code (imported on first use, so `import apo` does not import torch):

    from apo import plackett_luce_loss, dpo_loss        # [B, 1+N] log-probs -> (loss, metrics)
    from apo import APOConfig, APOTrainer                # transformers.TrainingArguments / Trainer subclasses
    from apo import GroupCollator, PackedGroupCollator   # groups -> plain 1+N rows / one packed row per batch
    from apo import load_groups                          # groups.jsonl or ms-swift-style rows -> groups
    from apo import build_model                          # (model with a fresh LoRA, processor) from an APOConfig
"""

__version__ = "0.1.0"

# public name -> the module that defines it (PEP 562: resolved on first attribute access)
_PUBLIC = {
    "plackett_luce_loss": "apo.loss",
    "dpo_loss": "apo.loss",
    "APOConfig": "apo.trainer.config",
    "APOTrainer": "apo.trainer.trainer",
    "GroupCollator": "apo.trainer.collator",
    "PackedGroupCollator": "apo.model.packing",
    "load_groups": "apo.trainer.collator",
    "build_model": "apo.trainer.trainer",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:  # AttributeError lets `from apo import consensus` fall back to importing the submodule
        raise AttributeError(f"module 'apo' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cached: later lookups do not come back here
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
