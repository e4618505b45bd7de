"""The seeing base's pretraining (apo.world.pretrain) at a toy recipe: deterministic by seed, cached by identity,
in its own style, on images no benchmark draws. Whether it sees is checked by scripts/check_base.py, not here."""

import json

import numpy as np
import pytest

from apo.errors import ApoError
from apo.world import pretrain

TOY = dict(
    vision_steps=2,
    vision_batch=4,
    steps=2,
    batch_size=4,
    n_describe=6,
    n_compare=3,
    vision_pairs=2,
    n_merge=2,
    merge_batch=2,
)
OFF = dict(pair_weight=0.0, n_merge=0)  # the recipe before the pair probe and the merge task


def _run(out, seed=0, **kw):
    return pretrain.pretrain(out, seed=seed, workers=1, progress=False, **{**TOY, **kw})


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a, b, c = _run(tmp_path / "a"), _run(tmp_path / "b"), _run(tmp_path / "c", seed=1)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["weights_sha256"] != c["weights_sha256"]
    assert len(a["curves_every_10"]["vision_probe"]) == 1 and a["loss_last_20"] > 0


def test_a_finished_base_is_reused_and_a_changed_recipe_is_not(tmp_path, caplog):
    first = _run(tmp_path / "a")
    (tmp_path / "a" / "marker").write_text("kept")
    assert _run(tmp_path / "a") == first  # reused: same record, folder untouched
    assert (tmp_path / "a" / "marker").exists()
    with caplog.at_level("WARNING", logger="apo.world.pretrain"):
        again = _run(tmp_path / "a", steps=3)
    assert again["identity"]["steps"] == 3 and json.loads((tmp_path / "a" / "pretraining.json").read_text()) == again
    assert "other settings (steps: 2 -> 3)" in caplog.text  # the user is told why the cached base was replaced


def test_foreign_folder_and_unknown_settings_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ApoError, match="holds no pretrained base"):
        _run(tmp_path / "x")
    with pytest.raises(ApoError, match="unknown settings"):
        _run(tmp_path / "y", step=3)
    with pytest.raises(ApoError, match="must be positive"):
        _run(tmp_path / "z", steps=0)
    with pytest.raises(ApoError, match="weights not negative"):
        _run(tmp_path / "w", pair_weight=-1.0)


def test_pair_probe_trains_on_the_compare_pairs_deterministically(tmp_path):
    on = dict(OFF, pair_weight=1.0)
    a, b, off = _run(tmp_path / "a", **on), _run(tmp_path / "b", **on), _run(tmp_path / "off", **OFF)
    assert a["weights_sha256"] == b["weights_sha256"] != off["weights_sha256"]
    # off, the recipe draws nothing extra from the seed's random stream: the same weights as before the pair probe
    assert _run(tmp_path / "off2", **OFF, vision_pairs=5)["weights_sha256"] == off["weights_sha256"]


def test_batch_pairs_point_at_each_compare_examples_two_images():
    one = {"task": "describe", "image_truths": [{}]}
    pair = {"task": "compare", "image_truths": [{}, {}], "finding": "pneumothorax", "cls": "worsening"}
    assert pretrain._batch_pairs([one, pair, one, pair]) == [
        (1, 2, "pneumothorax", "worsening"),
        (4, 5, "pneumothorax", "worsening"),
    ]


def test_examples_are_deterministic_in_the_base_style_and_off_the_benchmark_streams():
    a = pretrain.make_examples(3, 4, 2, workers=1, progress=False)
    b = pretrain.make_examples(3, 4, 2, workers=2, progress=False)
    assert [e["answer"] for e in a] == [e["answer"] for e in b]
    assert all(np.array_equal(x, y) for ea, eb in zip(a, b) for x, y in zip(ea["images"], eb["images"]))
    describe = [e for e in a if e["task"] == "describe"]
    assert all(e["answer"] == pretrain.describe(e["truth"]) for e in describe)
    compare = [e for e in a if e["task"] == "compare"]
    from apo.evaluation.mscxrt import parse_progression

    assert all(parse_progression(e["answer"]) == e["cls"] and len(e["images"]) == 2 for e in compare)
    assert pretrain.compare_answer(0.3, 0.85, "worsening") == "Small to large: worsening."
    # streams keyed by 5 integers starting with NS; `apo synth` keys have at most 4
    assert pretrain._rng(0, 0, 0, 0).random() != np.random.default_rng([0, 0, 0, 0]).random()


def test_describe_style_names_side_severity_and_negatives():
    text = pretrain.describe(
        {"Pleural Effusion": {"side": "right", "severity": 0.9}, "Cardiomegaly": {"severity": 0.4}}
    )
    assert text.startswith("Large right pleural effusion.") and "cardiomegaly" in text
    assert "No pneumothorax, consolidation or pulmonary edema." in text and "Normal heart size" not in text
    assert pretrain.describe({}).startswith("No acute cardiopulmonary abnormality.")


