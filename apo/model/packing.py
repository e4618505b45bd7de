"""The fast APO step: one packed row per batch, the image and the prompt computed once per group.

Plain path: a group {t+, t_1..t_N} is 1+N padded rows, each = image + prompt + one candidate, so the vision tower
and the shared prompt run 1+N times (2N times, and again for the reference, in the pairwise DPO recipe). Here a
batch of groups is ONE row, no padding:

    [prompt_1][cand_1,0][cand_1,1]..[cand_1,N] [prompt_2][cand_2,0].. ...

with a block attention mask: a prompt token sees its own prompt causally; a candidate token sees its group's whole
prompt and, causally, its own candidate - never another candidate or another group. Positions are Qwen2.5-VL's
mrope ids (3 x T) of the prompt as the processor lays it out, and every candidate starts at the same position
after its prompt, so each candidate's log-prob is exactly what it gets alone after the prompt (tested to 1e-5 in
fp32 against the plain path). The first token of every candidate is predicted from its prompt's last position.

Log-probs never materialise [tokens, vocab] logits at once: the final hidden states are gathered at the label
positions and pushed through the lm_head `chunk_size` rows at a time (each chunk checkpointed, so the backward
recomputes one chunk's logits instead of keeping them all).

Attention (`attention=`): "segments" (default) computes only the blocks the mask allows: the prompts as one
[groups, Pmax] batch (causal), the candidates in a few length buckets [m, Lb] whose keys are [their prompt; their
own tokens] - a handful of SDPA calls per layer, gathered from and scattered back to the packed row. A dense mask
over the row costs T^2 and wastes most of it (attention was 70% of the tiny CPU step); a loop over candidates costs
a kernel per candidate and layer (GPU launch-bound); one batch padded to the longest candidate wastes up to 3x on
CXR-MAX's spread of answer lengths. It is an attention function registered with transformers
and set on the language model's config the first time (`use_segment_attention`); without the `packed_layout`
argument it hands over to the model's own kernel, so plain forwards and generation are unchanged.
"mask" gives the model the dense 4D block mask instead (boolean for sdpa, additive for eager, a BlockMask that
skips masked tiles for flex_attention): a second, independent implementation, kept for checking and for flex.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from apo.model.attention import model_kernel, wrap_kernel
from apo.model.logps import eval_mode
from apo.trainer.collator import GroupCollator, candidate_key


def mrope_positions(mm_types: list[int], image_grid_thw, merge: int) -> torch.Tensor:
    """Qwen2.5-VL rope index (3 x L) of one prompt, as `Qwen2_5_VLModel.get_rope_index` computes it for images:
    text runs count up on all three axes; an image block takes (t, h, w) grid positions offset by the running
    position, which then advances by max(h, w) / merge."""
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    out, pos, i, n = [], 0, 0, len(mm_types)
    while i < n:
        if mm_types[i] == 0:
            j = i
            while j < n and mm_types[j] == 0:
                j += 1
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        else:
            t, h, w = next(grids)
            h, w = h // merge, w // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            out.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)  # still images: temporal step 1
            j = i + t * h * w
            pos += max(h, w)
        i = j
    return torch.cat(out, 1) if out else torch.zeros(3, 0, dtype=torch.long)


class PackedGroupCollator(GroupCollator):
    """Same tokenisation, truncation and dropping as `GroupCollator` (it reuses `encode_group`), packed output.

    Per candidate row r (valid candidates only, in group-major order) the plain batch's `group_index`,
    `candidate_index`, `ref_keys` are kept, so the trainer scatters into [B, 1+N] the same way. The packed row:
    input_ids [1, T], position_ids [3, 1, T] (mrope), label_positions / label_ids / label_rows [K] (K response
    tokens), pixel_values once per group; `packed_logps(model, batch)` -> ([R] summed log-probs, [R] tokens)."""

    def __call__(self, groups: list[dict]) -> dict:
        merge = self.processor.image_processor.merge_size
        n_cols = 1 + max(len(g["negatives"]) for g in groups)
        valid = torch.zeros(len(groups), n_cols, dtype=torch.bool)
        ids, pos, seq, seg, segments = [], [], [], [], []
        lab_pos, lab_ids, lab_row = [], [], []
        pixels, grids, gidx, cidx, keys = [], [], [], [], []
        for b, g in enumerate(groups):
            enc, responses = self.encode_group(g)
            if not any(r is not None for r in responses):
                continue  # dropped group: no row at all (valid stays False)
            p_ids = enc["input_ids"][0]
            mm = enc.get("mm_token_type_ids", torch.zeros_like(enc["input_ids"]))[0].tolist()
            p_pos = mrope_positions(mm, enc.get("image_grid_thw"), merge)
            start, last = int(p_pos.max()) + 1 if p_pos.numel() else 0, len(ids) + len(p_ids) - 1
            ids += p_ids.tolist()
            pos.append(p_pos)
            seq += [b] * len(p_ids)
            seg += [0] * len(p_ids)
            segments.append([len(p_ids)])
            if "pixel_values" in enc:  # once per group
                pixels.append(enc["pixel_values"])
                grids.append(enc["image_grid_thw"])
            for j, (c, text) in enumerate(zip(responses, [g["positive"], *g["negatives"]])):
                if c is None:
                    continue
                valid[b, j] = True
                r, off = len(gidx), len(ids)
                lab_pos += [last] + list(range(off, off + len(c) - 1))  # token k predicted at position of k-1
                lab_ids += c
                lab_row += [r] * len(c)
                ids += c
                pos.append(torch.arange(start, start + len(c)).expand(3, -1))  # as if alone after the prompt
                seq += [b] * len(c)
                seg += [j + 1] * len(c)
                segments[-1].append(len(c))
                gidx.append(b)
                cidx.append(j)
                keys.append(candidate_key(g["case_id"], text))
        T = len(ids)
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long).view(1, T),
            "position_ids": (torch.cat(pos, 1) if pos else torch.zeros(3, 0, dtype=torch.long)).view(3, 1, T),
            "packed_seq": torch.tensor(seq, dtype=torch.long),
            "packed_seg": torch.tensor(seg, dtype=torch.long),
            "packed_segments": segments,  # per group [prompt length, candidate lengths...], row order
            "packed_layout": attention_layout(segments) if segments else None,
            "label_positions": torch.tensor(lab_pos, dtype=torch.long),
            "label_ids": torch.tensor(lab_ids, dtype=torch.long),
            "label_rows": torch.tensor(lab_row, dtype=torch.long),
            "group_index": torch.tensor(gidx, dtype=torch.long),
            "candidate_index": torch.tensor(cidx, dtype=torch.long),
            "valid": valid,
            "case_id": [g["case_id"] for g in groups],
            "teachers": [list(g["teachers"]) for g in groups],
            "ref_keys": keys,
        }
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat(grids)
        return batch


def block_mask(seq: torch.Tensor, seg: torch.Tensor, attn_implementation: str, dtype=torch.float32):
    """The 4D mask of a packed row: same group, causal, and (prompt key or same candidate)."""
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return (seq[q] == seq[k]) & (k <= q) & ((seg[k] == 0) | (seg[k] == seg[q]))

        T = seq.numel()
        return create_block_mask(mask_mod, B=1, H=None, Q_LEN=T, KV_LEN=T, device=seq.device)
    T = seq.numel()
    causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
    allowed = causal & (seq[:, None] == seq[None, :]) & ((seg[None, :] == 0) | (seg[:, None] == seg[None, :]))
    allowed = allowed.view(1, 1, T, T)
    if attn_implementation == "eager":  # eager adds the mask to the scores
        return torch.zeros(allowed.shape, dtype=dtype, device=seq.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed  # sdpa (and anything taking a boolean "may attend" mask)


def _picked_logps(logits, ids):
    return torch.log_softmax(logits.float(), -1).gather(1, ids[:, None]).squeeze(1)


def _token_logps(h, ids, lm_head):
    return _picked_logps(lm_head(h.to(lm_head.weight.dtype)), ids)


def _logps_through(hidden, ids, weight, chunk_size):
    """log p(ids | hidden) through a head weight W [V, H], no gradient, `chunk_size` rows of logits at a time."""
    parts = [
        _picked_logps(h.to(weight.dtype) @ weight.t(), t)
        for h, t in zip(hidden.split(chunk_size), ids.split(chunk_size))
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(ids | hidden) through a frozen lm_head weight W [V, H], with its gradient computed in the forward.

    d logp_t / d h_t = (onehot(id_t) - softmax(h_t W^T)) W is known as soon as the softmax is (the upstream
    gradient of a token log-prob is one number per token), so each chunk's logits are used once and dropped: the
    backward is `g[:, None] * D` with D [T, H] saved - no [T, V] logits kept, no recompute of the lm_head matmul
    and no second pass over the vocabulary (Liger's fused-linear-cross-entropy idea, in plain torch ops). One exp
    pass per chunk serves both the log-normaliser and the softmax."""

    @staticmethod
    def forward(ctx, hidden, ids, weight, chunk_size):
        outs, grads = [], []
        for h, t in zip(hidden.split(chunk_size), ids.split(chunk_size)):
            logits = (h.to(weight.dtype) @ weight.t()).float()
            picked = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(-1, keepdim=True)
            e = logits.sub_(top).exp_()  # in place: this chunk's logits are not needed again
            total = e.sum(-1, keepdim=True)
            outs.append(picked - top.squeeze(1) - total.log().squeeze(1))
            e.div_(total).neg_().scatter_add_(1, t[:, None], torch.ones_like(total))  # onehot - softmax
            grads.append((e.to(weight.dtype) @ weight).to(hidden.dtype))
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(hidden.shape))
        return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return grad[:, None].to(d.dtype) * d, None, None, None


