"""apo.model.decoding: the reserved KV cache and the generation attention give what transformers' defaults give."""

import pytest
import torch
import torch.nn.functional as F

from apo.model.decoding import PREFIX, ReservedLayer, generation_attention


def test_reserved_layer_equals_concatenation_and_writes_in_place():
    torch.manual_seed(0)
    layer = ReservedLayer(reserve=8)
    chunks = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 1, 1, 1, 1)]  # 11 tokens: past the reservation of 8
    for i, k in enumerate(chunks):
        keys, values = layer.update(k, -k)
        want = torch.cat(chunks[: i + 1], dim=-2)
        assert torch.equal(keys, want) and torch.equal(values, -want)
        assert layer.get_seq_length() == want.shape[-2]
        if want.shape[-2] <= 8:  # inside the reservation: views of one buffer, no copy
            assert keys.data_ptr() == layer._kbuf.data_ptr() and layer._kbuf.shape[-2] == 8
    assert layer._kbuf.shape[-2] == 16  # grown by doubling
    layer.batch_select_indices(torch.tensor([2, 0]))  # a reorder replaces the tensors: the next update copes
    keys, _ = layer.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    assert torch.equal(keys[:, :, :11], torch.cat(chunks, dim=-2)[[2, 0]])
    assert torch.equal(keys[:, :, 11], torch.ones(2, 2, 4))


class _Attn(torch.nn.Module):  # what transformers hands an attention function: a module with a config
    def __init__(self, base="sdpa"):
        super().__init__()
        self.config = type("C", (), {"_attn_implementation": PREFIX + base})()
        self.num_key_value_groups = 2
        self.layer_idx = 0
        self.eval()


def _sdpa(q, k, v, mask):  # reference: transformers' path (K/V repeated to every head, boolean mask)
    rep = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    return o.transpose(1, 2)


