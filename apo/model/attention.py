"""Our attention functions as transformers attention kernels, each wrapping the kernel the model already had.

`apo.model.packing.segment_attention` (the packed training step) and `apo.model.decoding.generation_attention` (batched
generation) each handle only the calls they were written for and hand everything else to the model's own kernel.
`wrap_kernel` registers such a function under PREFIX + the current kernel's name (with that kernel's mask function,
so the model builds the masks it always did) and switches a config to it; `model_kernel` finds the wrapped one again.
Wrappers stack: the name then carries both prefixes, and each hands over to the next.
"""

from __future__ import annotations

import sys


def wrap_kernel(config, prefix: str, fn) -> None:
    """Switch `config` (a language model's) from its kernel K to `fn`, registered as prefix + K; idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    base = config._attn_implementation
    if base.startswith(prefix):
        return
    AttentionInterface.register(prefix + base, fn)
    AttentionMaskInterface.register(prefix + base, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation = prefix + base


def model_kernel(module, prefix: str):
    """The attention function `module`'s config had before `wrap_kernel(config, prefix, ...)`: transformers' registry,
    or for eager the `eager_attention_forward` of the module's own model file."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = module.config._attn_implementation
    base = name.partition(prefix)[2] if prefix in name else name  # what this wrapper wrapped, outer ones stripped
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return eager if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
