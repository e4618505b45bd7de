"""`apo audit`: a pre-flight check of lengths and losses before any GPU time is spent. Loads no weights.

With the model's tokenizer and processor only (and image headers, not pixels), under the run's pixel budget
(--min-pixels / --max-pixels, the same flags every stage takes), it prints per stage the length distribution and
what would be lost:
  sft        one ms-swift row per teacher trajectory = image tokens + prompt + trajectory in the chat template;
             rows over --sft-max-length are the rows ms-swift's default truncation_strategy `delete` drops silently
  consensus  the image, the question and the N trajectories in context (apo consensus): cases whose trajectories
             must be cut to fit --consensus-max-length - --max-new-tokens, cases skipped outright
  apo        one group {t+, N teachers} (t+ stands in as the longest teacher trajectory until the consensus exists;
             --groups FILE audits the real groups): candidate rows over --apo-max-length are truncated (the
             response is cut), groups whose prompt alone fills it are dropped; the packed row (image and prompt once,
             all answers after it) is what the packed step computes
and a per-GPU memory estimate for the APO step from benchmarks/scale_model.py's formulas (parameters counted
exactly from the model's config on the meta device, activations from the 7B measurement scaled by tokens, width and
depth). Exits 1 when a stage would lose more than --max-loss of its rows (default 0: any loss fails).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from apo.data import add_data_arguments, cases_from_args
from apo.errors import ApoError

log = logging.getLogger(__name__)

STAGES = ("sft", "consensus", "apo")
GiB = 1024**3


def add_arguments(parser) -> None:
    from apo.model.loading import add_pixel_arguments

    add_data_arguments(parser)
    parser.add_argument("--model", required=True, help="model folder (only its tokenizer/processor/config are read)")
    parser.add_argument("--stages", default="sft,consensus,apo", help="comma-separated, of sft, consensus, apo")
    parser.add_argument("--sft-max-length", type=int, default=2304, help="ms-swift --max_length (the paper's 2,304)")
    parser.add_argument("--consensus-max-length", type=int, default=4096, help="apo consensus --max-length")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="apo consensus --max-new-tokens")
    parser.add_argument("--apo-max-length", type=int, default=4096, help="apo train --max_length (per candidate row)")
    parser.add_argument("--groups", default=None, help="groups.jsonl from build-pairs (default: teachers as stand-in)")
    parser.add_argument(
        "--max-loss", type=float, default=0.0, help="fraction of rows a stage may lose before the audit fails"
    )
    parser.add_argument("--limit", type=int, default=None, help="audit only the first N cases")
    parser.add_argument("--gpus", type=int, default=4, help="for the memory estimate (ZeRO-2 over this many)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU, for the estimate's verdict")
    parser.add_argument("--groups-per-gpu", type=int, default=2, help="APO groups per GPU per step (the paper's 2)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_pixel_arguments(parser)


def dist(values) -> dict:
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "min": v[0],
        "median": int(statistics.median(v)),
        "p95": v[min(len(v) - 1, int(0.95 * len(v)))],
        "max": v[-1],
    }


def fmt(d: dict) -> str:
    if not d.get("n"):
        return "none"
    return f"min {d['min']:,}  median {d['median']:,}  p95 {d['p95']:,}  max {d['max']:,}  (n={d['n']:,})"


class Lengths:
    """Token counts under the processor's chat template and pixel budget, images measured from their headers."""

    def __init__(self, processor):
        from apo.model.chat import assistant_message, user_message

        self.processor, self.tok = processor, processor.tokenizer
        self._user, self._assistant = user_message, assistant_message
        self._image_cache: dict[str, int] = {}

    def text(self, s: str) -> int:
        return len(self.tok(s, add_special_tokens=False)["input_ids"])

    def image(self, path: str) -> int:
        if path not in self._image_cache:
            from PIL import Image

            with Image.open(path) as im:
                size = (im.height, im.width)
            got = self.processor._get_num_multimodal_tokens(image_sizes=[size])
            self._image_cache[path] = int(got.num_image_tokens[0])
        return self._image_cache[path]

    def prompt(self, images, prompt: str) -> tuple[int, int]:
        """(prompt tokens incl. image tokens, image tokens) of the generation prompt."""
        msgs = self._user(len(images), prompt)
        text = self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        img = sum(self.image(p) for p in images)
        return self.text(text) - len(images) + img, img  # each <|image_pad|> placeholder becomes the image's tokens

    def answer(self, s: str) -> int:
        """The assistant turn after the generation prompt, through <|im_end|> (what training labels)."""
        return self.text(s.strip()) + 1


