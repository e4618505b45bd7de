"""The model card `apo train` writes into its adapter folder and merged/: Hub front matter and the run's facts."""

import argparse
import json

import yaml
from test_swift_rows import multi_turn
from trainer_helpers import make_groups

from apo.trainer import cli
from apo.trainer.collator import load_groups
from apo.trainer.config import parse_config
from apo.trainer.model_card import TAGS, final_metrics, groups_stats, model_card


def _front_matter(text):
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_apo_train_writes_model_cards(tiny_model_dir, tmp_path):
    groups_file = make_groups(tmp_path, n_groups=3, n_negatives=(3, 1, 2))
    images = [g["images"][0] for g in load_groups(groups_file)]
    swift = json.dumps(dict(multi_turn(images * 3), id="mt")) + "\n"  # a fourth group, from an ms-swift-style row
    groups_file.write_text(groups_file.read_text() + swift)
    out = tmp_path / "run"
    rest = ["--model_name_or_path", str(tiny_model_dir), "--groups_file", str(groups_file), "--output_dir", str(out)]
    rest += ["--max_steps", "2", "--learning_rate", "5e-3", "--beta", "0.2", "--lora_r", "4", "--lora_alpha", "16"]
    assert cli.run(argparse.Namespace(config="configs/apo/demo.yaml", help_config=False, rest=rest)) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    last = [h for h in history if "loss" in h][-1]

    meta, body = _front_matter((out / "README.md").read_text())
    assert meta["base_model"] == str(tiny_model_dir) and meta["library_name"] == "peft"
    assert {"apo", "plackett-luce", "preference-optimization", "qwen2.5-vl", "medical"} <= set(meta["tags"])
    assert f"groups file: `{groups_file}` (sha256 " in body
    assert "groups: 4 (1 from ms-swift-style rows); negatives: 10, per group min 1 / mean 2.5 / max 4" in body
    assert "- loss: apo (APO: Plackett-Luce" in body and "- beta: 0.2 " in body
    assert f"reference policy pi_st: `{tiny_model_dir}` itself" in body
    assert (
        "| learning rate | 0.005 (constant" in body
        and "| LoRA | r 4, alpha 16, dropout 0.0, targets all-linear |" in body
    )
    assert "| batch (groups) | 2 per device x 1 accumulation x 1 process(es) = 2 |" in body
    assert f"| loss | {last['loss']:.6g} |" in body and f"| rewards/margins | {last['rewards/margins']:.6g} |" in body
    assert "| step | 2 |" in body

    merged_meta, merged_body = _front_matter((out / "merged" / "README.md").read_text())
    assert merged_meta["library_name"] == "transformers" and merged_meta["base_model"] == str(tiny_model_dir)
    assert "(merged): APO" in merged_body and "the merged model" in merged_body
    assert not list(out.rglob("*.tmp"))  # written atomically: no temporary left behind


def test_card_for_full_fine_tuning_dpo_with_an_sft_adapter(tmp_path):
    args = parse_config(
        "configs/apo/demo.yaml",
        [
            *("--model_name_or_path", "Qwen/Qwen2.5-VL-7B-Instruct", "--adapter_name_or_path", "runs/sft/last"),
            *("--groups_file", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "out")),
            *("--use_lora", "false", "--loss", "dpo", "--max_negatives", "2"),
        ],
    )
    groups = [{"negatives": ["a"] * 2, "teachers": ["x", "y"]}, {"negatives": ["a"], "teachers": ["x"]}]
    meta, body = _front_matter(model_card(args, groups, [], world_size=4))
    assert meta["library_name"] == "transformers" and meta["tags"] == TAGS
    assert "`Qwen/Qwen2.5-VL-7B-Instruct` with the SFT adapter `runs/sft/last` merged in" in body
    assert "pairwise DPO" in body and "| LoRA | none (full fine-tuning) |" in body
    assert "x 4 process(es) = 8 |" in body and "(max_negatives 2)" in body
    assert "No training step was logged." in body and "sha256" not in body  # the file does not exist
    assert groups_stats(groups)["negatives_per_group"] == {"min": 1, "mean": 1.5, "max": 2}
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 2, "rewards/margins": 0.5}, {"train_runtime": 3.0}]
    assert final_metrics(history) == {"step": 2, "loss": 1.0, "rewards/margins": 0.5, "train_runtime": 3.0}
