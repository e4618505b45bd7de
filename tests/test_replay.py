"""Rehearsal rows for stage 1 (apo.world.replay): the base's own tasks in ms-swift's format, on images that
pretraining never drew, deterministic by the base's seed, reused on a rerun and refused in a foreign folder."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apo.cli import main
from apo.errors import ApoError
from apo.world import pretrain, replay


def _base(folder, seed=3):
    folder.mkdir(parents=True)
    ident = {"kind": "apo-pretrained-base", "seed": seed}
    (folder / "pretraining.json").write_text(json.dumps({"identity": ident}))
    return folder


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_are_the_base_tasks_on_unseen_images_and_deterministic(tmp_path):
    base = _base(tmp_path / "base")
    rec = replay.write_replay(tmp_path / "a", base, 2, 1, 1, 1, workers=1)
    assert rec == {"rows": 5, "path": str(tmp_path / "a" / "replay.jsonl"), "reused": False}
    rows = _rows(tmp_path / "a" / "replay.jsonl")
    assert [r["teacher"] for r in rows] == ["replay-describe"] * 2 + ["replay-compare", "replay-merge", "replay-ask"]
    for r in rows:  # ms-swift's row: one <image> tag per listed image, each an existing absolute path
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert user.count("<image>") == len(r["images"]) and all(Path(p).is_absolute() for p in r["images"])
        assert all(Path(p).is_file() for p in r["images"])  # where the row says, after the rename
        assert answer
    # the first describe row is pretrain's own example at REPLAY_OFFSET, pixels and answer
    masks = pretrain.draw.usable_masks(pretrain.draw_masks(), pretrain._rng(3, pretrain.T_INIT, 0, 0))
    ex = pretrain._describe_example(3, replay.REPLAY_OFFSET, masks)
    assert rows[0]["messages"][1]["content"] == ex["answer"] == pretrain.describe(ex["truth"])
    assert np.array_equal(np.asarray(Image.open(rows[0]["images"][0])), ex["images"][0])
    # ...which is not one pretraining draws (index 0 of the same stream)
    assert not np.array_equal(ex["images"][0], pretrain._describe_example(3, 0, masks)["images"][0])
    # the same base and counts elsewhere: the same rows
    replay.write_replay(tmp_path / "b", base, 2, 1, 1, 1, workers=2)
    strip = lambda rs: [{**r, "images": [p.split("/")[-1] for p in r["images"]]} for r in rs]  # noqa: E731
    assert strip(_rows(tmp_path / "b" / "replay.jsonl")) == strip(rows)


def test_rerun_reuses_and_other_folders_and_bases_are_refused(tmp_path, capsys):
    base = _base(tmp_path / "base")
    replay.write_replay(tmp_path / "a", base, 1, 0, 0, workers=1)
    assert replay.write_replay(tmp_path / "a", base, 1, 0, 0, workers=1)["reused"] is True
    with pytest.raises(ApoError, match="not empty"):  # other counts into the same folder: not mixed in
        replay.write_replay(tmp_path / "a", base, 2, 0, 0, workers=1)
    with pytest.raises(ApoError, match="one must be positive"):
        replay.write_replay(tmp_path / "z", base, 0, 0, 0)
    (tmp_path / "b.partial" / "images").mkdir(parents=True)  # what an interrupted run leaves: redone, not refused
    (tmp_path / "b.partial" / "images" / "junk.png").write_bytes(b"")
    assert replay.write_replay(tmp_path / "b", base, 1, 0, 0, workers=1)["rows"] == 1
    assert not (tmp_path / "b.partial").exists() and len(list((tmp_path / "b" / "images").iterdir())) == 1
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ApoError, match="is a file"):
        replay.write_replay(tmp_path / "f", base, 1, 0, 0, workers=1)
    (tmp_path / "plain").mkdir()
    assert main(["replay", "--base", str(tmp_path / "plain"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pretraining.json" in err
    (tmp_path / "plain" / "pretraining.json").write_text("{not json")
    assert main(["replay", "--base", str(tmp_path / "plain"), "--out", str(tmp_path / "c")]) == 2
    assert "unreadable" in capsys.readouterr().err
    (tmp_path / "plain" / "pretraining.json").write_text('{"identity": []}')
    assert main(["replay", "--base", str(tmp_path / "plain"), "--out", str(tmp_path / "c")]) == 2
    assert "not a pretrained base" in capsys.readouterr().err