def audit_sft(L, cases, max_length) -> dict:
    rows, image, prompt = [], [], []
    for c in cases:
        p, img = L.prompt(c.images, c.prompt)
        image.append(img)
        prompt.append(p - img)
        rows += [p + L.answer(t.text) + 1 for t in c.trajectories]  # + the template's trailing newline
    lost = sum(r > max_length for r in rows)
    return {
        "image_tokens": dist(image),
        "prompt_text_tokens": dist(prompt),
        "row_tokens": dist(rows),
        "rows": len(rows),
        "lost": lost,
        "max_length": max_length,
    }


def audit_consensus(L, cases, max_length, max_new_tokens) -> dict:
    from apo.consensus import consensus_prompt

    full, cut, skipped = [], 0, 0
    limit = max_length - max_new_tokens
    for c in cases:
        if not c.trajectories:
            continue
        texts = [t.text for t in c.trajectories]
        n, _ = L.prompt(c.images, consensus_prompt(c.prompt, texts))
        fixed, _ = L.prompt(c.images, consensus_prompt(c.prompt, [""] * len(texts)))
        full.append(n)
        skipped += fixed >= limit
        cut += fixed < limit < n
    return {
        "prompt_tokens": dist(full),
        "cases": len(full),
        "cut": cut,
        "lost": skipped,
        "limit": limit,
        "max_length": max_length,
    }


def _groups(args, cases):
    """[(images, prompt, [positive, *negatives])]: the real groups, or the teachers with the longest as t+."""
    if args.groups:
        from apo.trainer.collator import load_groups

        gs = load_groups(args.groups, skip_bad=True)
        return [(g["images"], g["prompt"], [g["positive"], *g["negatives"]]) for g in gs]
    out = []
    for c in cases:
        texts = [t.text for t in c.trajectories]
        if texts:
            out.append((c.images, c.prompt, [max(texts, key=len), *texts]))
    return out


def audit_apo(L, groups, max_length) -> dict:
    rows, packed, answers, cands = [], [], [], []
    truncated = dropped = 0
    for images, prompt, texts in groups:
        p, _ = L.prompt(images, prompt)
        lens = [L.answer(t) for t in texts]
        answers += lens
        cands.append(len(texts))
        rows += [p + a for a in lens]
        if p >= max_length:
            dropped += 1
            continue
        truncated += sum(p + a > max_length for a in lens)
        packed.append(p + sum(min(a, max_length - p) for a in lens))
    return {
        "answer_tokens": dist(answers),
        "candidate_row_tokens": dist(rows),
        "packed_group_tokens": dist(packed),
        "candidates_per_group": dist(cands),
        "groups": len(groups),
        "candidates": sum(cands),
        "truncated": truncated,
        "lost": dropped,
        "max_length": max_length,
    }


def _load_scale_model():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_model.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_apo_scale_model", path)
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    return sm


def _counts(model_dir) -> tuple[dict, object]:
    """Exact parameter counts (all, vision, the APO LoRA r8) of the model in `model_dir`, built on the meta device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from apo.trainer.trainer import lora_targets

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
        total = sum(p.numel() for p in model.parameters())
        vision = sum(p.numel() for p in model.model.visual.parameters())
        lora_cfg = LoraConfig(
            r=8, lora_alpha=32, task_type="CAUSAL_LM", target_modules=lora_targets(model, "all-linear")
        )
        model = get_peft_model(model, lora_cfg)
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "vision": vision, "lora": lora}, cfg.get_text_config()


def memory_estimate(model_dir, packed_tokens: int, gpus: int, groups_per_gpu: int) -> dict | None:
    """Per-GPU GiB of the APO step, by benchmarks/scale_model.py's formulas (bf16 weights, fp32 LoRA + grads + Adam,
    ZeRO-2 sharding them), for --model and for Qwen2.5-VL-7B at the same token shapes. Activations: the measured 7B
    peak (18.9 GiB at one group of 286 + 8 x 136 tokens, grad ckpt, RESULTS.md) less its weights and adapter state,
    per token, scaled by the packed group's tokens x groups per GPU x (hidden x layers) relative to 7B."""
    sm = _load_scale_model()
    if sm is None:
        return None
    c7 = sm.count_parameters()
    per_token = (18.9 - sm.memory_per_gpu(c7, 1, 0, 0.0)["total"]) / (286 + 8 * 136)
    counts, text = _counts(model_dir)
    width = text.hidden_size * text.num_hidden_layers / (sm.TEXT_7B["hidden_size"] * sm.TEXT_7B["num_hidden_layers"])
    out = {}
    for name, c, w in (("model", counts, width), ("qwen2.5-vl-7b", c7, 1.0)):
        act = per_token * packed_tokens * groups_per_gpu * w
        out[name] = {"parameters": c, **{k: sm.memory_per_gpu(c, gpus, z, act) for k, z in (("ddp", 0), ("zero2", 2))}}
    return out


