"""ms-swift-style preference rows with several rejected answers: parsing, bad rows, both training paths, `apo train`."""

import argparse
import json

import pytest
import torch
from test_packing import _model
from trainer_helpers import NEGATIVES, POSITIVE, make_images

from apo.errors import DataError
from apo.model.logps import forward_logps
from apo.model.packing import PackedGroupCollator, mrope_positions, packed_logps
from apo.trainer import cli
from apo.trainer.collator import GroupCollator, load_groups

REJECTED = [t for _, t in NEGATIVES] + ["no acute cardiopulmonary process."]  # four negatives


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("swift_images"), n=3, seed=5)


def row(imgs, **kw):
    base = {
        "messages": [
            {"role": "user", "content": "<image>what findings support the diagnosis of effusion?"},
            {"role": "assistant", "content": POSITIVE},
        ],
        "images": imgs[:1],
        "rejected_responses": REJECTED,
    }
    return {**base, **kw}


def multi_turn(images):
    return row(
        images,
        messages=[
            {"role": "system", "content": "You are a careful radiologist."},
            {"role": "user", "content": "<image>describe the image."},
            {"role": "assistant", "content": "the heart size is normal."},
            {"role": "user", "content": "<image>compare with the prior <image>: what changed?"},
            {"role": "assistant", "content": POSITIVE},
        ],
        images=images[:3],
    )


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_rows(directory, rows, name="rows.jsonl"):
    return load_groups(write(directory / name, rows))


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_one_and_several_negatives(tmp_path, images):
    one = row(images, id="one", rejected_response="there is a small right pleural effusion.")
    del one["rejected_responses"]
    path = write(tmp_path / "rows.jsonl", [one, row(images)])
    a, b = load_groups(path)
    assert a["case_id"] == "one" and a["negatives"] == ["there is a small right pleural effusion."]
    assert a["teachers"] == ["rejected_1"] and a["positive"] == POSITIVE
    assert b["negatives"] == REJECTED and b["teachers"] == [f"rejected_{i}" for i in range(1, 5)]
    assert b["case_id"].startswith("swift-") and b["images"] == images[:1]
    assert b["messages"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": a["prompt"]}]}]
    (c,) = load_groups(write(tmp_path / "r2.jsonl", [row(images)]), max_negatives=2)
    assert c["negatives"] == REJECTED[:2] and c["teachers"] == ["rejected_1", "rejected_2"]


def test_groups_and_swift_rows_mix_in_one_file(tmp_path, images):
    group = {"case_id": "g", "prompt": "q?", "images": images[:1], "positive": "a.", "negatives": ["b."]}
    path = write(tmp_path / "mixed.jsonl", [dict(group, teachers=["T"]), row(images)])
    g, s = load_groups(path)
    assert "messages" not in g and s["messages"][0]["role"] == "user"


def test_prompt_keeps_history_and_system(processor, images, tmp_path):
    collator = GroupCollator(processor)
    g = load_rows(tmp_path, [multi_turn(images)])[0]
    enc, responses = collator.encode_group(g)
    text = processor.tokenizer.decode(enc["input_ids"][0])
    assert text.count("<|im_start|>system") == 1 and "You are a careful radiologist." in text
    assert "You are a helpful assistant." not in text
    assert text.index("describe the image.") < text.index("the heart size is normal.") < text.index("what changed?")
    assert text.count("<|vision_start|>") == 3 and enc["image_grid_thw"].shape[0] == 3
    assert text.endswith("<|im_start|>assistant\n") and len(responses) == 5 and all(responses)
    # no system turn: the chat template's default system prompt, as ms-swift's qwen2_5_vl template does
    plain = collator.encode_group(load_rows(tmp_path, [row(images)], "one.jsonl")[0])[0]
    assert "You are a helpful assistant." in processor.tokenizer.decode(plain["input_ids"][0])


def _bad_rows(images):
    ok = row(images)
    msgs = ok["messages"]
    return {
        "no assistant turn last": (
            dict(ok, messages=msgs[:1]),
            "the last message must be the assistant's chosen answer",
        ),
        "no rejected": ({k: v for k, v in ok.items() if k != "rejected_responses"}, "no rejected answers"),
        "empty rejected list": (dict(ok, rejected_responses=[]), "rejected_responses is empty"),
        "list in rejected_response": (
            {**{k: v for k, v in ok.items() if k != "rejected_responses"}, "rejected_response": [msgs[1]]},
            "rejected_response is a list",
        ),
        "both keys": (
            dict(ok, rejected_response="x"),
            "give rejected_responses \\(several\\) or rejected_response \\(one\\), not both",
        ),
        "tag count": (dict(ok, images=images[:2]), "1 <image> tag\\(s\\) in messages but 2 image\\(s\\)"),
        "empty chosen": (
            dict(ok, messages=[msgs[0], {"role": "assistant", "content": " "}]),
            "message 2 \\(assistant\\): empty content",
        ),
        "empty rejected": (dict(ok, rejected_responses=["a", ""]), "rejected answer 2 must be a non-empty string"),
        "rejected not a string": (dict(ok, rejected_responses=["a", 3]), "rejected answer 2 must be"),
        "content not a string": (
            dict(ok, messages=[{"role": "user", "content": [{"type": "text"}]}, msgs[1]]),
            "message 1 \\(user\\): content must be a string, got list",
        ),
        "messages not a list": (dict(ok, messages="hi"), "messages must be a non-empty list"),
        "unknown role": (
            dict(ok, messages=[{"role": "tool", "content": "x"}, msgs[1]]),
            "message 1: role must be one of system, user, assistant, got .tool.",
        ),
        "late system": (
            dict(ok, messages=[msgs[0], {"role": "system", "content": "s"}, msgs[1]]),
            "message 2: a system message must come first",
        ),
        "no user turn": (dict(ok, messages=[{"role": "system", "content": "s"}, msgs[1]]), "no user turn"),
        "images wrong type": (dict(ok, images=7), "images must be a list of paths, got int"),
        "teachers mismatch": (dict(ok, teachers=["a"]), "teachers must be non-empty strings, one per rejected"),
        "missing image": (dict(ok, images=["/no/such.png"]), "image not found: /no/such.png"),
    }


@pytest.mark.parametrize("case", list(_bad_rows(["x"])))
def test_bad_rows_give_one_line_errors(tmp_path, images, case):
    bad, message = _bad_rows(images)[case]
    path = write(tmp_path / "rows.jsonl", [row(images, id="good"), bad])
    with pytest.raises(DataError, match=rf"^{tmp_path}/rows.jsonl:2: {message}") as e:
        load_groups(path)
    assert "\n" not in str(e.value)


def test_skip_bad_lists_rejects_and_keeps_the_good_rows(tmp_path, images):
    bad = _bad_rows(images)
    rows = [row(images, id="a"), bad["tag count"][0], "not an object", row(images, id="a"), row(images, id="b")]
    path = write(tmp_path / "rows.jsonl", rows)
    (tmp_path / "rows.jsonl").write_text(path.read_text() + "{not json\n")
    kept = load_groups(path, skip_bad=True, rejects_path=tmp_path / "rej.jsonl")
    assert [g["case_id"] for g in kept] == ["a", "b"]
    rejects = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert [r["record"] for r in rejects] == [2, 3, 4, 6]
    assert "image" in rejects[0]["reason"] and "duplicate case_id 'a'" in rejects[2]["reason"]
    assert rejects[3]["reason"].startswith("invalid JSON")


def test_packed_and_plain_logps_agree_on_a_multi_turn_row(tiny_model_dir, processor, images, tmp_path):
    groups = load_rows(tmp_path, [multi_turn(images), row(images, id="single")])
    model = _model(tiny_model_dir, "sdpa", lora=True)
    for g in groups:  # the prompt's mrope positions over two turns and three images, as the model computes them
        enc, _ = GroupCollator(processor).encode_group(g)
        rope = model.get_base_model().model.get_rope_index
        ref, _ = rope(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"])
        ours = mrope_positions(
            enc["mm_token_type_ids"][0].tolist(), enc["image_grid_thw"], processor.image_processor.merge_size
        )
        assert torch.equal(ours, ref[:, 0])
    plain, packed = GroupCollator(processor)(groups), PackedGroupCollator(processor)(groups)
    assert packed["image_grid_thw"].shape[0] == 4 and plain["valid"].sum() == 10
    with torch.no_grad():
        a, na = forward_logps(model, plain)
        for attention in ("segments", "mask"):
            b, nb = packed_logps(model, packed, attention=attention)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            assert torch.equal(na, nb)
        # the history matters: the same last turn without the earlier turns scores differently
        short = dict(groups[0], messages=groups[0]["messages"][-1:], images=groups[0]["images"][1:])
        c, _ = forward_logps(model, GroupCollator(processor)([short]))
    assert (c - a[:5]).abs().max() > 1e-3


def test_apo_train_on_swift_rows_with_four_negatives(tiny_model_dir, images, tmp_path, capsys):
    rows = [row(images, id=f"r{i}", images=[images[i % 3]]) for i in range(3)] + [dict(multi_turn(images), id="mt")]
    path = write(tmp_path / "swift.jsonl", rows)
    out = tmp_path / "run"
    args = argparse.Namespace(
        config="configs/apo/demo.yaml",
        help_config=False,
        rest=[
            *("--model_name_or_path", str(tiny_model_dir), "--groups_file", str(path), "--output_dir", str(out)),
            *("--learning_rate", "5e-3", "--max_steps", "8", "--logging_steps", "1"),
        ],
    )
    assert cli.run(args) == 0
    steps = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(steps) == 8
    first, last = steps[0], steps[-1]
    assert abs(first["loss"] - torch.log(torch.tensor(5.0)).item()) < 1e-3  # step 1: uniform over 1 + 4 candidates
    assert last["loss"] < 0.7 * first["loss"] and last["rewards/margins"] > 0
    assert {f"rewards/teacher/rejected_{i}" for i in range(1, 5)} <= set(last)
    assert (out / "adapter_model.safetensors").is_file()
    print(capsys.readouterr().out)
