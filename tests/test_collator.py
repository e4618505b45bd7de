"""GroupCollator: one row per candidate, labels on the response only, images in every row, the length policy."""

import json
import logging

import pytest
import torch
from trainer_helpers import POSITIVE, make_groups

from apo.errors import DataError
from apo.model.chat import assistant_message, load_images, user_message
from apo.trainer.collator import GroupCollator, candidate_key, load_groups


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return load_groups(make_groups(tmp_path_factory.mktemp("groups"), n_groups=3, n_negatives=(3, 1, 2)))


def test_rows_and_group_structure(processor, groups):
    batch = GroupCollator(processor, 4096)(groups)
    assert batch["valid"].shape == (3, 4)
    assert batch["valid"].tolist() == [[True] * 4, [True, True, False, False], [True, True, True, False]]
    assert batch["group_index"].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert batch["candidate_index"].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert batch["input_ids"].shape[0] == 9 == len(batch["ref_keys"])
    assert batch["ref_keys"][4] == candidate_key("c1", POSITIVE)
    assert batch["teachers"][1] == ["GPT-5-nano"]


def test_labels_cover_exactly_the_response(processor, groups):
    batch = GroupCollator(processor, 4096)(groups)
    tok = processor.tokenizer
    for r in range(batch["input_ids"].shape[0]):
        g = groups[batch["group_index"][r]]
        j = batch["candidate_index"][r].item()
        text = [g["positive"], *g["negatives"]][j]
        ids, labels, mask = batch["input_ids"][r], batch["labels"][r], batch["attention_mask"][r].bool()
        labelled = labels != -100
        # the labelled tokens are the response and its closing <|im_end|>, nothing else
        assert tok.decode(labels[labelled]) == text + "<|im_end|>"
        assert torch.equal(ids[labelled], labels[labelled])
        # contiguous, at the end of the real (unpadded) tokens
        pos = labelled.nonzero().squeeze(1)
        assert pos.tolist() == list(range(pos[0], pos[-1] + 1)) and pos[-1] == mask.sum() - 1
        # the row is the processor's own tokenisation of the whole chat (split tokenisation changed nothing)
        images = load_images(g["images"])
        full = processor.apply_chat_template(user_message(1, g["prompt"]) + [assistant_message(text)], tokenize=False)
        want = processor(text=[full], images=images, return_tensors="pt")["input_ids"][0]
        assert ids[mask].tolist() == want[: int(mask.sum())].tolist()


def test_image_tokens_in_every_row(processor, groups):
    batch = GroupCollator(processor, 4096)(groups)
    image_id = processor.image_token_id
    merge = processor.image_processor.merge_size**2
    n_rows = batch["input_ids"].shape[0]
    assert batch["image_grid_thw"].shape == (n_rows, 3)  # one image per case, repeated per candidate row
    per_image = (batch["image_grid_thw"].prod(1) // merge).tolist()
    assert [(row == image_id).sum().item() for row in batch["input_ids"]] == per_image
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(1).sum()
    assert (batch["mm_token_type_ids"] == 1).sum(1).tolist() == per_image  # mrope needs them
    assert not (batch["labels"] == image_id).any()


def test_over_length_truncates_responses_never_the_prompt(processor, groups):
    full = GroupCollator(processor, 4096)(groups[:1])
    prompt_len = int((full["labels"][0] == -100).sum() - (full["attention_mask"][0] == 0).sum())
    max_length = prompt_len + 3
    batch = GroupCollator(processor, max_length)(groups[:1])
    assert batch["input_ids"].shape == (4, max_length)
    assert ((batch["labels"] != -100).sum(1) == 3).all()  # every response cut to the budget
    assert torch.equal(batch["input_ids"][:, :prompt_len], full["input_ids"][:, :prompt_len])  # prompt intact
    assert batch["valid"].all()


def test_prompt_longer_than_max_length_drops_the_group(processor, groups, caplog):
    full = GroupCollator(processor, 4096)(groups[:1])
    prompt_len = int((full["labels"][0] == -100).sum() - (full["attention_mask"][0] == 0).sum())
    collator = GroupCollator(processor, prompt_len)  # no room for a single response token
    with caplog.at_level(logging.DEBUG, logger="apo.trainer.collator"):
        batch = collator(groups[:2])
        collator(groups[:1])
    assert batch["valid"][0].tolist() == [False] * 4  # dropped: invalid, never scored as 0
    assert batch["input_ids"].shape[0] == 0 and batch["group_index"].numel() == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "max_length" in warnings[0].getMessage()  # reported once
    assert collator.dropped == 4 + 2 + 4


def test_load_groups_checks_records(tmp_path, groups):
    path = tmp_path / "g.jsonl"
    bad = dict(groups[0], teachers=["x"])
    path.write_text(json.dumps(groups[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"g.jsonl:2: negatives and teachers"):
        load_groups(path)
    path.write_text(json.dumps(groups[0]) + "\n" + json.dumps(dict(groups[1], images=["/no/such.png"])) + "\n")
    with pytest.raises(DataError, match=r"g.jsonl:2: image not found: /no/such.png"):
        load_groups(path)
    path.write_text(json.dumps(groups[0]) + "\n")
    (g,) = load_groups(path, max_negatives=2)
    assert len(g["negatives"]) == 2 and g["teachers"] == groups[0]["teachers"][:2]