def run(args) -> int:
    from apo.model.generation import pixels_from_args
    from apo.model.loading import apply_pixel_budget, check_model, load_processor

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ApoError(f"--stages: unknown {unknown} (choose from {', '.join(STAGES)})")
    check_model(args.model)
    budget = pixels_from_args(args)
    processor = load_processor(args.model)
    apply_pixel_budget(processor, **budget)
    ip = processor.image_processor
    cases = cases_from_args(args, rejects_default=None)
    cases = cases[: args.limit] if args.limit else cases
    L = Lengths(processor)
    report = {"pixel_budget": budget, "cases": len(cases), "stages": {}}
    print(
        f"apo audit: {len(cases)} cases, pixel budget {budget['min_pixels']:,}..{budget['max_pixels']:,} "
        f"(the processor's range now {ip.size['shortest_edge']:,}..{ip.size['longest_edge']:,}), "
        f"vocabulary {len(processor.tokenizer):,}"
    )
    failed = []
    if "sft" in stages:
        r = audit_sft(L, cases, args.sft_max_length)
        report["stages"]["sft"] = r
        print(f"sft (ms-swift --max_length {r['max_length']:,}):")
        print(f"  image tokens   {fmt(r['image_tokens'])}")
        print(f"  prompt text    {fmt(r['prompt_text_tokens'])}")
        print(f"  row            {fmt(r['row_tokens'])}")
        print(f"  rows ms-swift would delete (truncation_strategy delete): {r['lost']:,} of {r['rows']:,}")
        if r["rows"] and r["lost"] / r["rows"] > args.max_loss:
            failed.append(f"sft loses {r['lost']} of {r['rows']} rows")
    if "consensus" in stages:
        r = audit_consensus(L, cases, args.consensus_max_length, args.max_new_tokens)
        report["stages"]["consensus"] = r
        print(
            f"consensus (--max-length {r['max_length']:,} - --max-new-tokens {args.max_new_tokens} = {r['limit']:,}):"
        )
        print(f"  prompt with all trajectories  {fmt(r['prompt_tokens'])}")
        print(f"  cases with trajectories cut to fit: {r['cut']:,} of {r['cases']:,}; skipped (no room): {r['lost']:,}")
        if r["cases"] and r["lost"] / r["cases"] > args.max_loss:
            failed.append(f"consensus skips {r['lost']} of {r['cases']} cases")
    if "apo" in stages:
        r = audit_apo(L, _groups(args, cases), args.apo_max_length)
        report["stages"]["apo"] = r
        src = args.groups or "teachers (t+ = the longest; pass --groups for the real ones)"
        print(f"apo (--max_length {r['max_length']:,} per candidate row; groups from {src}):")
        print(f"  answer         {fmt(r['answer_tokens'])}")
        print(f"  candidate row  {fmt(r['candidate_row_tokens'])}")
        print(f"  packed group   {fmt(r['packed_group_tokens'])}")
        print(
            f"  candidates truncated: {r['truncated']:,} of {r['candidates']:,}; groups dropped (prompt fills "
            f"max_length): {r['lost']:,} of {r['groups']:,}"
        )
        if r["groups"] and (
            r["lost"] / r["groups"] > args.max_loss or r["truncated"] / r["candidates"] > args.max_loss
        ):
            failed.append(f"apo truncates {r['truncated']} candidates, drops {r['lost']} groups")
        if r["packed_group_tokens"].get("n"):
            try:
                mem = memory_estimate(args.model, r["packed_group_tokens"]["p95"], args.gpus, args.groups_per_gpu)
            except Exception as e:  # an estimate: never the reason a pre-flight fails
                log.warning("memory estimate unavailable: %s", e)
                mem = None
            if mem:
                report["memory_gib"] = mem
                print(
                    f"  APO memory per GPU (estimate, benchmarks/scale_model.py; {args.groups_per_gpu} groups/GPU of "
                    f"p95 {r['packed_group_tokens']['p95']:,} packed tokens, grad ckpt, LoRA r8):"
                )
                for model_name, est in mem.items():
                    p = est["parameters"]
                    for name in ("ddp", "zero2"):
                        m = est[name]
                        verdict = "fits" if m["total"] < 0.9 * args.gpu_gib else "DOES NOT FIT"
                        print(
                            f"    {model_name} ({p['total'] / 1e9:.3g}B) {name} x{args.gpus}: weights "
                            f"{m['weights']:.2f} + adapter/grads/Adam {m['adapter + grads + Adam']:.2f} + activations "
                            f"{m['activations']:.2f} = {m['total']:.2f} GiB ({verdict} in {args.gpu_gib:.0f} GiB)"
                        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if failed:
        print(
            f"apo audit: FAILED (over --max-loss {args.max_loss}): " + "; ".join(failed) + ". Lower --max-pixels / "
            "MAX_PIXELS or raise the max lengths."
        )
        return 1
    print("apo audit: OK")
    return 0
