"""`apo train --config FILE [--key value ...]`: stage 3, APO training. Thin: parse, build, train, save, summarise.

Every APOConfig / TrainingArguments field is a `--key value` override (HF spelling, underscores), e.g.
    apo train --config configs/apo/demo.yaml --output_dir runs/apo --learning_rate 1e-4 --loss dpo
Multi-GPU: `accelerate launch -m apo.cli train ...` or `torchrun --nproc_per_node 4 -m apo.cli train ...`,
with `--deepspeed configs/deepspeed/zero2.json`.
Killed? Rerun the same command with `--resume`: it continues from the newest complete checkpoint in output_dir
(`--save_strategy steps --save_steps K`); a half-written one is never used (apo.trainer.checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os

from apo.errors import ApoError
from apo.trainer.checkpoint import checkpoint_problem, checkpoints, last_complete_checkpoint

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON file of APOConfig values (configs/apo/*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every APOConfig field and exit")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in output_dir (from scratch if there is "
        "none); same as --resume_from_checkpoint auto. A half-written checkpoint is never used",
    )
    parser.epilog = "Any other --key value is an APOConfig override (see --help-config), e.g. --learning_rate 1e-4."
    # argparse.REMAINDER does not take options that come first (`--output_dir X`), so this sub-parser keeps every
    # option it does not know in `args.rest` for HfArgumentParser instead of handing it back as an error.
    parse_known = parser.parse_known_args

    def keep_unknown(args=None, namespace=None):
        namespace, unknown = parse_known(args, namespace)
        namespace.rest = list(getattr(namespace, "rest", None) or []) + unknown
        return namespace, []

    parser.parse_known_args = keep_unknown


def run(args) -> int:
    from transformers import HfArgumentParser  # these pull in torch + transformers (~10 s): not for `apo train --help`

    from apo.trainer.collator import load_groups
    from apo.trainer.config import APOConfig, parse_config
    from apo.trainer.trainer import APOTrainer, build_model

    if args.help_config:
        HfArgumentParser(APOConfig).print_help()
        return 0
    config = parse_config(args.config, [a for a in args.rest if a != "--"])
    for name in ("model_name_or_path", "groups_file", "output_dir"):
        if not getattr(config, name):
            raise ApoError(f"--{name} is required (in the config file or on the command line)")
    from apo.data import image_rules
    from apo.io.jobs import check_outputs
    from apo.model.loading import adapter_config, check_model_folder

    if not os.path.isfile(config.groups_file):
        raise ApoError(f"--groups_file {config.groups_file}: file not found (write it with `apo build-pairs`)")
    if os.path.isfile(config.output_dir):
        raise ApoError(f"--output_dir {config.output_dir}: is a file, not a folder")
    check_outputs(
        {"--output_dir": os.path.join(config.output_dir, "adapter_config.json"), "--rejects_file": config.rejects_file},
        {"--groups_file": config.groups_file},
    )
    groups = load_groups(
        config.groups_file,
        config.max_negatives,
        config.skip_bad,
        config.rejects_file,
        image_rules=image_rules(config.model_name_or_path),
    )
    resume = resume_point(config, getattr(args, "resume", False))  # before the model loads: a bad path fails fast
    check_model_folder(config.model_name_or_path, "--model_name_or_path")  # before anything loads
    if config.adapter_name_or_path:
        adapter_config(config.adapter_name_or_path, "--adapter_name_or_path")
    model, processor = build_model(config)
    trainer = APOTrainer(model=model, args=config, train_dataset=groups, processing_class=processor)
    if trainer.is_world_process_zero():
        n_neg = sum(len(g["negatives"]) for g in groups)
        log.info(
            "APO (%s loss, beta %g): %d groups, %d negatives, teachers %s; trainable %s",
            config.loss,
            config.beta,
            len(groups),
            n_neg,
            trainer.teachers,
            _trainable(model),
        )
    if resume and _finished(resume, config):  # killed after the last step: do not train again, write the output
        from transformers import TrainerState
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ApoError(
                f"{resume} is the run's last step (its weights are there); rerun without --resume to train again"
            )
        log.info("%s is the run's last step; writing the final output from it", resume)
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=resume)
    trainer.save_final()
    if trainer.is_world_process_zero():
        from apo.model.loading import write_budget

        write_budget(config.output_dir, config.pixels)  # eval and later stages check it
        print(summary(trainer.state.log_history, config.output_dir))
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Every rank leaves the process group together once the output is written. Left to the interpreter's exit, a
    finished two-process CPU run once aborted one rank in teardown ("terminate called without an active exception",
    exit -6) after its last step; torch also warns when a group is not destroyed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resume_point(config, resume_flag=False) -> str | None:
    """The checkpoint folder to resume from, or None. "auto"/"last"/"true" (or --resume): the newest complete
    checkpoint in output_dir, none = from scratch; a folder: that one, refused if it is incomplete."""
    want = "auto" if resume_flag else config.resume_from_checkpoint
    if not want:
        done = [p for p in checkpoints(config.output_dir) if checkpoint_problem(p) is None]
        if done:
            log.warning(
                "%s already holds %s; training from scratch (pass --resume to continue from it)",
                config.output_dir,
                done[0].name,
            )
        return None
    if want.lower() in ("true", "last", "auto"):
        found = last_complete_checkpoint(config.output_dir)
        log.info(
            "resuming from %s" if found else "no complete checkpoint in %s; training from scratch",
            found or config.output_dir,
        )
        return found
    problem = checkpoint_problem(want, require_marker=False)
    if problem:
        raise ApoError(f"--resume_from_checkpoint {want}: not a complete checkpoint ({problem})")
    return want


def _finished(checkpoint, config) -> bool:
    """Is this checkpoint the run's last step? (transformers 5.19 resumed there would still train one more step.)"""
    import json

    state = json.loads(open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8").read())
    target = config.max_steps if config.max_steps > 0 else state.get("max_steps", 0)
    return bool(target) and state.get("global_step", 0) >= target


def _trainable(model) -> str:
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves empty placeholders on each process
    n = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return f"{n:,} of {total:,} parameters"


def summary(log_history: list[dict], output_dir: str) -> str:
    steps = [h for h in log_history if "loss" in h]
    if not steps:
        return f"apo train: no training step logged; output in {output_dir}"
    k = max(1, len(steps) // 10)  # one logged step is one batch: noisy; means over the first / last tenth
    head, tail = steps[:k], steps[-k:]
    mean = lambda part, key: sum(h.get(key, float("nan")) for h in part) / len(part)
    span = lambda part: f"step {part[0]['step']}" if len(part) == 1 else f"steps {part[0]['step']}-{part[-1]['step']}"
    return (
        f"apo train: loss {mean(head, 'loss'):.4f} ({span(head)}) -> {mean(tail, 'loss'):.4f} ({span(tail)}); "
        f"reward margin {mean(tail, 'rewards/margins'):.4f}, accuracy {mean(tail, 'rewards/accuracies'):.3f} "
        f"({span(tail)}); output in {output_dir}"
    )
