"""APOTrainer on the tiny Qwen2.5-VL, on CPU: the reference, gradient checkpointing, a real run, resume, saving."""

import argparse
import json
import math
import shutil

import pytest
import torch
from trainer_helpers import make_groups

from apo.trainer import cli
from apo.trainer.collator import load_groups
from apo.trainer.config import parse_config
from apo.trainer.trainer import APOTrainer, build_model

DEMO = "configs/apo/demo.yaml"


@pytest.fixture(scope="module")
def groups_file(tmp_path_factory):
    return make_groups(tmp_path_factory.mktemp("apo_groups"), n_groups=4)


LR = ("--learning_rate", "5e-3")  # faster than the demo's 1e-3: a 10-step run must show the loss falling


def _config(tiny_model_dir, groups_file, out, *overrides):
    return parse_config(
        DEMO,
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--groups_file",
            str(groups_file),
            "--output_dir",
            str(out),
            *LR,
            *map(str, overrides),
        ],
    )


def _trainer(config):
    model, processor = build_model(config)
    return APOTrainer(
        model=model, args=config, train_dataset=load_groups(config.groups_file), processing_class=processor
    )


def _perturb_lora(model, seed=0):
    """LoRA B starts at zero (adapter = identity); give it weight so 'adapter disabled' is a real test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _train(tiny_model_dir, groups_file, out, *overrides) -> list[dict]:
    args = argparse.Namespace(
        config=DEMO,
        help_config=False,
        rest=[
            "--model_name_or_path",
            str(tiny_model_dir),
            "--groups_file",
            str(groups_file),
            "--output_dir",
            str(out),
            *LR,
            *map(str, overrides),
        ],
    )
    assert cli.run(args) == 0
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_lora_targets_language_model_only(tiny_model_dir, groups_file, tmp_path):
    model, _ = build_model(_config(tiny_model_dir, groups_file, tmp_path))
    lora = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora and not any("visual" in n for n in lora)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any("language_model.layers.0." in n and proj in n for n in lora), proj
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_reference_is_the_base_model_with_the_adapter_disabled(tiny_model_dir, groups_file, tmp_path):
    from transformers import AutoModelForImageTextToText

    trainer = _trainer(_config(tiny_model_dir, groups_file, tmp_path))
    _perturb_lora(trainer.model)
    batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:2]))
    ref = trainer._reference_forward(trainer.model, batch)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = trainer.logps(base, batch)[0]
        policy = trainer.logps(trainer.model, batch)[0]
    assert torch.allclose(ref, want, atol=1e-4), (ref, want)
    assert (policy - want).abs().max() > 1.0  # the adapter does change the policy; the reference ignores it
    assert not trainer._reference_forward(trainer.model, batch).requires_grad
    # afterwards the adapter is back, trainable as before (our context replaces PEFT's disable_adapter())
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())
    with torch.no_grad():
        assert torch.equal(trainer.logps(trainer.model, batch)[0], policy)
        with trainer.model.disable_adapter():  # PEFT's own context gives the same reference
            assert torch.equal(trainer.logps(trainer.model, batch)[0], ref)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_passes_lora_grads(tiny_model_dir, groups_file, tmp_path, reentrant):
    grads = {}
    for gc in (False, True):
        config = _config(
            tiny_model_dir,
            groups_file,
            tmp_path,
            "--gradient_checkpointing",
            gc,
            "--gradient_checkpointing_kwargs",
            json.dumps({"use_reentrant": reentrant}),
        )
        trainer = _trainer(config)
        _perturb_lora(trainer.model)
        model = trainer.model
        if gc:  # what Trainer.train() does
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model.train()
        batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:2]))
        trainer.compute_loss(model, batch).backward()
        grads[gc] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys()
    for n, g in grads[True].items():
        assert g.abs().sum() > 0, f"no gradient reaches {n} with checkpointing"
        assert torch.allclose(g, grads[False][n], atol=1e-5, rtol=1e-4), n


def test_checkpointing_is_reentrant_except_under_plain_ddp(tiny_model_dir, groups_file, tmp_path):
    """ms-swift's rule: reentrant (no autograd graph in the first forward) alone and under DeepSpeed; non-reentrant
    under DDP. An explicit --gradient_checkpointing_kwargs wins."""
    reentrant = lambda *o: _config(tiny_model_dir, groups_file, tmp_path, *o).gradient_checkpointing_kwargs[
        "use_reentrant"
    ]
    from apo.trainer.config import default_reentrant

    assert reentrant() is True
    assert reentrant("--gradient_checkpointing_kwargs", '{"use_reentrant": false}') is False
    assert (
        default_reentrant(1, False, False) and default_reentrant(4, True, False) and default_reentrant(4, False, True)
    )
    assert not default_reentrant(2, False, False)  # torchrun without DeepSpeed/FSDP


def test_end_to_end_apo_run(tiny_model_dir, groups_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    steps = _train(tiny_model_dir, groups_file, out, "--max_steps", 10)
    assert [h["step"] for h in steps] == list(range(1, 11))
    first, last = steps[0], steps[-1]
    assert first["rewards/margins"] == 0.0  # step 1: the policy is the reference (LoRA B = 0)
    assert last["loss"] < 0.6 * first["loss"]
    assert last["rewards/positive"] > max(0.0, last["rewards/negatives"])  # t+ gains log-prob over pi_ref
    assert last["rewards/margins"] > 0.5 and last["rewards/accuracies"] == 1.0
    assert {"rewards/teacher/GPT-5-nano", "rewards/teacher/Grok-4"} <= set(last)
    assert "apo train: loss" in capsys.readouterr().out

    # adapter + processor in output_dir, a merged model in merged/, both load with from_pretrained
    assert (out / "adapter_model.safetensors").is_file() and (out / "processor_config.json").is_file()
    groups = load_groups(groups_file)
    trainer = _trainer(_config(tiny_model_dir, groups_file, tmp_path / "scratch"))
    batch = trainer.data_collator(groups[:2])
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        a, m = trainer.logps(adapted, batch)[0], trainer.logps(merged, batch)[0]
        direct = trainer.logps(AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32), batch)[0]
    assert torch.allclose(a, m, atol=1e-3) and torch.allclose(a, direct, atol=1e-3)
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(out / "merged").tokenizer is not None


def test_resume_gives_the_same_next_steps(tiny_model_dir, groups_file, tmp_path):
    common = (
        "--max_steps",
        4,
        "--save_strategy",
        "steps",
        "--save_steps",
        2,
        "--lora_dropout",
        0.1,
        "--lr_scheduler_type",
        "linear",
        "--merge_on_save",
        "false",
    )
    straight = _train(tiny_model_dir, groups_file, tmp_path / "a", *common)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = _train(
        tiny_model_dir,
        groups_file,
        tmp_path / "b",
        *common,
        "--resume_from_checkpoint",
        tmp_path / "b" / "checkpoint-2",
    )
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]  # the checkpoint's log history, then the new steps
    for h in resumed[2:]:  # same weights, optimizer moments, data order and dropout RNG as the uninterrupted run
        assert h["loss"] == pytest.approx(straight[h["step"] - 1]["loss"], rel=1e-5, abs=1e-6), h["step"]
        assert h["rewards/margins"] == pytest.approx(straight[h["step"] - 1]["rewards/margins"], abs=1e-5)


def test_precomputed_reference_matches_and_is_reused(tiny_model_dir, groups_file, tmp_path):
    common = ("--max_steps", 3, "--merge_on_save", "false")
    live = _train(tiny_model_dir, groups_file, tmp_path / "live", *common)
    cache = tmp_path / "ref"
    cached = _train(
        tiny_model_dir, groups_file, tmp_path / "c1", *common, "--precompute_ref", "true", "--ref_cache_dir", cache
    )
    files = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert sum(len(b.splitlines()) for n, b in files.items() if n.startswith("ref_logps")) == 4 + 9  # all candidates
    again = _train(
        tiny_model_dir, groups_file, tmp_path / "c2", *common, "--precompute_ref", "true", "--ref_cache_dir", cache
    )
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == files  # reused, nothing recomputed
    for a, b, c in zip(live, cached, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and b["loss"] == pytest.approx(c["loss"], abs=1e-6)
    from apo.errors import ApoError

    with pytest.raises(ApoError, match="reference cache was computed for"):
        _train(
            tiny_model_dir,
            groups_file,
            tmp_path / "c3",
            *common,
            "--precompute_ref",
            "true",
            "--ref_cache_dir",
            cache,
            "--max_length",
            512,
        )


@pytest.mark.parametrize(
    "loss,use_lora,precompute", [("dpo", "true", "false"), ("apo", "false", "false"), ("apo", "false", "true")]
)
def test_first_step_loss_is_the_uniform_ranking(tiny_model_dir, tmp_path, loss, use_lora, precompute):
    """Step 1, policy = reference: every reward is 0, so APO's loss is log(1+N) and DPO's log 2. Covers the DPO
    ablation, full fine-tuning (frozen reference copy, or the reference precomputed before the first update) and
    the SFT term."""
    groups_file = make_groups(tmp_path / "g", n_groups=4, n_negatives=(3,))
    steps = _train(
        tiny_model_dir,
        groups_file,
        tmp_path / "run",
        "--max_steps",
        3,
        "--loss",
        loss,
        "--use_lora",
        use_lora,
        "--sft_weight",
        0.1,
        "--learning_rate",
        1e-3,
        "--merge_on_save",
        "false",
        "--precompute_ref",
        precompute,
    )
    nll = steps[0]["nll/positive"]
    assert nll > 0
    assert steps[0]["loss"] == pytest.approx((math.log(4) if loss == "apo" else math.log(2)) + 0.1 * nll, rel=1e-4)
    assert steps[-1]["rewards/margins"] > 0


def test_sft_adapter_is_merged_and_is_the_reference(tiny_model_dir, groups_file, tmp_path):
    """adapter_name_or_path: pi_st = base + SFT adapter, the reference; merged/ = base + SFT + APO."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = lambda: AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)  # LoRA A init
    sft = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    _perturb_lora(sft, seed=1)
    sft.save_pretrained(tmp_path / "sft")

    trainer = _trainer(_config(tiny_model_dir, groups_file, tmp_path / "x", "--adapter_name_or_path", tmp_path / "sft"))
    batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:2]))
    pi_st = PeftModel.from_pretrained(base(), tmp_path / "sft").eval()
    with torch.no_grad():
        want, plain = trainer.logps(pi_st, batch)[0], trainer.logps(base(), batch)[0]
    assert torch.allclose(trainer._reference_forward(trainer.model, batch), want, atol=1e-4)
    assert (want - plain).abs().max() > 0.1  # the SFT adapter matters (1000x the tolerance above)

    out = tmp_path / "run"
    _train(tiny_model_dir, groups_file, out, "--max_steps", 2, "--adapter_name_or_path", tmp_path / "sft")
    assert json.loads((out / "reference.json").read_text())["sft_adapter"] == str(tmp_path / "sft")
    st = PeftModel.from_pretrained(base(), tmp_path / "sft").merge_and_unload()
    apo = PeftModel.from_pretrained(st, out).eval()
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(trainer.logps(apo, batch)[0], trainer.logps(merged, batch)[0], atol=1e-3)