def eager_attention_forward(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
    """What a model file defines for `eager` (generation_attention finds it in the module of the caller's class)."""
    return _sdpa(q, k, v, mask), None


def _padded_causal(starts, L):
    pos = torch.arange(L)
    causal = pos[None, :] <= pos[:, None]
    return torch.stack([causal & (pos >= s)[None, :] for s in starts])[:, None]  # [B, 1, L, L]


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_generation_attention_equals_the_models_kernel(base):
    torch.manual_seed(1)
    B, H, kv, L, d = 3, 4, 2, 9, 8
    starts = [0, 4, 2]
    q, k, v = torch.randn(B, H, L, d), torch.randn(B, kv, L, d), torch.randn(B, kv, L, d)
    mask = _padded_causal(starts, L)
    module = _Attn(base)
    out, _ = generation_attention(module, q, k, v, mask, scaling=d**-0.5)  # prefill: per-row causal SDPA
    want = _sdpa(q, k, v, mask)
    for b, s in enumerate(starts):
        torch.testing.assert_close(out[b, s:], want[b, s:], rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(out[b, :s]) == 0
    step = mask[:, :, -1:, :]  # decode: one query per row
    out, _ = generation_attention(module, q[:, :, -1:], k, v, step, scaling=d**-0.5)
    torch.testing.assert_close(out, _sdpa(q[:, :, -1:], k, v, step), rtol=1e-5, atol=1e-6)
    float_step = torch.zeros(step.shape).masked_fill(~step, torch.finfo(torch.float32).min)  # additive masks too
    out, _ = generation_attention(module, q[:, :, -1:], k, v, float_step, scaling=d**-0.5)
    torch.testing.assert_close(out, _sdpa(q[:, :, -1:], k, v, step), rtol=1e-5, atol=1e-6)
    holed = _padded_causal([0, 0, 0], L)
    holed[1, :, :, 3] = False  # not causal + left padding: handed to the model's kernel, which takes any mask
    out, _ = generation_attention(module, q, k, v, holed, scaling=d**-0.5)
    torch.testing.assert_close(out, _sdpa(q, k, v, holed), rtol=1e-5, atol=1e-6)


def test_fast_generation_equals_transformers_defaults(tmp_path, tiny_model_dir, monkeypatch):
    """Same tokens and, step by step, the same logits (1e-5) as DynamicCache + the model's sdpa, on a left-padded
    batch of prompts of different lengths and image counts."""
    import numpy as np
    from PIL import Image

    from apo.model.chat import prompt_text
    from apo.model.decoding import ReservedCache, use_generation_attention
    from apo.model.generation import encode, generate
    from apo.model.loading import load_model

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((rng.random((112, 112)) * 255).astype("uint8")).save(paths[-1])
    requests = [
        ([paths[0]], "Is there an effusion on the left or on the right side of the chest?"),
        ([paths[0], paths[1]], "Compare."),
        ([], "No image here."),
        ([paths[1]], "Findings?"),
    ]
    import apo.model.decoding as D

    calls = {"_prefill": 0, "_decode": 0}
    for name in calls:  # the fast paths really run (not the fallback)

        def spy(*a, _f=getattr(D, name), _n=name):
            calls[_n] += 1
            return _f(*a)

        monkeypatch.setattr(D, name, spy)
    fast, processor = load_model(tiny_model_dir)
    plain, _ = load_model(tiny_model_dir)
    assert use_generation_attention(fast)
    assert fast.get_decoder().config._attn_implementation == PREFIX + "sdpa"
    assert plain.get_decoder().config._attn_implementation == "sdpa"

    from apo.model.chat import load_images

    batch = encode(
        processor, [prompt_text(processor, len(p), t) for p, t in requests], [load_images(p) for p, _ in requests]
    )
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    kw = dict(
        max_new_tokens=12,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    with torch.inference_mode():
        a = fast.generate(**batch, **kw, past_key_values=ReservedCache(batch["input_ids"].shape[1] + 12))
        b = plain.generate(**batch, **kw)
    layers = fast.get_decoder().config.num_hidden_layers
    assert calls == {"_prefill": layers, "_decode": 11 * layers}
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert generate(fast, processor, requests, max_new_tokens=12, batch_size=4, progress=False) == generate(
        plain, processor, requests, max_new_tokens=12, batch_size=4, progress=False, fast=False
    )


def test_wrappers_stack_with_the_packed_training_attention(tiny_model_dir):
    """A model switched to both our kernels (generation, then the packed step) still computes its plain forward."""
    from apo.model.chat import prompt_text
    from apo.model.decoding import use_generation_attention
    from apo.model.generation import encode
    from apo.model.loading import load_model
    from apo.model.packing import PREFIX as SEGMENTS
    from apo.model.packing import use_segment_attention

    model, processor = load_model(tiny_model_dir)
    plain, _ = load_model(tiny_model_dir)
    use_generation_attention(model)
    use_segment_attention(model)
    assert model.get_decoder().config._attn_implementation == SEGMENTS + PREFIX + "sdpa"
    batch = encode(
        processor, [prompt_text(processor, 0, t) for t in ("short", "a much longer question here")], [[], []]
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[:, -1], plain(**batch).logits[:, -1], rtol=1e-5, atol=1e-5)
        model.train(), plain.train()  # generation_attention hands training forwards on: through the whole stack
        torch.testing.assert_close(model(**batch).logits[:, -1], plain(**batch).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_models_with_sliding_window_layers_keep_transformers_defaults(tiny_model_dir, monkeypatch):
    from transformers import Qwen2_5_VLConfig

    import apo.model.decoding as D
    import apo.model.generation as G

    sliding = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=1,
        )
    )
    model, processor = G.load_model(tiny_model_dir)
    assert G._full_attention_only(model.config) and not G._full_attention_only(sliding)
    monkeypatch.setattr(G, "_full_attention_only", lambda config: False)  # as for such a model
    monkeypatch.setattr(D, "ReservedCache", lambda reserve: pytest.fail("ReservedCache for a sliding-window model"))
    assert G.generate(model, processor, [([], "Findings?")], max_new_tokens=3, progress=False)
    assert model.get_decoder().config._attn_implementation == "sdpa"
