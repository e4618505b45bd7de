"""The packed APO step scores every candidate exactly as the plain path does (each candidate alone after image +
prompt, a standard padded forward): log-probs to 1e-5 in fp32, gradients too, LoRA adapter on and off."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from apo.model.logps import forward_logps
from apo.model.packing import PackedGroupCollator, attention_layout, chunked_token_logps, mrope_positions, packed_logps
from apo.trainer.collator import GroupCollator

TEXTS = [
    "small left pleural effusion.",
    "no pneumothorax. lungs are clear.",
    "heart size normal",
    "the heart is normal. there is a small left pleural effusion on the right and edema.",
    "edema",
    "atelectasis and consolidation findings support the diagnosis",
    "right.",
]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(150, 130), (112, 112), (120, 160)]):  # non-square grids exercise mrope h != w
        p = d / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    g = lambda cid, imgs, pos, negs: dict(
        case_id=cid,
        prompt=f"what findings support the diagnosis? ({cid})",
        images=imgs,
        positive=pos,
        negatives=negs,
        teachers=[f"t{k}" for k in range(len(negs))],
    )
    return [
        g("a", [paths[0]], TEXTS[0], TEXTS[1:4]),  # 1+3, candidates of different lengths
        g("b", [paths[1], paths[2]], TEXTS[4], [TEXTS[5]]),  # two images, 1+1
        g("c", [paths[2]], TEXTS[6], TEXTS[:5]),
    ]  # 1+5


def _model(tiny_model_dir, attn, lora):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, attn_implementation=attn, dtype=torch.float32
    )
    torch.manual_seed(0)
    with torch.no_grad():  # a random init near 0 barely depends on context; make attention and positions matter
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3 if ("embed" in n or "lm_head" in n) else 0.15)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                init_lora_weights=False,  # random B: the adapter changes the output
                target_modules=r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
            ),
        )
    return model.eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_mrope_positions_match_get_rope_index(tiny_model_dir, processor, groups):
    model = _model(tiny_model_dir, "sdpa", lora=False)
    for g in groups:
        enc, _ = GroupCollator(processor).encode_group(g)
        ref, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"])
        ours = mrope_positions(
            enc["mm_token_type_ids"][0].tolist(), enc["image_grid_thw"], processor.image_processor.merge_size
        )
        assert torch.equal(ours, ref[:, 0])


@pytest.mark.parametrize(
    "attn,attention", [("sdpa", "segments"), ("eager", "segments"), ("sdpa", "mask"), ("eager", "mask")]
)
def test_packed_logps_match_plain(tiny_model_dir, processor, groups, attn, attention):
    model = _model(tiny_model_dir, attn, lora=True)
    plain, packed = GroupCollator(processor)(groups), PackedGroupCollator(processor)(groups)
    for key in ("group_index", "candidate_index", "valid"):
        assert torch.equal(plain[key], packed[key])
    assert plain["ref_keys"] == packed["ref_keys"]
    assert packed["image_grid_thw"].shape[0] == 4  # one image per group, two for "b": each encoded once
    assert packed["pixel_values"].shape[0] == packed["image_grid_thw"].prod(1).sum() < plain["pixel_values"].shape[0]
    with torch.no_grad():
        for adapter_on in (True, False):  # off = the reference policy
            with contextlib.nullcontext() if adapter_on else model.disable_adapter():
                a, na = forward_logps(model, plain)
                b, nb = packed_logps(model, packed, chunk_size=7, attention=attention)
                if attention == "segments":  # any bucketing of candidates by length gives the same numbers
                    for spread in (1.0, 100.0):
                        rebucketed = dict(packed, packed_layout=attention_layout(packed["packed_segments"], spread))
                        torch.testing.assert_close(packed_logps(model, rebucketed)[0], a, rtol=1e-5, atol=1e-5)
                    for g in range(len(groups)):  # one group a batch: equal prompts, the mask-free causal path
                        one = PackedGroupCollator(processor)(groups[g : g + 1])
                        assert one["packed_layout"]["prompt_mask"] is None
                        torch.testing.assert_close(
                            packed_logps(model, one)[0], a[plain["group_index"] == g], rtol=1e-5, atol=1e-5
                        )
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            assert torch.equal(na, nb)
        on, _ = packed_logps(model, packed, attention=attention)
        with model.disable_adapter():
            off, _ = packed_logps(model, packed, attention=attention)
        assert (on - off).abs().max() > 1e-2  # the adapter matters, so the on/off checks above mean something
        # the check is sensitive: letting candidates see each other, or shifting positions, breaks it
        merged = [[s[0], sum(s[1:])] for s in packed["packed_segments"]]  # candidates as one: they see each other
        leaky = dict(packed, packed_seg=torch.zeros_like(packed["packed_seg"]), packed_layout=attention_layout(merged))
        assert (packed_logps(model, leaky, attention=attention)[0] - on).abs().max() > 1e-2
        shifted = dict(packed, position_ids=packed["position_ids"] + (torch.arange(packed["input_ids"].shape[1]) > 20))
        assert (packed_logps(model, shifted, attention=attention)[0] - on).abs().max() > 1e-2
        # plain forwards of the same model still take the model's own kernel after the packed ones
        torch.testing.assert_close(forward_logps(model, plain)[0], on, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("subset", [slice(None), slice(0, 1)])  # unequal prompts (masks) / one group (causal)
def test_packed_grads_match_plain(tiny_model_dir, processor, groups, subset):
    groups = groups[subset]
    model = _model(tiny_model_dir, "sdpa", lora=True)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, _ in params)
    grads = []
    for collate, fn in ((GroupCollator(processor), forward_logps), (PackedGroupCollator(processor), packed_logps)):
        model.zero_grad()
        logps, _ = fn(model, collate(groups))
        (logps * torch.linspace(1, 2, len(logps))).sum().backward()  # distinct weights: rows cannot swap unnoticed
        grads.append(torch.cat([p.grad.flatten() for _, p in params]))
    assert grads[0].abs().max() > 0
    scale = grads[0].abs().max().item()  # sums of many fp32 terms: tolerance relative to the largest gradient
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5 * scale)


def test_dropped_group_is_left_out(tiny_model_dir, processor, groups):
    """A prompt over max_length drops its group (GroupCollator's policy); the others still match."""
    model = _model(tiny_model_dir, "sdpa", lora=False)
    short = [dict(groups[0], prompt=groups[0]["prompt"] + " again" * 80), groups[2]]
    max_len = GroupCollator(processor).encode_group(groups[2])[0]["input_ids"].shape[1] + 40
    plain, packed = GroupCollator(processor, max_len)(short), PackedGroupCollator(processor, max_len)(short)
    assert not packed["valid"][0].any() and packed["valid"][1].all()
    assert packed["image_grid_thw"].shape[0] == 1  # the dropped group's image is not encoded
    with torch.no_grad():
        torch.testing.assert_close(packed_logps(model, packed)[0], forward_logps(model, plain)[0], rtol=1e-5, atol=1e-5)


def test_chunked_token_logps_matches_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(23, 16, requires_grad=True)
    ids = torch.randint(0, 50, (23,))
    ours = chunked_token_logps(h, ids, head, chunk_size=5, small=0)  # chunked + checkpointed
    torch.testing.assert_close(chunked_token_logps(h, ids, head), ours)  # small: kept, one piece here
    full = torch.log_softmax(head(h), -1).gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(ours, full)
    w = torch.randn(23)
    g_ours = torch.autograd.grad((ours * w).sum(), [h, head.weight])
    g_full = torch.autograd.grad((full * w).sum(), [h, head.weight])
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_logps_form_the_gradient_in_the_forward(dtype):
    """LoRA's frozen lm_head: values and d/d hidden equal log_softmax + gather's (fp32: 1e-6; bf16: the same math
    from the same bf16 logits), over several chunks, and what the backward keeps is [T, H], never [T, V]."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 3000, bias=False).to(dtype).requires_grad_(False)  # CPU pieces: 87 rows
    h = torch.randn(200, 16, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, 3000, (200,))
    ours = chunked_token_logps(h, ids, head)
    assert type(ours.grad_fn).__name__ == "_FrozenHeadLogpsBackward"
    assert [tuple(t.shape) for t in ours.grad_fn.saved_tensors] == [(200, 16)]
    full = torch.log_softmax(head(h).float(), -1).gather(1, ids[:, None]).squeeze(1)
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours, full, **tol)
    w = torch.randn(200)
    (g_ours,), (g_full,) = (torch.autograd.grad((x * w).sum(), [h]) for x in (ours, full))
    torch.testing.assert_close(g_ours, g_full, **tol)
    with torch.no_grad():  # the reference pass: plain log-softmax, same values
        torch.testing.assert_close(chunked_token_logps(h, ids, head), ours.detach(), **tol)
    head.requires_grad_(True)  # a trainable head goes the module way (its weight needs a gradient too)
    assert type(chunked_token_logps(h, ids, head).grad_fn).__name__ != "_FrozenHeadLogpsBackward"


def test_kept_logits_come_in_l2_sized_pieces_with_the_same_values_and_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 12_000, bias=False)  # 2**18 // 12000 = 21 rows a piece: 23 rows -> 2 pieces
    h = torch.randn(23, 16, requires_grad=True)
    ids = torch.randint(0, 12_000, (23,))
    ours = chunked_token_logps(h, ids, head)
    full = torch.log_softmax(head(h), -1).gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(ours, full)
    g_ours, g_full = (torch.autograd.grad(x.sum(), [h, head.weight]) for x in (ours, full))
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b)
