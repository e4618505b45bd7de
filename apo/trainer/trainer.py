"""APOTrainer: stage 3 ("critique") as a `transformers.Trainer` subclass (TRL's DPOTrainer shape, smaller).

Per step: every candidate of the batch goes through the policy - by default packed (apo.model.packing: each
group's image and prompt computed once, its candidates after it in one row with block attention), or as 1+N
padded rows (`--packed false`, the plain path; same log-probs to 1e-5); the reference log-probs come from the SAME
model with its LoRA adapter disabled (no second copy; with an SFT adapter merged in at load time, that is pi_st),
or from a frozen copy (full fine-tuning), or from a cache precomputed before the first step. Row log-probs are
scattered back into [B, 1+N] and handed to the pure loss in `apo.loss`. DeepSpeed, DDP, gradient accumulation,
checkpoints and resume are the Trainer's own (plus a commit record per checkpoint, apo.trainer.checkpoint); this
file adds the loss, the reference, and metrics that are summed (not averaged twice) over the logging interval and
across processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from apo.errors import ApoError
from apo.io.resumable import ResumableJsonl, write_json_atomic
from apo.loss import LOSSES
from apo.model.loading import load_pretrained, merge_adapter
from apo.model.logps import eval_mode, forward_logps
from apo.model.packing import PackedGroupCollator, packed_logps
from apo.trainer.checkpoint import mark_complete, unmark
from apo.trainer.collator import GroupCollator, candidate_key
from apo.trainer.model_card import write_model_card

log = logging.getLogger(__name__)

METRICS = (
    "rewards/positive",
    "rewards/negatives",
    "rewards/margins",
    "rewards/accuracies",
    "logps/positive",
    "logps/negatives",
)
FLAGS = ("--model_name_or_path", "--adapter_name_or_path")  # how error messages name the model options
PER_GROUP = {"rewards/positive", "rewards/margins", "rewards/accuracies", "logps/positive"}  # weight: active groups


# ---------------------------------------------------------------------------------------------------- model


def lora_targets(model: nn.Module, spec: str):
    """PEFT `target_modules` for our spec: 'all-linear' = the language model's nn.Linear layers only."""
    if spec == "all-linear+vision":
        return "all-linear"  # PEFT's own: every linear layer except the output head
    if spec != "all-linear":
        return [s.strip() for s in spec.split(",")] if "," in spec or spec.isidentifier() else spec
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not re.search(r"visual|vision", n) and "lm_head" not in n
    }
    return rf"^(?!.*(?:visual|vision)).*\.(?:{'|'.join(sorted(names))})$"


def build_model(args):
    """(model, processor): base (+ SFT adapter merged = pi_st) (+ a fresh APO LoRA when use_lora)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    if not args.model_name_or_path:
        raise ApoError("--model_name_or_path is required")
    set_seed(args.seed)  # LoRA init is random: same seed, same adapter on every process and run
    if args.deepspeed:
        _init_deepspeed_comm()
    model, processor = load_pretrained(
        args.model_name_or_path,
        args.adapter_name_or_path,  # the reference policy pi_st = base + SFT adapter, merged
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        flags=FLAGS,
        pixels=args.pixels,
    )
    model.config.use_cache = False
    if args.use_lora:
        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                task_type="CAUSAL_LM",
                target_modules=lora_targets(model, args.lora_target_modules),
            ),
        )
        if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant", True):
            model.enable_input_require_grads()  # reentrant checkpointing drops grads unless inputs require them
    return model, processor


def _init_deepspeed_comm():
    """ZeRO-3 partitions weights inside from_pretrained (zero.Init), before the Trainer starts DeepSpeed. Where
    accelerate did not start deepspeed.comm (CPU/gloo runs), zero.Init would see world size 1 and fail its batch
    check ("train_batch_size ... 4 != 1 * 2 * 1"); wrap the process group torch already has."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())


def merge_and_save(args, adapter_dir, out_dir, processor=None):
    """base (+ SFT) + the trained adapter, merged into one model any `from_pretrained` loads."""
    from transformers.integrations import deepspeed as hf_ds

    ds_config = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()  # one process, whole weights: no ZeRO-3 partitioning (it would wait for peers)
    try:
        model, base_processor = load_pretrained(
            args.model_name_or_path, args.adapter_name_or_path, dtype=args.dtype, flags=FLAGS, pixels=args.pixels
        )
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ds_config
    merge_adapter(model, adapter_dir).save_pretrained(out_dir)
    (processor or base_processor).save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------- reference cache


