"""Loading a model: the one way generation, training and merging get (model, processor).

A model is a folder `from_pretrained` reads (a hub id only when online), optionally with a PEFT (LoRA) adapter
folder merged into it (base + SFT adapter = the SFT policy pi_st). One offline rule for every stage: HF_HUB_OFFLINE
read as huggingface_hub reads it (1/ON/YES/TRUE, any case); offline, a model that is not a local folder is a clear
error up front, not a network timeout. Code shipped with a model runs only with trust_remote_code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from apo.errors import ApoError

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES


def is_offline() -> bool:
    """HF_HUB_OFFLINE is set to a true value (scripts/env.sh sets 1 unless the user chose otherwise)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES


def check_model(model, flag: str = "--model") -> None:
    if not Path(model).is_dir() and is_offline():
        raise ApoError(f"{flag} {model}: no such folder (offline mode: HF_HUB_OFFLINE=1; pass a local model folder)")


def _json_file(path: Path, flag, folder) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApoError(f"{flag} {folder}: {path.name} is corrupt ({e})") from None
    if not isinstance(value, dict):
        raise ApoError(f"{flag} {folder}: {path.name} is corrupt (not a JSON object)")
    return value


def _weights_problem(folder: Path, required: bool = True) -> str | None:
    """A truncated safetensors file (shorter than its header says) or, if `required`, a folder with no weights."""
    from apo.trainer.checkpoint import _safetensors_problem

    weights = list(folder.glob("*.safetensors"))
    if required and not weights and not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")):
        return "no weight files (*.safetensors) there"
    for w in weights:
        try:
            problem = _safetensors_problem(w)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            problem = f"{w.name}: unreadable header"
        if problem:
            return problem
    return None


def check_model_folder(model, flag: str = "--model") -> None:
    """A local model folder must hold a readable config.json and whole weights: checked before anything loads."""
    check_model(model, flag)
    folder = Path(model)
    if not folder.is_dir():
        return  # a hub id (online)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ApoError(f"{flag} {model}: not a model folder (no config.json there)")
    _json_file(cfg, flag, model)
    problem = _weights_problem(folder)
    if problem:
        raise ApoError(f"{flag} {model}: {problem}")


def adapter_config(adapter, flag: str = "--adapter") -> dict:
    """The adapter folder's adapter_config.json; anything else is an error naming the flag."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ApoError(f"{flag} {adapter}: no adapter_config.json there (expected a PEFT/LoRA checkpoint folder)")
    config = _json_file(path, flag, adapter)
    problem = _weights_problem(Path(adapter), required=False)  # PEFT itself says what a weightless adapter lacks
    if problem:
        raise ApoError(f"{flag} {adapter}: {problem}")
    return config


def pick_device(device=None) -> str:
    import torch

    if device:
        return str(device)
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def resolve_dtype(dtype, device=None):
    """A torch dtype from "auto" (bf16 on CUDA, fp32 elsewhere), a name ("bfloat16") or a torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device or "").startswith("cuda") else torch.float32
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ApoError(f"--dtype {dtype}: not a torch dtype (auto, bfloat16, float16, float32)")
    return getattr(torch, dtype)


def load_processor(model, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=is_offline())


def merge_adapter(net, adapter):
    """`net` with the PEFT adapter folder merged in: a plain transformers model again."""
    from peft import PeftModel

    return PeftModel.from_pretrained(net, str(adapter)).merge_and_unload()


def load_pretrained(
    model,
    adapter=None,
    dtype="auto",
    device=None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    flags=("--model", "--adapter"),
    pixels: dict | None = None,
):
    """(model, processor): `model` (+ `adapter` merged) in `dtype`, attention kernel `attn_implementation` (None:
    transformers' default); the processor resizes images within the pixel budget `pixels` ({min_pixels, max_pixels};
    None: MIN_PIXELS / MAX_PIXELS or the defaults), checked against the budget recorded next to the model. `device`
    None leaves the weights where from_pretrained put them (the CPU, or ZeRO-3 partitions; the Trainer places them).
    `flags` name the options in error messages."""
    from transformers import AutoModelForImageTextToText

    check_model_folder(model, flags[0])
    if adapter is not None:
        adapter_config(adapter, flags[1])
    kw = dict(dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code, local_files_only=is_offline())
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    pixels = pixels or budget_record(*env_budget())
    check_budget(pixels, model, adapter)
    try:
        processor = load_processor(model, trust_remote_code)
        apply_pixel_budget(processor, **pixels)
        net = AutoModelForImageTextToText.from_pretrained(model, **kw)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # a folder from_pretrained cannot read
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
        raise ApoError(f"{flags[0]} {model}: cannot load the model ({e.__class__.__name__}: {first})") from None
    if adapter is not None:
        try:
            net = merge_adapter(net, adapter)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
            raise ApoError(f"{flags[1]} {adapter}: cannot load the adapter ({e.__class__.__name__}: {first})") from None
    if device is not None:
        net.to(device)
    return net, processor


def load_model(model, adapter=None, device=None, dtype="auto", trust_remote_code: bool = False, pixels=None):
    """(model, processor) for generation, in eval mode on `device` (default: cuda:$LOCAL_RANK if CUDA is available,
    else cpu); bf16 on CUDA, fp32 on CPU unless `dtype` says; `pixels` as in load_pretrained."""
    net, processor = load_pretrained(model, adapter, dtype, pick_device(device), trust_remote_code, pixels=pixels)
    return net.eval(), processor


