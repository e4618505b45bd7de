"""ResumableJsonl and run_resumable: a killed job, rerun, ends byte-identical to one that never stopped."""

import json

import pytest

from apo.errors import DataError
from apo.io.jobs import run_resumable, shard
from apo.io.resumable import ResumableJsonl, dumps

ITEMS = [{"case_id": f"c{i}", "x": i} for i in range(10)]


def work(chunk):  # a deterministic "model"
    return [{"case_id": it["case_id"], "text": "é" * it["x"], "n": it["x"] ** 2} for it in chunk]


def test_append_skips_duplicates_and_reopens(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResumableJsonl(p) as r:
        assert r.append({"case_id": "a", "v": 1})
        assert not r.append({"case_id": "a", "v": 2})  # a duplicate key is never written
        assert r.append({"case_id": "b", "v": 3})
    assert p.read_text(encoding="utf-8").splitlines() == [
        dumps({"case_id": "a", "v": 1}),
        dumps({"case_id": "b", "v": 3}),
    ]
    r = ResumableJsonl(p)
    assert r.done == {"a", "b"} and not r.torn
    assert not r.append({"case_id": "b", "v": 9})


@pytest.mark.parametrize("tail", [b'{"case_id": "c", "v"', b'{"case_id": "c", "v": 1}'])
def test_torn_last_line_is_cut_and_redone(tmp_path, tail):
    p = tmp_path / "r.jsonl"
    good = (dumps({"case_id": "a"}) + "\n").encode()
    p.write_bytes(good + tail)  # killed mid-write: no newline at the end
    r = ResumableJsonl(p)
    assert r.torn and r.done == {"a"}
    assert p.read_bytes() == good  # cut away, so the next append starts on a clean line
    r.append({"case_id": "c", "v": 1})
    r.close()
    assert ResumableJsonl(p).done == {"a", "c"}


def test_readonly_peek_does_not_cut(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"case_id": "a"}\n{"case_id": "b"')
    r = ResumableJsonl(p, readonly=True)
    assert r.done == {"a"} and p.read_bytes().endswith(b'"b"')
    with pytest.raises(RuntimeError):
        r.append({"case_id": "z"})


def test_bad_middle_line_and_duplicates_are_errors(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"case_id": "a"}\nnot json\n{"case_id": "b"}\n')
    with pytest.raises(DataError, match=r"r.jsonl:2"):
        ResumableJsonl(p)
    p.write_text('{"case_id": "a"}\n{"case_id": "a"}\n')
    with pytest.raises(DataError, match="duplicate"):
        ResumableJsonl(p)


def test_finalize_orders_atomically(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResumableJsonl(p) as r:
        for k in ["c", "a", "zz", "b"]:
            r.append({"case_id": k})
    recs = ResumableJsonl(p).finalize(["a", "b", "c"])
    assert [x["case_id"] for x in recs] == ["a", "b", "c", "zz"]  # unknown keys kept, at the end
    assert [json.loads(l)["case_id"] for l in p.read_text().splitlines()] == ["a", "b", "c", "zz"]
    assert not (tmp_path / "r.jsonl.tmp").exists()


def test_crash_and_resume_is_byte_identical(tmp_path):
    clean = tmp_path / "clean.jsonl"
    run_resumable(clean, ITEMS, key=lambda it: it["case_id"], process=work, chunk_size=3)

    crashed = tmp_path / "crashed.jsonl"
    calls = []

    def dies_on_third_chunk(chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return work(chunk)

    with pytest.raises(KeyboardInterrupt):
        run_resumable(crashed, ITEMS, key=lambda it: it["case_id"], process=dies_on_third_chunk, chunk_size=3)
    assert ResumableJsonl(crashed).done == {f"c{i}" for i in range(6)}
    with open(crashed, "ab") as f:  # and the kill tore a line
        f.write(b'{"case_id": "c6", "te')

    seen = []

    def counting(chunk):
        seen.extend(it["case_id"] for it in chunk)
        return work(chunk)

    out = run_resumable(crashed, ITEMS, key=lambda it: it["case_id"], process=counting, chunk_size=3)
    assert seen == ["c6", "c7", "c8", "c9"]  # finished cases skipped, the torn one redone
    assert crashed.read_bytes() == clean.read_bytes()
    assert list(out) == [it["case_id"] for it in ITEMS]
    # a third run has nothing to do and changes nothing
    run_resumable(crashed, ITEMS, key=lambda it: it["case_id"], process=lambda c: pytest.fail("redone"), chunk_size=3)
    assert crashed.read_bytes() == clean.read_bytes()


def test_sharded_ranks_merge_to_the_single_process_file(tmp_path, monkeypatch):
    """Two ranks run one after the other (the file-system protocol does not care); rank 0 merges."""
    clean = tmp_path / "clean.jsonl"
    run_resumable(clean, ITEMS, key=lambda it: it["case_id"], process=work, chunk_size=4)
    out = tmp_path / "multi.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_resumable(out, ITEMS, key=lambda it: it["case_id"], process=work, chunk_size=4) is None
    assert (tmp_path / "multi.jsonl.rank1-of-2").exists() and not out.exists()
    monkeypatch.setenv("RANK", "0")
    merged = run_resumable(out, ITEMS, key=lambda it: it["case_id"], process=work, chunk_size=4, poll=0.01)
    assert len(merged) == 10 and out.read_bytes() == clean.read_bytes()
    assert not list(tmp_path.glob("multi.jsonl.rank*"))
    assert [it["x"] for it in shard(ITEMS, 1, 3)] == [1, 4, 7]


def test_leftover_shards_of_another_world_size_are_used(tmp_path, monkeypatch):
    clean = tmp_path / "clean.jsonl"
    run_resumable(clean, ITEMS, key=lambda it: it["case_id"], process=work, chunk_size=4)
    out = tmp_path / "o.jsonl"
    with ResumableJsonl(tmp_path / "o.jsonl.rank2-of-4") as r:  # an interrupted 4-GPU run left this behind
        for rec in work(shard(ITEMS, 2, 4)):
            r.append(rec)
    seen = []
    run_resumable(out, ITEMS, key=lambda it: it["case_id"], process=lambda c: seen.extend(c) or work(c), chunk_size=4)
    assert sorted(it["x"] for it in seen) == [0, 1, 3, 4, 5, 7, 8, 9]
    assert out.read_bytes() == clean.read_bytes() and not list(tmp_path.glob("o.jsonl.rank*"))