def test_batch_with_every_group_dropped_is_a_zero_loss(tiny_model_dir, groups_file, tmp_path):
    trainer = _trainer(_config(tiny_model_dir, groups_file, tmp_path, "--max_length", 8))  # prompts are longer
    batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:2]))
    assert trainer.n_rows(batch) == 0
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in trainer.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("extra", [(), ("--gradient_checkpointing", "true")])
def test_packed_and_plain_steps_train_the_same(tiny_model_dir, groups_file, tmp_path, extra):
    """The packed step (default) is a faster way to the same numbers: losses, gradient norms, rewards and the trained
    adapter of a short run match the plain padded rows. (Without LoRA dropout: the packed row has fewer tokens than the
    padded rows, so dropout draws different masks and only the expectations agree.)"""
    from safetensors.torch import load_file

    common = ("--max_steps", 3, "--merge_on_save", "false", "--learning_rate", 1e-2, "--lora_dropout", 0, *extra)
    runs = {p: _train(tiny_model_dir, groups_file, tmp_path / p, *common, "--packed", p) for p in ("true", "false")}
    assert len(runs["true"]) == len(runs["false"]) == 3
    for a, b in zip(runs["true"], runs["false"]):
        for k in ("loss", "grad_norm", "rewards/margins", "rewards/positive", "logps/negatives"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a["step"])
    assert runs["true"][-1]["rewards/margins"] > 0  # it trained
    w = {p: load_file(tmp_path / p / "adapter_model.safetensors") for p in runs}
    for k in w["true"]:
        # Adam divides by sqrt(v): a coordinate whose gradient is near 0 turns fp32 rounding (the two paths' gradients
        # agree to ~1e-6 relative) into a visible part of a step, so a few weights may differ by a few % of lr (1e-2)
        torch.testing.assert_close(w["true"][k], w["false"][k], rtol=1e-3, atol=3e-4)