def test_encoded_labels_cover_the_answer_and_end_marker_only():
    ex = pretrain.make_examples(0, 1, 0, workers=1, progress=False)
    from apo.world import tiny

    tok = tiny.build_tokenizer()
    proc = tiny.build_processor(tok, pixels=tiny.BASE_IMAGE_PIXELS)
    pretrain._encode(proc, ex, 1 + len(tok.encode("assistant\n", add_special_tokens=False)))
    learned = [t for t in ex[0]["labels"] if t != -100]
    assert tok.decode(learned) == ex[0]["answer"] + "<|im_end|>"
    n_pad = ex[0]["ids"].count(tok.convert_tokens_to_ids("<|image_pad|>"))
    assert n_pad == tiny.BASE_IMAGE_PIXELS // (28 * 28) == int(ex[0]["grid"].prod()) // 4


def test_training_batches_carry_the_processors_positions(tmp_path):
    """The hand-built batch equals what the processor gives generation (ids, image-token marks, pixels): a batch
    without mm_token_type_ids trains on 1-D positions the model never sees when it answers."""
    import torch
    from PIL import Image

    from apo.model.chat import assistant_message, user_message
    from apo.world import tiny

    tok = tiny.build_tokenizer()
    proc = tiny.build_processor(tok, pixels=tiny.BASE_IMAGE_PIXELS)
    ex = pretrain.make_examples(0, 1, 1, workers=1, progress=False)
    pretrain._encode(proc, ex, 1 + len(tok.encode("assistant\n", add_special_tokens=False)))
    for e in ex:
        text = proc.apply_chat_template(user_message(len(e["images"]), e["prompt"]) + [assistant_message(e["answer"])])
        want = proc(text=[text], images=[Image.fromarray(im).convert("RGB") for im in e["images"]], return_tensors="pt")
        got = pretrain._batch([e], tok.pad_token_id)
        for key in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
            assert torch.equal(got[key], want[key]), key


def test_grade_accuracy_reads_the_base_style_size_words_against_the_truth():
    """check_base's grade score: a description's own words round-trip to accuracy 1; a wrong size word counts as
    wrong; a negated or unreported finding is not scored."""
    from apo.world import seeing

    truths = [
        {"Pleural Effusion": {"side": "left", "severity": 0.9}, "Cardiomegaly": {"severity": 0.3}},
        {"Pneumothorax": {"side": "right", "severity": 0.6}, "Edema": {"severity": 0.85}},
    ]
    exact = seeing.score_descriptions(truths, [pretrain.describe(t) for t in truths])
    assert exact["grade_accuracy"] == 1.0 and exact["graded_reported"] == 4
    wrong = seeing.score_descriptions(truths[:1], ["Small left pleural effusion. Mild cardiomegaly."])
    assert wrong["grade_accuracy"] == 0.5 and wrong["grade_majority"] == 0.5
    assert seeing.stated_grade("Mild cardiomegaly. No pleural effusion.", "Pleural Effusion") is None
    unreported = seeing.score_descriptions(truths[:1], ["No acute cardiopulmonary abnormality."])
    assert unreported["grade_accuracy"] is None and unreported["graded_reported"] == 0


def test_merge_examples_hide_the_truth_behind_generic_noise():
    ex = pretrain.make_examples(0, 0, 0, workers=1, progress=False, n_merge=3)
    for e in ex:
        assert e["task"] == "merge" and e["answer"] == pretrain.describe(e["truth"])
        blocks = e["prompt"].split("Trajectory ")[1:]
        assert 3 <= len(blocks) <= 7 and e["prompt"].startswith(pretrain.DESCRIBE_PROMPTS)
    # the noise's rates, read back from many draws for one case
    truth = {"Pleural Effusion": {"side": "right", "severity": 0.65, "seed": 1}}
    rng = np.random.default_rng(7)
    texts = [pretrain.noisy_description(truth, rng) for _ in range(4000)]
    refused = np.mean([t == pretrain.MERGE_REFUSAL for t in texts])
    said = [t for t in texts if t != pretrain.MERGE_REFUSAL]
    omitted = np.mean(["pleural effusion." not in t for t in said])
    flipped = np.mean(["left pleural effusion" in t for t in said])
    assert refused == pytest.approx(0.05, abs=0.015) and omitted == pytest.approx(0.20, abs=0.03)
    assert flipped == pytest.approx(0.8 * 0.15, abs=0.025)
    # the supported description is the commonest one
    assert max(set(said), key=said.count) == pretrain.describe(truth)


