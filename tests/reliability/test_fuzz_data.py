"""Fuzz the data layer with >1,000 malformed records: every one is either a clear DataError naming file and
record, or (--skip-bad) a listed reject, and every good record is kept. No other exception escapes."""

import io
import json
import random

import pytest
from PIL import Image

from apo.cli import main
from apo.data import read_cases
from apo.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

N_FILES, GOOD, BAD = 40, 15, 26  # 40 x 26 = 1,040 malformed records


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzimg")
    buf = io.BytesIO()
    Image.new("L", (64, 64), 100).save(buf, "JPEG")
    good = buf.getvalue()
    (root / "good.jpg").write_bytes(good)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(random.Random(0).randrange(256) for _ in range(500)))
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    Image.new("1", (12000, 12000)).save(root / "enormous.png")  # 144 Mpx, a few KB on disk
    return root


def good_row(i, teacher="GPT-5-nano"):
    return {
        "case_id": f"c{i}",
        "image": "good.jpg",
        "question": f"What supports finding {i}?",
        "model": teacher,
        "response": f"Reasoning {i}.",
        "labels": {"Edema": 1},
    }


def _mutations(rng, i, first_good):
    """Each returns the raw line (bytes) of one malformed record."""
    row = good_row(i)
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    pick = rng.randrange(22)
    if pick == 0:
        return j(row)[: rng.randrange(1, 20)]  # broken JSON
    if pick == 1:
        return b'{"case_id": "\xff\xfe", "model": "x"}'  # not UTF-8
    if pick == 2:
        return j([row])  # not an object
    if pick == 3:
        drop = rng.choice(["question", "image", "case_id"])
        return j({k: v for k, v in row.items() if k != drop})  # missing field
    if pick == 4:
        return j({**row, "response": rng.choice(["", "   ", "\n\t"])})  # empty trajectory
    if pick == 5:
        return j(
            {**row, "response": rng.choice([3, None, ["a"], {"t": 1}, True])}
            if rng.random() < 0.8
            else {**row, "model": None}
        )
    if pick == 6:
        return j({**row, "model": rng.choice(["", 7, ["GPT"], " "])})  # bad teacher name
    if pick == 7:
        return j({**row, "question": rng.choice([1.5, [], {}, ""])})  # wrong type prompt
    if pick == 8:
        return j({**row, "response": "x" * 100_001})  # huge text
    if pick == 9:
        return j({**row, "labels": rng.choice([{"Edema": 2}, {"Edema": "yes"}, {"Nope": 1}, [1, 0], "Edema"])})
    if pick == 10:
        return j({**row, "case_id": rng.choice([{}, [], True, "  "])})  # bad case id
    if pick == 11:
        return j({**row, "image": rng.choice([5, [], [None], {"x": 1}, ""])})  # bad image field
    if pick in (12, 13, 14, 15, 16):
        return j({**row, "image": ["missing.jpg", "corrupt.jpg", "truncated.jpg", "empty.jpg", "text.jpg"][pick - 12]})
    if pick == 17:
        return j({**row, "image": "enormous.png"})
    if pick == 18:
        return j({**row, "image": rng.choice(["../outside.jpg", "/etc/hostname", "a/../../x.jpg"])})  # escapes root
    if pick == 19:
        return j({**first_good, "response": "another answer"})  # duplicate (case, teacher)
    if pick == 20:
        return j({**first_good, "model": "Grok-4", "question": "a different question?"})  # same case, other prompt
    return j({**row, "sides": rng.choice([{"Edema": "up"}, "left", 3])})  # bad sides


@pytest.mark.parametrize("seed", range(N_FILES))
def test_fuzzed_file(tmp_path, images, seed):
    rng = random.Random(seed)
    first_good = good_row(0)
    lines, bad_lines, good_ids = [], set(), []
    kinds = ["good"] * GOOD + ["bad"] * BAD
    rng.shuffle(kinds)
    kinds = ["good"] + kinds  # line 1 is c0, the target of the duplicate mutations
    for i, kind in enumerate(kinds):
        if kind == "good":
            lines.append(json.dumps(good_row(i)).encode())
            good_ids.append(f"c{i}")
        else:
            lines.append(_mutations(rng, i, first_good))
            bad_lines.add(i + 1)
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    root = images

    with pytest.raises(DataError) as e:
        read_cases(path, image_root=root)
    assert e.value.record in bad_lines and str(path) in str(e.value)

    cases, rejects = read_cases(path, image_root=root, skip_bad=True)
    assert [c.case_id for c in cases] == good_ids  # every good record kept, in order
    assert sorted(r["record"] for r in rejects) == sorted(bad_lines)  # every bad one listed, once
    assert all(r["reason"] and r["file"] == str(path) for r in rejects)

    # Through the CLI: one line on stderr, exit 2, no traceback; with --skip-bad exit 0 and the rejects file.
    out = tmp_path / "sft.jsonl"
    rc = main(["prepare-sft", "--dataset", str(path), "--image-root", str(root), "--out", str(out)])
    assert rc == 2 and not out.exists()
    rc = main(["prepare-sft", "--dataset", str(path), "--image-root", str(root), "--out", str(out), "--skip-bad"])
    assert rc == 0 and len(out.read_text().splitlines()) == len(good_ids)
    assert len((tmp_path / "sft.jsonl.rejects.jsonl").read_text().splitlines()) == len(bad_lines)