# ---------------------------------------------------------------- the pixel budget (one for every stage)

# Qwen2.5-VL-7B-Instruct allows 3,136..12,845,056 pixels: a MIMIC-CXR-JPG image (~2,544 x 3,056) becomes 9,920 image
# tokens there, more than the paper's --max_length 2,304 (SFT) and 4,096 (APO) on its own. The default caps it at
# 512 merged tokens' worth (512 x 28 x 28 = 401,408 px): such an image is resized to 560 x 672 and costs 480 tokens,
# leaving ~1,700 tokens of an SFT row for the prompt and a trajectory and, in the consensus prompt at 4,096 with 512
# new tokens, ~2,950 for the seven trajectories. README "Real shapes" has the arithmetic.
DEFAULT_MIN_PIXELS = 3_136
DEFAULT_MAX_PIXELS = 401_408
BUDGET_FILE = "pixel_budget.json"  # written next to a stage's output (the SFT launcher: next to pi_st)


def env_budget() -> tuple[int, int]:
    """(min_pixels, max_pixels) from MIN_PIXELS / MAX_PIXELS (the names ms-swift and qwen-vl-utils read), else the
    defaults."""
    try:
        lo = int(os.environ.get("MIN_PIXELS") or DEFAULT_MIN_PIXELS)
        hi = int(os.environ.get("MAX_PIXELS") or DEFAULT_MAX_PIXELS)
    except ValueError:
        raise ApoError(
            f"MIN_PIXELS={os.environ.get('MIN_PIXELS')!r} / MAX_PIXELS={os.environ.get('MAX_PIXELS')!r}: not integers"
        ) from None
    return lo, hi


def add_pixel_arguments(parser) -> None:
    lo, hi = env_budget()
    g = parser.add_argument_group("pixel budget (the same in every stage)")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=hi,
        help=f"largest image area after resizing, in pixels (default $MAX_PIXELS or {DEFAULT_MAX_PIXELS:,} = "
        f"512 x 28 x 28: a 2,544 x 3,056 chest X-ray -> 480 image tokens)",
    )
    g.add_argument(
        "--min-pixels",
        type=int,
        default=lo,
        help=f"smallest image area after resizing (default $MIN_PIXELS or {DEFAULT_MIN_PIXELS:,})",
    )


def budget_record(min_pixels: int, max_pixels: int) -> dict:
    return {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}


def apply_pixel_budget(processor, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Resize every image within [min_pixels, max_pixels] from now on: the processor's image processor range becomes
    its own range intersected with the budget (a budget never widens what the checkpoint's processor allows: the tiny
    112x112-only model stays 112x112). Returns the budget's record {min_pixels, max_pixels}."""
    import dataclasses

    if not 0 < min_pixels <= max_pixels:
        raise ApoError(f"pixel budget: need 0 < --min-pixels ({min_pixels}) <= --max-pixels ({max_pixels})")
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None)
    if size is None or "shortest_edge" not in size or "longest_edge" not in size:
        return budget_record(min_pixels, max_pixels)  # not a Qwen2-VL-style processor: nothing to set
    lo, hi = max(size["shortest_edge"], min_pixels), min(size["longest_edge"], max_pixels)
    if lo > hi:
        raise ApoError(
            f"pixel budget {min_pixels:,}..{max_pixels:,} lies outside the model's own {size['shortest_edge']:,}.."
            f"{size['longest_edge']:,} pixels"
        )
    if dataclasses.is_dataclass(size):
        ip.size = dataclasses.replace(size, shortest_edge=lo, longest_edge=hi)
    else:
        ip.size = {**size, "shortest_edge": lo, "longest_edge": hi}
    for attr, value in (("min_pixels", lo), ("max_pixels", hi)):  # older processors read these attributes
        if getattr(ip, attr, None) is not None:
            setattr(ip, attr, value)
    return budget_record(min_pixels, max_pixels)


def recorded_budget(*folders) -> tuple[Path, dict] | None:
    """The first pixel_budget.json in `folders` (None entries skipped): (path, record)."""
    for folder in folders:
        if folder is None:
            continue
        path = Path(folder) / BUDGET_FILE
        if path.is_file():
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                return path, budget_record(rec["min_pixels"], rec["max_pixels"])
            except (ValueError, KeyError, TypeError) as e:
                raise ApoError(f"{path}: not a pixel budget record ({e})") from None
    return None


def check_budget(budget: dict, model=None, adapter=None) -> None:
    """Stop with one line when pi_st (the --adapter folder or its run folder, or a merged --model folder) was trained
    with another pixel budget than this stage's: the model would see images at a size it never learned."""
    folders = [adapter, Path(adapter).parent if adapter else None, model if model and Path(model).is_dir() else None]
    found = recorded_budget(*folders)
    if found and found[1] != budget_record(**budget):
        path, rec = found
        raise ApoError(
            f"pixel budget mismatch: {path} says the model was trained with --min-pixels {rec['min_pixels']} "
            f"--max-pixels {rec['max_pixels']}, this run has --min-pixels {budget['min_pixels']} --max-pixels "
            f"{budget['max_pixels']} (set MIN_PIXELS / MAX_PIXELS to the same values in every stage)"
        )


def write_budget(folder, budget: dict) -> Path:
    path = Path(folder) / BUDGET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(budget_record(**budget), sort_keys=True) + "\n", encoding="utf-8")
    return path