class RefCache:
    """Reference log-probs on disk, keyed by case_id + candidate hash: one JSONL per process, all read back."""

    def __init__(self, directory, meta: dict, rank: int, world: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old != meta:
                raise ApoError(
                    f"{self.dir}: reference cache was computed for {old}, not {meta}; "
                    "delete it or choose another --ref_cache_dir"
                )
        elif rank == 0:
            write_json_atomic(meta_path, meta)
        self.writer = ResumableJsonl(self.dir / f"ref_logps.{rank}-of-{world}.jsonl", key="key")
        self.values: dict[str, float | None] = {}
        self.reload()

    def reload(self):
        for f in sorted(self.dir.glob("ref_logps.*.jsonl")):
            self.values.update((k, r["logp"]) for k, r in ResumableJsonl(f, key="key").records.items())

    def put(self, key: str, logp):
        self.writer.append({"key": key, "logp": logp})
        self.values[key] = logp


class _PrecomputeRef(TrainerCallback):
    """Runs after the model is wrapped (DDP/DeepSpeed) and before the first step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.precompute_reference()


# ---------------------------------------------------------------------------------------------------- trainer


class APOTrainer(Trainer):
    """A `transformers.Trainer` whose loss ranks each group's positive above its N negatives (`args.loss`).

    train_dataset: a list of groups {case_id, prompt, images, positive, negatives, teachers[, messages]} (what
    `load_groups` returns). Per step the collator turns B groups into candidate rows, the policy and the reference
    (the same model with its LoRA adapter disabled; `ref_model`, a frozen copy, for full fine-tuning; or the cache
    of `--precompute_ref`) give [B, 1+N] summed log-probs, and `apo.loss` the loss. Logs rewards/*, logps/* and
    rewards/teacher/<name>.

        from apo import APOConfig, APOTrainer, build_model, load_groups
        config = APOConfig(output_dir="runs/apo", model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct",
                           groups_file="groups.jsonl", max_steps=100)
        model, processor = build_model(config)           # base (+ SFT adapter merged) + a fresh LoRA
        trainer = APOTrainer(model=model, args=config, train_dataset=load_groups(config.groups_file),
                             processing_class=processor)
        trainer.train()
        trainer.save_final()                             # adapter, processor, model card (README.md)
    """

    def __init__(self, model, args, train_dataset, processing_class, ref_model=None, **kwargs):
        from peft import PeftModel
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        collator = (PackedGroupCollator if args.packed else GroupCollator)(processing_class, args.max_length)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=collator,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: let the Trainer divide by grad-acc
        self.loss_fn = LOSSES[args.loss]
        self.is_peft = isinstance(model, PeftModel)
        self._tuner_layers = None  # adapter_disabled(): found at first use
        if not self.is_peft and ref_model is None and not args.precompute_ref:
            if is_deepspeed_zero3_enabled():
                raise ApoError("full fine-tuning under ZeRO-3 needs --precompute_ref true (or LoRA)")
            ref_model = copy.deepcopy(model)  # full fine-tuning: a frozen pi_ref, the one extra copy
        if ref_model is not None:
            ref_model.eval().requires_grad_(False).to(self.args.device)
        self.ref_model = ref_model
        self.teachers = sorted({t for g in train_dataset for t in g["teachers"]})
        self.metric_keys = (
            list(METRICS)
            + (["nll/positive"] if args.sft_weight else [])
            + [f"rewards/teacher/{t}" for t in self.teachers]
        )
        self._acc = torch.zeros(2, len(self.metric_keys), dtype=torch.float64, device=self.args.device)
        self.ref_cache = None
        if args.precompute_ref:
            self.add_callback(_PrecomputeRef(self))

    # ---- log-probs: the packed step (default) or the plain padded rows, same contract
    def logps(self, model, inputs):
        """(summed response log-probs [R] float32, response tokens [R]) for the candidate rows of a collated batch."""
        fn = packed_logps if self.args.packed else forward_logps
        return fn(model, inputs, chunk_size=self.args.logps_chunk_size)

    @staticmethod
    def n_rows(inputs) -> int:
        return len(inputs["group_index"])

    # ---- reference log-probs
    @contextlib.contextmanager
    def adapter_disabled(self, model):
        """PEFT's `disable_adapter()` without its per-call model scan: the same `enable_adapters(False/True)` on the
        same layers (LoRA layers and modules_to_save wrappers), found once. PEFT's context first builds a model
        status (walks every module and parameter) to decide whether to warn: 4-8 ms a step on the tiny CPU model,
        growing with the module count on 7B, for nothing our trainer needs (its adapters are always all enabled)."""
        if self._tuner_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            base = self.accelerator.unwrap_model(model).base_model.model
            self._tuner_layers = [
                m for m in base.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))
            ]
        for m in self._tuner_layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in self._tuner_layers:
                m.enable_adapters(True)

    @torch.no_grad()
    def _reference_forward(self, model, inputs):
        """pi_ref's log-probs, in eval mode: a fixed policy (no dropout anywhere, should a config set attention
        dropout), and no gradient-checkpointing wrappers around a pass with no backward (reentrant ones warn)."""
        with eval_mode(model):
            if self.is_peft:
                with self.adapter_disabled(model):
                    return self.logps(model, inputs)[0]
            return self.logps(self.ref_model if self.ref_model is not None else model, inputs)[0]

    def _reference_logps(self, model, inputs):
        if self.ref_cache is None:
            return self._reference_forward(model, inputs)
        missing = [k for k in inputs["ref_keys"] if self.ref_cache.values.get(k) is None]
        if missing:
            raise ApoError(f"reference log-prob cache has no entry for {missing[:3]} (dataset changed?)")
        return torch.tensor([self.ref_cache.values[k] for k in inputs["ref_keys"]], device=inputs["input_ids"].device)

    def precompute_reference(self):
        """Fill the on-disk cache for every candidate of the training set; each process does 1/world of it."""
        args, acc = self.args, self.accelerator
        meta = {
            "model": args.model_name_or_path,
            "adapter": args.adapter_name_or_path,
            "max_length": args.max_length,
            "dtype": str(args.dtype),
            "pixels": args.pixels,  # another budget, other image tokens: other log-probs
        }
        self.ref_cache = RefCache(
            args.ref_cache_dir or os.path.join(args.output_dir, "ref_cache"), meta, acc.process_index, acc.num_processes
        )
        data = self.train_dataset
        keys = [[candidate_key(g["case_id"], t) for t in [g["positive"], *g["negatives"]]] for g in data]
        todo = [i for i, ks in enumerate(keys) if any(k not in self.ref_cache.values for k in ks)]
        acc.wait_for_everyone()  # every process has read the cache before anyone appends to it: the same `todo`
        if todo and not self.is_peft and self.ref_model is None and self.state.global_step > 0:
            raise ApoError(
                "full fine-tuning: the reference cache is incomplete and the model has already been "
                "updated; restart from scratch with an empty --ref_cache_dir"
            )
        if not todo:  # the same on every process: all read the same files
            log.info(
                "reference log-probs: all %d candidates found in %s", len(self.ref_cache.values), self.ref_cache.dir
            )
            return
        bs, world = args.per_device_train_batch_size, acc.num_processes
        n_batches = math.ceil(len(todo) / (bs * world))
        mine = todo[acc.process_index :: world]
        mine += [todo[-1]] * (n_batches * bs - len(mine))  # equal forwards on every rank (ZeRO-3 gathers)
        model = self.model_wrapped  # _reference_forward runs it in eval mode
        for n in range(n_batches):
            idx = mine[n * bs : (n + 1) * bs]
            batch = self._prepare_inputs(self.data_collator([data[i] for i in idx]))
            logps = self._reference_forward(model, batch).tolist() if self.n_rows(batch) else []
            got = dict(zip(batch["ref_keys"], logps))
            for i in idx:
                for k in keys[i]:
                    self.ref_cache.put(k, got.get(k))  # None: dropped for length, never asked for
        acc.wait_for_everyone()
        self.ref_cache.reload()
        log.info(
            "reference log-probs: %d candidates cached in %s (%d computed here)",
            len(self.ref_cache.values),
            self.ref_cache.dir,
            len(set(mine)),
        )

    # ---- loss
    def _empty_batch_loss(self, model):
        """Every group of this batch was dropped for length: a zero loss that still runs a forward, so
        DDP/DeepSpeed see the same collective calls on every process."""
        ids = torch.full((1, 1), self.data_collator.pad_id, dtype=torch.long, device=self.args.device)
        if self.args.sft_weight:  # the other processes count their positive tokens: join with none
            self._positive_tokens_everywhere(torch.zeros((), device=self.args.device))
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.sum() * 0.0

    def _positive_tokens_everywhere(self, n):
        """(positive tokens of this micro-batch summed over every process, number of processes). The NLL term divides
        by it and DDP/DeepSpeed average the gradients over processes, so several processes make one process's update
        on the same global batch: a token mean over all the positives, not a mean of per-process means."""
        world = self.accelerator.num_processes
        if world == 1:
            return n, 1
        return self.accelerator.reduce(n.detach().float(), reduction="sum"), world

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.n_rows(inputs) == 0:
            return self._empty_batch_loss(model)
        valid, gi, ci = inputs["valid"], inputs["group_index"], inputs["candidate_index"]
        policy, n_tokens = self.logps(model, inputs)
        ref = self._reference_logps(model, inputs).float()
        to_groups = lambda x: torch.zeros(valid.shape, dtype=x.dtype, device=x.device).index_put((gi, ci), x)
        policy_g, ref_g = to_groups(policy), to_groups(ref)
        loss, metrics = self.loss_fn(policy_g, ref_g, self.args.beta, valid)
        if self.args.sft_weight:
            pos = ci == 0
            total, world = self._positive_tokens_everywhere(n_tokens[pos].sum())
            nll = -policy[pos].sum() * world / total.clamp(min=1)
            loss = loss + self.args.sft_weight * nll
            metrics["nll/positive"] = nll.detach()
        if model.training:
            self._record(metrics, policy_g.detach(), ref_g, valid, inputs["teachers"])
        return (loss, {"policy_logps": policy_g, "ref_logps": ref_g, **metrics}) if return_outputs else loss

    # ---- metrics: (sum, count) per key, reduced over processes at log time
    @torch.no_grad()
    def _record(self, metrics, policy_g, ref_g, valid, teachers):
        neg = valid[:, 1:]
        n_active, n_neg = float(neg.any(1).sum()), float(neg.sum())
        for i, k in enumerate(self.metric_keys[: len(METRICS) + bool(self.args.sft_weight)]):
            w = 1.0 if k == "nll/positive" else (n_active if k in PER_GROUP else n_neg)
            self._acc[0, i] += metrics[k].double() * w
            self._acc[1, i] += w
        col = {t: len(METRICS) + bool(self.args.sft_weight) + j for j, t in enumerate(self.teachers)}
        tid = torch.tensor(
            [[col[t] for t in ts] + [0] * (neg.shape[1] - len(ts)) for ts in teachers], device=neg.device
        )
        r = self.args.beta * (policy_g[:, 1:] - ref_g[:, 1:]).double()
        self._acc[0].index_add_(0, tid[neg], r[neg])
        self._acc[1].index_add_(0, tid[neg], torch.ones_like(r[neg]))

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log: every process gets here at the same step
            total = self.accelerator.reduce(self._acc, reduction="sum").cpu()
            for k, s, c in zip(self.metric_keys, total[0].tolist(), total[1].tolist()):
                if c > 0:
                    logs[k] = round(s / c, 6)
            self._acc.zero_()
        super().log(logs, start_time)

    # ---- checkpoints: complete or not at all (apo.trainer.checkpoint)
    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, then its commit record. Older checkpoints are rotated out only after the new one
        is marked complete, so a kill mid-save always leaves the previous complete checkpoint to resume from."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            unmark(folder)  # rewriting a folder (a resume that passes an old save point): incomplete until marked
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process has written its part (ZeRO shards, RNG states)
        if self.args.should_save:
            mark_complete(folder)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                use_mtime=True,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )

    # ---- the end
    def save_final(self):
        """Adapter (or full model) + processor in output_dir, trainer_state.json there too, merged/ if asked; a model
        card (README.md) in each."""
        out = self.args.output_dir
        self.save_model(out)
        if self.accelerator.is_main_process:
            self.state.save_to_json(os.path.join(out, "trainer_state.json"))
            if self.is_peft and self.args.adapter_name_or_path:
                write_json_atomic(
                    os.path.join(out, "reference.json"),
                    {
                        "base": self.args.model_name_or_path,
                        "sft_adapter": self.args.adapter_name_or_path,
                        "note": "this adapter applies to base with sft_adapter merged in; merged/ is standalone",
                    },
                )
            card = dict(
                args=self.args,
                groups=self.train_dataset,
                log_history=self.state.log_history,
                world_size=self.accelerator.num_processes,
            )
            write_model_card(out, **card)
            if self.args.merge_on_save:
                if self.is_peft:
                    merge_and_save(self.args, out, os.path.join(out, "merged"), self.processing_class)
                    write_model_card(os.path.join(out, "merged"), merged=True, **card)
                else:
                    log.info("full fine-tuning: %s already holds the whole model; no merged/ needed", out)
        self.accelerator.wait_for_everyone()