def test_merge_task_trains_in_its_own_batches_deterministically(tmp_path):
    on = dict(n_merge=3, merge_batch=2, merge_every=1)
    a, b, off = _run(tmp_path / "a", **on), _run(tmp_path / "b", **on), _run(tmp_path / "off", n_merge=0)
    assert a["weights_sha256"] == b["weights_sha256"] != off["weights_sha256"]
    assert len(a["curves_every_10"]["merge"]) == 1 and not off["curves_every_10"]["merge"]


def test_merge_scores_count_findings_and_sides():
    from apo.world import seeing

    truth = {"Pleural Effusion": {"side": "right", "severity": 0.65, "seed": 1}}
    flipped = {"Pleural Effusion": {**truth["Pleural Effusion"], "side": "left"}}
    right, wrong = pretrain.describe(truth), pretrain.describe(flipped)
    cases = [("x.jpg", truth, [wrong, right, right])]
    assert seeing.score_merges(cases, [right]) == {
        "merge_exact": 1.0,
        "merge_single_exact": pytest.approx(2 / 3),
        "merge_vote_exact": 1.0,
        "n_merges": 1,
    }
    assert seeing.score_merges(cases, [wrong])["merge_exact"] == 0.0
    assert seeing.score_merges(cases, [pretrain.MERGE_REFUSAL])["merge_exact"] == 0.0


def test_ask_answers_the_named_finding_alone():
    truth = {
        "Pneumonia": {"side": "right", "zone": "lower", "severity": 0.5, "seed": 1},
        "Pleural Effusion": {"side": "left", "severity": 0.9, "seed": 2},
    }
    assert pretrain.ask_answer(truth, "Pleural Effusion") == "Yes: large left pleural effusion."
    # the same opacity is named as the question names it: the pixels do not tell the two apart
    assert (
        pretrain.ask_answer(truth, "Consolidation")
        == "Yes: right lower lung airspace opacity, consistent with consolidation."
    )
    assert pretrain.ask_answer(truth, "Pneumonia").endswith("consistent with pneumonia.")
    assert pretrain.ask_answer(truth, "Pneumothorax") == "No pneumothorax."
    assert pretrain.ask_answer({}, "Edema") == "No pulmonary edema."
    ex = pretrain.make_examples(0, 0, 0, workers=1, progress=False, n_ask=30)
    assert all(e["task"] == "ask" and len(e["images"]) == 1 for e in ex)
    for e in ex:  # the question's finding is the one answered, by the truth of that image
        obs = next(o for o, name in pretrain.ASK_NAMES.items() if name in e["prompt"])
        assert e["answer"] == pretrain.ask_answer(e["truth"], obs)
    assert {e["answer"].split(":")[0].split()[0] for e in ex} == {"Yes", "No"}


def test_ask_task_changes_the_base_and_off_draws_nothing(tmp_path):
    a, b = _run(tmp_path / "a", n_ask=3), _run(tmp_path / "b", n_ask=3)
    off = _run(tmp_path / "off")
    assert a["weights_sha256"] == b["weights_sha256"] != off["weights_sha256"]
    # off, the task is not in the identity (bases cached before it existed are found) and draws no example
    assert a["identity"]["n_ask"] == 3 and "n_ask" not in off["identity"]
    assert not [e for e in pretrain.make_examples(0, 2, 1, workers=1, progress=False) if e["task"] == "ask"]
    with pytest.raises(ApoError, match="weights not negative"):
        _run(tmp_path / "n", n_ask=-1)


def test_ask_scores_read_yes_no_and_side():
    from apo.world import seeing

    effusion = {"Pleural Effusion": {"side": "left", "severity": 0.9, "seed": 2}}
    pneumonia = {"Pneumonia": {"side": "right", "zone": "lower", "severity": 0.5, "seed": 1}}
    cases = [
        ("a.jpg", effusion, "Pleural Effusion", "q"),
        ("b.jpg", effusion, "Pneumothorax", "q"),
        ("c.jpg", pneumonia, "Consolidation", "q"),
        ("d.jpg", {}, "Edema", "q"),
    ]
    right = [pretrain.ask_answer(t, o) for _, t, o, _ in cases]
    assert seeing.score_asks(cases, right) == {"ask_accuracy": 1.0, "ask_side_accuracy": 1.0, "n_asks": 4}
    wrong = [
        "Yes: small right pleural effusion.",
        "Yes: pneumothorax.",
        "No consolidation.",
        "There is pulmonary edema.",
    ]
    assert seeing.score_asks(cases, wrong) == {"ask_accuracy": 0.25, "ask_side_accuracy": 0.0, "n_asks": 4}
    # an answer in another style is read by the labeler: a description that negates the asked finding says no
    described = pretrain.describe(effusion)  # "Large left pleural effusion. Normal heart size. No pneumothorax, ..."
    assert seeing.score_asks(cases[:2], [described, described])["ask_accuracy"] == 1.0
    assert len(seeing.ask_cases([("x.jpg", effusion)] * 3, 1000, 2)) == 2