def chunked_token_logps(
    hidden: torch.Tensor, ids: torch.Tensor, lm_head, chunk_size: int = 1024, small: int = 2**22
) -> torch.Tensor:
    """log p(ids | hidden) per row in float32, `chunk_size` rows of logits alive at a time.

    Gradient to `hidden` through a frozen lm_head (LoRA; the usual case): `_FrozenHeadLogps`, the gradient formed in
    the forward, [T, H] kept. Otherwise (a trainable or ZeRO-3-partitioned lm_head, which must run as a module):
    each chunk is checkpointed and recomputed in the backward; up to `small` logits in all (16 MB in float32, a tiny
    vocabulary) they are simply kept (no checkpoint): recomputing would cost more than it saves."""
    weight = lm_head.weight
    if weight.numel() == 0 and hasattr(weight, "ds_id") and not weight.requires_grad:
        # ZeRO-3 partitions the frozen head. Run as a module, it would be gathered once per chunk, and processes with
        # different token counts would make different numbers of collective calls: a deadlock. Gather it once here
        # (every process calls this once per forward); the frozen-head gradient needs no weight in the backward.
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            if torch.is_grad_enabled() and hidden.requires_grad:
                return _FrozenHeadLogps.apply(hidden, ids, weight, chunk_size)
            return _logps_through(hidden, ids, weight, chunk_size)
    vocab = getattr(lm_head, "out_features", None) or weight.shape[0]
    cpu = hidden.device.type == "cpu"  # on CPU cache-sized pieces (~1 MB of logits): a fresh multi-MB buffer costs
    # page faults (its log-softmax ran 3-4x slower than in a loop on the same data, on a VM)
    piece = max(16, 2**18 // vocab)
    if (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and weight.numel()
        and type(lm_head) is torch.nn.Linear
        and lm_head.bias is None
    ):
        return _FrozenHeadLogps.apply(hidden, ids, weight, min(chunk_size, piece) if cpu else chunk_size)
    keep = hidden.shape[0] * vocab <= small
    if keep:  # on GPU one piece, one launch
        chunk_size = piece if cpu else max(1, hidden.shape[0])
    parts = []
    for h, t in zip(hidden.split(chunk_size), ids.split(chunk_size)):
        if torch.is_grad_enabled() and h.requires_grad and not keep:
            parts.append(checkpoint(_token_logps, h, t, lm_head, use_reentrant=False))
        else:
            parts.append(_token_logps(h, t, lm_head))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


PREFIX = "apo_segments_"  # + the model's own kernel name, which plain forwards keep using


def attention_layout(segments: list[list[int]], spread: float = 1.5) -> dict:
    """Gather indices for `segment_attention` from [[prompt length, candidate lengths...], ...] (row order).

    Prompts become one [G, Pmax] batch attending causally to themselves. Candidates, sorted by length, go into a
    few batches [m, Lb] (a new batch when a length falls below Lb / `spread`, so padding stays under ~1.5x) whose
    keys are [their group's prompt (padded to Pmax); themselves (padded to Lb)]. `inv` maps each packed position
    to its row in the concatenated outputs. Padded slots point at position 0 and are masked out as keys."""
    G, Pm = len(segments), max(s[0] for s in segments)
    # all prompts alike (always so with one group per batch): no mask at all - the prompts are plain causal and a
    # candidate padded at its end is lower-right causal over [prompt; own] (its valid queries never reach its
    # padding), which SDPA runs with its causal kernels; padded queries' outputs are never read
    uniform = all(s[0] == Pm for s in segments)
    causal = lambda n: torch.ones(n, n, dtype=torch.bool).tril()
    q_prompt, p_ok = torch.zeros(G, Pm, dtype=torch.long), torch.zeros(G, Pm, dtype=torch.bool)
    cands, off = [], 0  # (length, first position, prompt positions)
    for g, (P, *lens) in enumerate(segments):
        q_prompt[g, :P], p_ok[g, :P] = torch.arange(off, off + P), True
        prompt, off = q_prompt[g, :P], off + P
        for L in lens:
            cands.append((L, off, prompt))
            off += L
    slot = torch.empty(off, dtype=torch.long)  # packed position -> row of the concatenated outputs
    slot[q_prompt[p_ok]] = torch.arange(G * Pm).view(G, Pm)[p_ok]
    buckets, row = [], G * Pm
    order = sorted(range(len(cands)), key=lambda i: -cands[i][0])
    while order:
        Lb = cands[order[0]][0]
        take = [i for i in order if cands[i][0] * spread >= Lb]
        order = order[len(take) :]
        q, k = torch.zeros(len(take), Lb, dtype=torch.long), torch.zeros(len(take), Pm + Lb, dtype=torch.long)
        ok = torch.zeros(len(take), Pm + Lb, dtype=torch.bool)
        for m, i in enumerate(take):
            L, first, prompt = cands[i]
            q[m, :L] = torch.arange(first, first + L)
            k[m, : len(prompt)], ok[m, : len(prompt)] = prompt, True
            k[m, Pm : Pm + L], ok[m, Pm : Pm + L] = q[m, :L], True
            slot[first : first + L] = torch.arange(row + m * Lb, row + m * Lb + L)
        own = torch.cat([torch.ones(Lb, Pm, dtype=torch.bool), causal(Lb)], 1)  # whole prompt, then causal
        buckets.append({"q": q, "k": k, "mask": None if uniform else (own & ok[:, None, :])[:, None]})
        row += len(take) * Lb
    return {
        "q_prompt": q_prompt,
        "prompt_mask": None if uniform else (causal(Pm) & p_ok[:, None, :])[:, None],
        "cands": buckets,
        "inv": slot,
    }


def segment_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_layout=None, **kwargs
):
    """Block-sparse attention of a packed row ([1, heads, T, d] in, [1, T, heads, d] out, like transformers' sdpa):
    one SDPA call for the prompts and one per candidate length bucket, whatever the number of groups."""
    if packed_layout is None:  # any other forward: the model's own kernel
        return model_kernel(module, PREFIX)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    from torch.nn.attention.bias import causal_lower_right

    lay, p = packed_layout, (dropout if module.training else 0.0)
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, heads, d]
    rep = q.shape[1] // k.shape[1]  # grouped-query attention: share each K/V head

    def attend(qi, ki, mask, causal):
        Q, K, V = q[qi].transpose(1, 2), k[ki].transpose(1, 2), v[ki].transpose(1, 2)
        # the causal kernels share K/V heads themselves (enable_gqa): no copy, ~10% of the tiny CPU step. CPU only
        # until checked on a GPU, where lower-right causal goes to the raw flash op; a tensor mask never (CUDA's
        # memory-efficient kernel takes masks but not GQA)
        gqa = rep > 1 and mask is None and Q.device.type == "cpu"
        if rep > 1 and not gqa:
            K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
        if mask is None and causal == "lower_right":
            mask = causal_lower_right(Q.shape[2], K.shape[2])
        o = F.scaled_dot_product_attention(
            Q, K, V, attn_mask=mask, dropout_p=p, scale=scaling, is_causal=mask is None, enable_gqa=gqa
        )
        return o.transpose(1, 2).flatten(0, 1)  # [B * L, heads, d]

    out = [attend(lay["q_prompt"], lay["q_prompt"], lay["prompt_mask"], "top_left")]
    out += [attend(b["q"], b["k"], b["mask"], "lower_right") for b in lay["cands"]]
    return torch.cat(out)[lay["inv"]][None], None


