"""Cheaper decode steps for batched generation (`apo.model.generation.generate`): what a step costs besides the model.

A decode step of a batch of B left-padded prompts, with transformers' defaults, does three things per layer that
grow with the cached length L and are not the model's arithmetic:
- `DynamicLayer.update` appends one token with `torch.cat`: a copy of the whole [B, kv_heads, L, d] cache, K and V;
- `sdpa_attention_forward` copies K and V again to every query head (`repeat_kv`) because a padding mask keeps
  SDPA's own grouped-query path off;
- SDPA's CPU flash kernel for one query row per sequence, with a boolean mask it converts per call.
On the tiny CPU model (batch 16, ~850-token prompts) those were ~60% of a decode step (torch profiler). Here:
- `ReservedCache`: each layer's K/V live in a buffer reserved for prompt + max_new_tokens; a step writes one
  column in place and the layer hands out a view of the filled part (no copy; the buffer grows by doubling if a
  caller goes past the reservation). Everything else is transformers' `DynamicCache`.
- `generation_attention`: for one query token per sequence, grouped-query attention as two batched matmuls over
  the K/V heads as they are (the query heads of a K/V head form the rows of one matmul), the padding mask applied
  to the [B, kv_heads, group, L] scores; for the prefill of left-padded prompts, SDPA's causal kernel on each row's
  real tokens instead of a [B, 1, L, L] mask. Every other call (the vision tower, training, unusual masks) goes to
  the model's own kernel unchanged. Registered with transformers through `apo.model.attention`, like
  `apo.model.packing.segment_attention`.
Greedy outputs are the same tokens as with the defaults up to float rounding (tested on the tiny model: identical
texts); the loop-vs-batched benchmark is `benchmarks/bench_consensus.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from apo.model.attention import model_kernel, wrap_kernel

PREFIX = "apo_decode_"  # + the model's own kernel name, which every other forward keeps using


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views of a reserved buffer, filled in place."""

    def __init__(self, reserve: int = 0):
        super().__init__()
        self.reserve = reserve
        self._kbuf = self._vbuf = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if (
            self._kbuf is None or n + new > self._kbuf.shape[-2] or self.keys.data_ptr() != self._kbuf.data_ptr()
        ):  # crop / beam reorder replaced the tensors
            cap = max(self.reserve, n + new, 2 * n)
            self._kbuf = self._grow(self.keys, key_states, n, cap)
            self._vbuf = self._grow(self.values, value_states, n, cap)
        self._kbuf[..., n : n + new, :] = key_states
        self._vbuf[..., n : n + new, :] = value_states
        self.keys, self.values = self._kbuf[..., : n + new, :], self._vbuf[..., : n + new, :]
        return self.keys, self.values

    @staticmethod
    def _grow(old, like, n, cap):
        buf = like.new_empty(*like.shape[:-2], cap, like.shape[-1])
        if n:
            buf[..., :n, :] = old
        return buf

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


class ReservedCache(DynamicCache):
    """transformers' `DynamicCache` with `ReservedLayer`s: pass `reserve` = prompt length + max_new_tokens."""

    def __init__(self, reserve: int):
        super().__init__()
        self.layer_class_to_replicate = lambda: ReservedLayer(reserve)


def generation_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of a generation forward, [B, heads, q, d] queries over [B, kv_heads, L, d] keys/values ->
    [B, q, heads, d] like transformers' sdpa function: a decode step (q = 1) as two matmuls, a left-padded prefill
    as causal SDPA per row; anything else (training, the vision tower, other masks) goes to the model's kernel."""
    B, H, q_len, d = query.shape
    kv_heads, L = key.shape[1], key.shape[2]
    plain = module.training or H % kv_heads or kwargs.get("position_bias") is not None
    if not plain and q_len == 1:
        return _decode(query, key, value, attention_mask, scaling), None
    if not plain and q_len == L and attention_mask is not None and attention_mask.dtype == torch.bool:
        starts = _left_padding(attention_mask, B)
        if starts is not None:
            return _prefill(query, key, value, starts, scaling), None
    return model_kernel(module, PREFIX)(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def _decode(query, key, value, attention_mask, scaling):
    B, H, _, d = query.shape
    kv_heads = key.shape[1]
    q = query.view(B, kv_heads, H // kv_heads, d)  # query head h reads K/V head h // group (repeat_kv's order)
    scores = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scaling if scaling is not None else d**-0.5)
    if attention_mask is not None:  # [B, kv_heads, group, L] scores, a [B or 1, 1, 1, L] mask row
        mask = attention_mask[..., -1:, -key.shape[-2] :]
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    probs = torch.softmax(scores, -1).to(value.dtype)
    return torch.matmul(probs, value).view(B, 1, H, d)


def _left_padding(mask, batch):
    """Per row, the first real position of a causal + left-padding boolean mask [B, 1, L, L] (what the last query,
    always a real token, may see), or None if the keys it sees are not one block running to the end."""
    seen = mask[:, 0, -1, :]
    starts = seen.shape[-1] - seen.sum(-1)
    block = torch.arange(seen.shape[-1], device=seen.device)[None, :] >= starts[:, None]
    return starts.tolist() if mask.shape[0] == batch and bool((seen == block).all()) else None


def _prefill(query, key, value, starts, scaling):
    """Each row's real tokens attend causally among themselves: SDPA's causal kernel, no mask (the mask's
    [B, L, L] float conversion and masked kernel were ~40% of a batched CPU prefill); padded positions get zeros,
    which no real token reads (they are masked as keys here and in every later step)."""
    B, H, L, d = query.shape
    gqa = H != key.shape[1]
    out = query.new_zeros(B, L, H, d)
    for b, s in enumerate(starts):
        o = F.scaled_dot_product_attention(
            query[b : b + 1, :, s:],
            key[b : b + 1, :, s:],
            value[b : b + 1, :, s:],
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        out[b, s:] = o[0].transpose(0, 1)
    return out


def use_generation_attention(model) -> bool:
    """Switch the language model of a transformers VLM/LM on sdpa or eager attention to `generation_attention`
    (every other forward keeps that kernel). Returns False, changing nothing, for any other model or kernel."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    config = getattr(decoder, "config", None)
    base = getattr(config, "_attn_implementation", None)
    if base is None or base.removeprefix(PREFIX) not in ("sdpa", "eager"):  # 4D masks; flash kernels take 2D
        return False
    wrap_kernel(config, PREFIX, generation_attention)
    return True
