"""apo.evaluation.signatures: phrases mined from each teacher's own answers, and how often texts copy them."""

import pytest

from apo.data import Case, Trajectory
from apo.evaluation.signatures import copy_rates, mine, ngrams


def _cases(answers_by_teacher):
    n = len(next(iter(answers_by_teacher.values())))
    return [
        Case(str(i), [], "q", [Trajectory(t, a[i]) for t, a in answers_by_teacher.items()], {}, {}) for i in range(n)
    ]


def test_mine_keeps_what_is_one_teachers_own():
    cases = _cases(
        {
            "A": [f"The image is clear. Finding {i} is present. There is no pleural effusion." for i in range(10)],
            "B": [f"Finding {i} is present. There is no pleural effusion here." for i in range(10)],
            "C": ["Impression: normal chest. There is no pleural effusion."] * 5 + ["Nothing else to see here."] * 5,
        }
    )
    sig = mine(cases)
    assert list(sig) == ["A", "B", "C"]
    assert sig["A"] == ["the image is clear"]  # shared wording ("there is no pleural effusion") is nobody's
    assert sig["B"] == ["is no pleural effusion here"]  # ties: the longest (n <= 5) first, its overlaps dropped
    assert sig["C"] == ["nothing else to see here", "impression: normal chest"]
    assert not any("finding" in p for ps in sig.values() for p in ps)
    # no phrase spans a sentence end
    assert ("clear", "finding", "0") not in ngrams("The image is clear. Finding 0 is present.")
    rates = copy_rates(["THE IMAGE IS CLEAR!", "the image, is clear", "the image was clear", None], sig)
    assert rates["A"] == pytest.approx(2 / 3) and rates["B"] == 0.0  # case, spacing, punctuation do not matter
    assert copy_rates([], sig)["A"] is None and copy_rates(["x"], {"D": []}) == {"D": None}
    # a higher bar for "own" removes C's half-share phrases
    assert mine(cases, min_share=0.6)["C"] == []


@pytest.fixture(scope="module")
def synth120(tmp_path_factory):
    """The real synthetic benchmark at the demo's size: 120 cases, seed 0 (96 train, 24 test cases x 7 teachers)."""
    from apo.data import load_cases
    from apo.world.synth import generate

    out = tmp_path_factory.mktemp("synth120") / "data"
    generate(out, cases=120, seed=0)
    return (
        load_cases(out / "cxrmax_train.jsonl", verify_images="none"),
        load_cases(out / "cxrmax_test.jsonl", verify_images="none"),
    )


def test_mined_signatures_on_the_synthetic_benchmark(synth120):
    train, test = synth120
    sig = mine(train)
    for teacher, phrases in sig.items():
        print(f"{teacher}: {phrases}")
    # each teacher's documented style (apo/world/synth/teachers.py) is found, without being told
    assert any(p.startswith("conclusion:") for p in sig["GPT-5-nano"])  # terse: "Conclusion: ..."
    assert {"taken together these findings", "the clinical history is recommended"} <= set(sig["Claude-Sonnet-4"])
    assert {"the image is clear", "with no doubt"} <= set(sig["Grok-4"])  # confident opener and closer
    assert "in addition there is" in sig["Qwen-VL-Max"]  # its late additions
    assert any(p.startswith("impression:") for p in sig["Qwen-VL-Max"])
    assert "i cannot provide" in sig["Moonshot-v1"]  # its refusals
    # Gemini and GLM write the same plain style (they drift in content only): no wording is theirs alone
    assert sig["Gemini-2.5-flash-lite"] == [] and sig["GLM-4.5V"] == []
    # held-out answers: each teacher's own test answers carry its signature, the others' do not
    for teacher in sig:
        texts = [t.text for c in test for t in c.trajectories if t.teacher == teacher]
        rates = copy_rates(texts, sig)
        for other, r in rates.items():
            if not sig[other]:
                assert r is None
            elif other == teacher:
                assert r >= (0.25 if teacher == "Moonshot-v1" else 0.75), (teacher, r)  # Moonshot: its refusals
            else:
                assert r <= 0.05, (teacher, other, r)