def use_segment_attention(model):
    """Register `segment_attention` for the language model's current kernel and switch its config to it."""
    wrap_kernel(_inner(model).get_decoder().config, PREFIX, segment_attention)


@functools.cache
def _takes_encoder_outputs(cls) -> bool:  # transformers >= 5.19 (Qwen2.5-VL `mm_encoder_outputs`)
    return "mm_encoder_outputs" in inspect.signature(cls.forward).parameters


def _frozen_vision(inner) -> bool:
    """No trainable vision weight (LoRA on the language model only), so the image features do not depend on the
    adapter or need a gradient; and this transformers takes precomputed features."""
    return _takes_encoder_outputs(type(inner)) and not any(p.requires_grad for p in inner.model.visual.parameters())


def _inner(model):
    """The transformers model under DDP/DeepSpeed (`.module`) and PEFT wrappers, for its config and lm_head."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packed_logps(model, batch: dict, chunk_size: int = 1024, attention: str = "segments"):
    """Packed batch -> (summed response log-probs [R] float32, response tokens [R]), R = candidate rows.

    Same contract as `apo.model.logps.forward_logps`. The model is called through its own (possibly wrapped)
    forward, so DDP/DeepSpeed hooks and a PEFT `disable_adapter()` context apply as usual, with the logits of one
    position only (`logits_to_keep=1`); a hook on the final norm takes the hidden states. With a frozen vision
    tower the image features are computed once per batch and kept in `batch` for the next pass (policy, then
    reference)."""
    inner = _inner(model)
    dev = batch["input_ids"].device
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw") if k in batch}
    if "pixel_values" in batch and _frozen_vision(inner):  # policy and reference passes share one encoding
        owner, feats = batch.get("_image_features", (None, None))
        visual = inner.model.visual
        if owner is not visual:  # encoded by this vision tower, not another model's
            # no grad and no backward through it: eval mode for the call, so gradient checkpointing does not wrap
            # its blocks for nothing (reentrant checkpointing warns about it); its attention dropout is fixed at 0
            with eval_mode(visual), torch.no_grad():
                feats = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
            batch["_image_features"] = (visual, feats)
        inputs.pop("pixel_values")
        inputs["mm_encoder_outputs"] = {"image": feats}
    if attention == "segments":
        use_segment_attention(inner)
        # an empty 4D mask: transformers passes a 4D mask through as-is, so no T x T mask is ever built
        inputs.update(
            attention_mask=torch.zeros(1, 1, 0, 0, dtype=torch.bool, device=dev), packed_layout=batch["packed_layout"]
        )
    else:
        kernel = inner.get_decoder().config._attn_implementation.removeprefix(PREFIX)
        inputs["attention_mask"] = block_mask(
            batch["packed_seq"].to(dev), batch["packed_seg"].to(dev), kernel, inner.dtype
        )
    final = []  # the final norm's output as the model computes it (accelerate's bf16 wrapper upcasts outputs)
    hook = inner.get_decoder().norm.register_forward_hook(lambda mod, args, out: final.append(out))
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    hidden = final[-1][0]  # [T, H]
    tok = chunked_token_logps(
        hidden[batch["label_positions"]], batch["label_ids"], inner.get_output_embeddings(), chunk_size
    )
    rows, R = batch["label_rows"], len(batch["group_index"])
    logps = torch.zeros(R, dtype=torch.float32, device=dev).index_add(0, rows, tok)
    return logps, torch.bincount(rows, minlength=R)
