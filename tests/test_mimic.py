"""apo.io.mimic: the one MIMIC id rule (what the MS-CXR-T reader and the report lookup accept) and the layouts."""

import pytest

from apo.io.mimic import is_mimic_id, mimic_image_path, mimic_report_path, previous_image

GOOD = ["10000032", "50414267", "p10000032", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "cur_0", "A" * 100]
BAD = ["", "../..", "x/../y", "/abs", "1*", "s?", "a.b", ".hidden", "-lead", "_lead", "a b", "é", "a\x00", "1" * 101]


@pytest.mark.parametrize("value", GOOD)
def test_plain_ids_are_accepted(value):
    assert is_mimic_id(value)


@pytest.mark.parametrize("value", BAD)
def test_paths_wildcards_dots_and_overlong_ids_are_refused(value):
    assert not is_mimic_id(value)


def test_layouts(tmp_path):
    assert mimic_image_path(tmp_path, "p10000032", "s50414267", "d1") == (
        tmp_path / "files" / "p10" / "p10000032" / "s50414267" / "d1.jpg"
    )
    prev = mimic_image_path(tmp_path, "10000032", "50000001", "old")
    prev.parent.mkdir(parents=True)
    prev.write_bytes(b"x")
    assert previous_image(tmp_path, "10000032", "old") == prev
    assert previous_image(tmp_path, "10000032", "old", "50000002") == prev.parent.parent / "s50000002" / "old.jpg"
    assert previous_image(tmp_path, "10000032", "missing") is None
    report = tmp_path / "p10" / "p10000032" / "s50000001.txt"
    report.parent.mkdir(parents=True)
    report.write_text("FINDINGS: ok.")
    assert mimic_report_path(tmp_path, "10000032", "50000001") == report
    assert mimic_report_path(tmp_path, "10000032", "a.b") is None
