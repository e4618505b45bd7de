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
):
    """(model, processor): `model` (+ `adapter` merged) in `dtype`, attention kernel `attn_implementation` (None:
    transformers' default). `device` None leaves the weights where from_pretrained put them (the CPU, or ZeRO-3
    partitions; the Trainer places them). `flags` name the options in error messages."""
    from transformers import AutoModelForImageTextToText

    check_model_folder(model, flags[0])
    if adapter is not None:
        adapter_config(adapter, flags[1])
    kw = dict(dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code, local_files_only=is_offline())
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        processor = load_processor(model, trust_remote_code)
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


def load_model(model, adapter=None, device=None, dtype="auto", trust_remote_code: bool = False):
    """(model, processor) for generation, in eval mode on `device` (default: cuda:$LOCAL_RANK if CUDA is available,
    else cpu); bf16 on CUDA, fp32 on CPU unless `dtype` says."""
    net, processor = load_pretrained(model, adapter, dtype, pick_device(device), trust_remote_code)
    return net.eval(), processor
