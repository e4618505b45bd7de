"""Text generation with a (tiny or 7B) Qwen2.5-VL, shared by consensus, eval-report and eval-mscxrt.

`apo.model.loading.load_model` gives (model, processor) in eval mode; `generate` answers a list of requests
(image paths, prompt) in batches: prompts built by `apo.model.chat`, left padding, KV cache, longest requests first
(less padding, and an out-of-memory shows up on the first batch, not after an hour), answers returned in input
order. Greedy by default, so a rerun reproduces every answer. Multi-GPU runs shard the cases over processes:
`apo.io.jobs`.

Sampling (`greedy=False`, `temperature`): with `seeds` (one integer per request) each request draws its tokens
from its own generator (`SeededSampler`: plain temperature sampling, no top-k / top-p, by the Gumbel-max trick),
so its answer depends on its seed and its own logits only - not on which requests share its batch, the batch
size, the sort order, a resume or the process that ran it (up to float rounding of batched vs single logits,
which the greedy path shares). `sample_seed(seed, key, index)` derives such seeds from stable names. Without
`seeds`, transformers' own sampler (one global RNG) is used, as before.
"""

from __future__ import annotations

import logging
import os
import sys

from apo.errors import ApoError
from apo.model.chat import load_images, prompt_text
from apo.model.loading import (
    adapter_config,
    add_pixel_arguments,
    apply_pixel_budget,
    budget_record,
    check_budget,
    check_model,
    load_model,
    load_processor,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- model


def add_model_arguments(parser, required=True) -> None:
    """The flags every generating command shares."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=required, help="model folder (Qwen2.5-VL; base of --adapter)")
    g.add_argument("--adapter", default=None, help="PEFT/LoRA adapter folder to load on top (e.g. the SFT output)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="requests per generate() call (per GPU; with "
        "--backend vllm, 4x this go to vLLM per call and it batches them itself)",
    )
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK if CUDA is available, else cpu")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32")
    g.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off by default)")
    g.add_argument(
        "--backend",
        choices=["hf", "vllm"],
        default="hf",
        help="hf: transformers generate() (batched, KV cache; CPU or GPU); vllm: vLLM's engine "
        "(continuous batching, paged KV cache; GPU, `pip install -e '.[vllm]'`)",
    )
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model replica")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: share of GPU memory it may take")
    add_pixel_arguments(parser)


def pixels_from_args(args) -> dict:
    """The run's pixel budget {min_pixels, max_pixels} (--min-pixels / --max-pixels)."""
    return budget_record(args.min_pixels, args.max_pixels)


def add_overwrite_argument(parser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start the output again: earlier results in it are removed (default: resume, and refuse results of a "
        "run with another model, data or settings)",
    )


def model_identity(args) -> dict:
    """What of a generating command's flags decides its answers (the resumable output's identity record)."""
    from apo.io.jobs import fingerprint

    return {
        "model": fingerprint(args.model),
        "adapter": fingerprint(args.adapter),
        "dtype": args.dtype,
        "backend": getattr(args, "backend", "hf"),
        "max_new_tokens": args.max_new_tokens,
        "pixel_budget": pixels_from_args(args),  # images resized otherwise give other answers
    }


def model_from_args(args):
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ApoError("--batch-size and --max-new-tokens must be at least 1")
    if getattr(args, "backend", "hf") == "vllm":
        engine = VllmEngine(
            args.model,
            args.adapter,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            max_model_len=getattr(args, "max_length", None),
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            pixels=pixels_from_args(args),
        )
        return engine, engine.processor
    return load_model(
        args.model,
        args.adapter,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        pixels=pixels_from_args(args),
    )


class VllmEngine:
    """`--backend vllm`: vLLM's offline engine behind the same `generate()`: the prompts are the same chat-formatted
    texts (the processor's template; vLLM expands each image's placeholder into its patch tokens), the images the
    same PIL images, greedy decoding the same (temperature 0), answers in input order. vLLM schedules the requests
    itself (continuous batching, paged KV cache): it gets a whole resumable chunk (4 x --batch-size requests) per
    call, and --batch-size only bounds what a crash can lose. An adapter is served as a LoRA (vLLM's LoRA covers the
    language model's linear layers - what `scripts/SFT-Qwen2.5.sh` trains by default); one that also trains
    embeddings or the head (MODULES_TO_SAVE) must be merged first (MERGE_LORA=true) and passed as --model.

    Data parallel: one engine per process, so run one process per GPU replica with RANK / WORLD_SIZE set by hand
    (run_resumable reads only those), or one process with --tensor-parallel-size; not under torchrun, whose process
    group vLLM would try to join."""

    def __init__(
        self,
        model,
        adapter=None,
        dtype="auto",
        trust_remote_code=False,
        max_model_len=None,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.9,
        max_images=4,
        seed=0,
        pixels=None,
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise ApoError(
                "--backend vllm needs vLLM on a CUDA machine: pip install -e '.[vllm]' (or use --backend hf)"
            ) from None
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            raise ApoError(
                "--backend vllm runs one engine per process: launch it without torchrun (set RANK and "
                "WORLD_SIZE per process for data parallel, or use --tensor-parallel-size)"
            )
        check_model(model)
        kw = dict(
            model=str(model),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=seed,
            limit_mm_per_prompt={"image": max_images},
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        if max_model_len:
            kw["max_model_len"] = int(max_model_len)
        self.lora = None
        if adapter is not None:
            cfg = adapter_config(adapter)
            if cfg.get("modules_to_save"):
                raise ApoError(
                    f"--adapter {adapter}: it also trains {cfg['modules_to_save']}, which vLLM's LoRA "
                    "cannot serve; merge it (SFT launcher MERGE_LORA=true) and pass the merged folder "
                    "as --model"
                )
            from vllm.lora.request import LoRARequest

            kw.update(enable_lora=True, max_lora_rank=max(8, int(cfg.get("r", 8))))
            self.lora = LoRARequest("adapter", 1, str(adapter))
        self.processor = load_processor(model, trust_remote_code)
        if pixels:  # the same budget for the prompts' token counts here and for vLLM's own processor
            check_budget(pixels, model, adapter)
            apply_pixel_budget(self.processor, **pixels)
            ip = self.processor.image_processor
            kw["mm_processor_kwargs"] = {"min_pixels": ip.size["shortest_edge"], "max_pixels": ip.size["longest_edge"]}
        self.llm = LLM(**kw)

    def answer(
        self, texts, images_per_request, max_new_tokens, greedy=True, seed=0, temperature=1.0, seeds=None
    ) -> list[str]:
        """`seeds`: one per request (vLLM seeds each request's sampler); else `seed` for all. Samples are vLLM's,
        not the same draws as the hf backend's for the same seed."""
        from vllm import SamplingParams

        def params_for(s):
            return SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.0 if greedy else float(temperature),
                seed=s,
                skip_special_tokens=True,
            )

        params = params_for(seed) if seeds is None or greedy else [params_for(int(s)) for s in seeds]
        inputs = [
            {"prompt": t, "multi_modal_data": {"image": ims if len(ims) > 1 else ims[0]}} if ims else {"prompt": t}
            for t, ims in zip(texts, images_per_request)
        ]
        outs = self.llm.generate(inputs, params, lora_request=self.lora, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]


# ---------------------------------------------------------------- generation


def estimate_length(processor, image_paths, text: str) -> int:
    """Prompt tokens of a chat-formatted `text` without decoding pixels: text tokens + image tokens computed from
    the image sizes (header read only). Exact for Qwen2-VL-style processors; others are encoded for real."""
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not image_paths:
        return n
    from PIL import Image

    sizes = []
    for p in image_paths:
        with Image.open(p) as im:
            sizes.append((im.height, im.width))
    try:
        return n + sum(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens) - len(sizes)
    except (AttributeError, TypeError, NotImplementedError):  # no size helper: encode for real
        return int(encode(processor, [text], [load_images(image_paths)])["input_ids"].shape[1])


def encode(processor, texts, images_per_request):
    """Left-padded batch tensors for `texts` (already chat-formatted) and their images."""
    images = [im for ims in images_per_request for im in ims]
    return processor(text=list(texts), images=images or None, padding=True, padding_side="left", return_tensors="pt")


def _attention_backends(device):
    """On CUDA, SDPA without its cuDNN backend: cuDNN builds an execution plan per new sequence length, and decoding
    makes a new length every step, so unseen shapes ran ~2x slower (H100, torch 2.11, 7B, 2k-token prompts:
    77 vs 35 ms per step at batch 16; 112 vs 53 at batch 32). Flash / memory-efficient kernels have no such cost."""
    from contextlib import nullcontext

    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _full_attention_only(config) -> bool:
    types = getattr(config.get_text_config(decoder=True), "layer_types", None) or []
    return all(t == "full_attention" for t in types)


def sample_seed(seed: int, key, index: int = 0) -> int:
    """A 63-bit seed from (run seed, a stable name such as a case id, sample index): the same on every machine and
    Python (sha256, not hash())."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}\x1f{key}\x1f{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededSampler:
    """A logits processor that samples each row's next token from softmax(scores / temperature) with that row's own
    `torch.Generator` (Gumbel-max: argmax(scores / T - log E), E ~ Exp(1)) and hands greedy search a one-hot row.
    Run under do_sample=False so transformers adds no warper and draws nothing itself; row i's t-th token uses the
    t-th draw of generator i whatever the other rows are."""

    def __init__(self, seeds, temperature: float, device):
        import torch

        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy decoding for 0")
        self.temperature = float(temperature)
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"SeededSampler: {scores.shape[0]} rows for {len(self.generators)} seeds (beams?)")
        logits = scores.float() / self.temperature
        noise = torch.empty_like(logits)
        for row, g in zip(noise, self.generators):
            row.exponential_(generator=g)
        choice = (logits - noise.log_()).argmax(-1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice[:, None], 0.0)
        return out


def generate(
    model,
    processor,
    requests,
    max_new_tokens=512,
    batch_size=8,
    greedy=True,
    progress=True,
    desc="generate",
    sort_by_length=True,
    fast=None,
    temperature=1.0,
    seeds=None,
):
    """Answers (str) to `requests` [(image_paths, prompt)], in input order. `model` is a transformers model or a
    `VllmEngine`. `fast`: the KV cache and attention of `apo.model.decoding`; None (default) = on CPU, where they were
    measured (on CUDA transformers' defaults, as measured on an H100); False gives transformers' defaults
    (DynamicCache, the model's kernel) on a model not yet switched (a benchmark's reference).
    `greedy=False`: sample at `temperature`; `seeds` (one int per request) makes each request's draws its own and
    reproducible (`SeededSampler`, see the module docstring); both are ignored when greedy."""
    import torch
    from tqdm import tqdm

    from apo.model.decoding import ReservedCache, use_generation_attention  # torch + transformers: not for --help

    requests = list(requests)
    if seeds is not None and not greedy and len(seeds) != len(requests):
        raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
    texts = [prompt_text(processor, len(paths), prompt) for paths, prompt in requests]
    if isinstance(model, VllmEngine):
        images = [load_images(paths) for paths, _ in requests]
        if greedy:
            return model.answer(texts, images, max_new_tokens, greedy)
        return model.answer(texts, images, max_new_tokens, greedy, temperature=temperature, seeds=seeds)
    lengths = [estimate_length(processor, paths, t) for (paths, _), t in zip(requests, texts)]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i]) if sort_by_length else list(range(len(requests)))
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seeded = not greedy and seeds is not None  # SeededSampler draws; transformers runs greedy search on its output
    gen_kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, do_sample=not greedy and not seeded)
    if greedy or seeded:  # a chat model's generation_config may carry sampling settings; neutralise them
        gen_kw.update(temperature=None, top_p=None, top_k=None)
    else:
        gen_kw.update(temperature=float(temperature))
    device = next(model.parameters()).device
    fast = device.type == "cpu" if fast is None else fast
    fast = fast and _full_attention_only(model.config)  # ReservedCache has no sliding-window layers
    if fast:
        use_generation_attention(model)
    out: list[str | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = encode(processor, [texts[i] for i in idx], [load_images(requests[i][0]) for i in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        # apo.model.decoding: a KV cache reserved for the whole answer (no per-step copy of the cache), and attention
        # without K/V copies (switched on above)
        extra = {"past_key_values": ReservedCache(batch["input_ids"].shape[1] + max_new_tokens)} if fast else {}
        if seeded:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList(
                [SeededSampler([seeds[i] for i in idx], temperature, device)]
            )
        with torch.inference_mode(), _attention_backends(device):
            seqs = model.generate(**batch, **gen_kw, **extra)
        new = seqs[:, batch["input_ids"].shape[1] :]  # left padding: every prompt ends at the same column
        for i, ids in zip(idx, new):
            out[i] = tok.decode(ids, skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return out
