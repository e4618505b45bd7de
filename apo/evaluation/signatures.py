"""Teacher signature phrases: wording one teacher uses and the others do not, mined from the teachers' own answers.

A student that copies a teacher's drift usually copies its wording too (an opener, a hedge, a refusal, a closing
formula). `mine(cases)` finds, per teacher, the word n-grams (n = 3..5, within one sentence) that occur in at least
`min_share` of that teacher's answers and in less than `max_other` of every other teacher's answers; `copy_rates`
then says how often a set of texts (a student's answers) contains any of a teacher's phrases.

Nothing is hard-coded: the phrases come from whatever teacher data is given (`apo eval-report --signatures-from`).
A teacher whose wording is not its own (two teachers writing in the same style, drifting only in content) gets no
phrase, and its copy rate is reported as None: its drift shows in the drift rates, not in the wording.

Text is compared as lower-case word tokens (letters, digits, inner apostrophes) with ":" kept as a token
("conclusion: ..."), so punctuation and spacing do not matter; a phrase never spans a sentence end (. ! ?).
"""

from __future__ import annotations

import re

from apo.constants import TEACHERS

_SENTENCE = re.compile(r"[.!?]+(?:\s+|$)")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|:")

N_MIN, N_MAX = 3, 5
MIN_SHARE = 0.1  # a phrase must be in >= this share of its teacher's answers
MAX_OTHER = 0.02  # ... and in < this share of every other teacher's answers
MAX_PHRASES = 12  # per teacher, most frequent first


def _sentences(text: str) -> list[list[str]]:
    return [toks for s in _SENTENCE.split(text.lower()) if (toks := _TOKEN.findall(s))]


def ngrams(text: str, n_min: int = N_MIN, n_max: int = N_MAX) -> set[tuple[str, ...]]:
    """The distinct word n-grams of `text`, n_min <= n <= n_max, none across a sentence end."""
    out = set()
    for toks in _sentences(text):
        for n in range(n_min, n_max + 1):
            out.update(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
    return out


def _show(gram: tuple[str, ...]) -> str:
    return " ".join(gram).replace(" :", ":")


def _norm(text: str) -> str:
    """Token string with sentence ends as "|" and a space at both ends: phrase matching is a substring test."""
    return " " + " | ".join(" ".join(toks) for toks in _sentences(text)) + " "


def _teacher_texts(cases) -> dict[str, list[str]]:
    by = {}
    for c in cases:
        for t in c.trajectories:
            if t.text:
                by.setdefault(t.teacher, []).append(t.text)
    return by


def mine(
    cases,
    min_share: float = MIN_SHARE,
    max_other: float = MAX_OTHER,
    n_min: int = N_MIN,
    n_max: int = N_MAX,
    max_phrases: int = MAX_PHRASES,
) -> dict[str, list[str]]:
    """{teacher: [phrase, ...]} from `cases` (apo.data.Case with teacher trajectories), every teacher of the data
    present (an empty list if nothing is its own). Per teacher: n-grams in >= min_share of its answers and
    < max_other of each other teacher's; most frequent first (ties: longer, then alphabetical); a phrase sharing
    an n_min-gram with one already kept (inside it, containing it, overlapping it) is dropped as the same wording;
    at most max_phrases."""
    texts = _teacher_texts(cases)
    share = {}  # teacher -> {gram: share of its answers}
    for teacher, answers in texts.items():
        counts: dict[tuple[str, ...], int] = {}
        for a in answers:
            for g in ngrams(a, n_min, n_max):
                counts[g] = counts.get(g, 0) + 1
        share[teacher] = {g: k / len(answers) for g, k in counts.items()}
    order = [t for t in TEACHERS if t in texts] + sorted(set(texts) - set(TEACHERS))
    out = {}
    for teacher in order:
        own = share[teacher]
        cands = [
            g
            for g, s in own.items()
            if s >= min_share and all(other.get(g, 0.0) < max_other for t, other in share.items() if t != teacher)
        ]
        cands.sort(key=lambda g: (-own[g], -len(g), g))
        kept, covered = [], set()  # covered: the n_min-grams of the phrases kept
        for g in cands:
            parts = {g[i : i + n_min] for i in range(len(g) - n_min + 1)}
            if parts & covered:
                continue
            kept.append(_show(g))
            covered |= parts
            if len(kept) == max_phrases:
                break
        out[teacher] = kept
    return out


def copy_rates(texts, signatures: dict[str, list[str]]) -> dict[str, float | None]:
    """{teacher: share of `texts` (None entries skipped) containing any of its phrases}; None for a teacher with no
    phrase, or when there is no text."""
    normed = [_norm(t) for t in texts if t is not None]
    out = {}
    for teacher, phrases in signatures.items():
        pats = [" " + " ".join(_TOKEN.findall(p.lower())) + " " for p in phrases]
        if not pats or not normed:
            out[teacher] = None
            continue
        out[teacher] = sum(any(p in t for p in pats) for t in normed) / len(normed)
    return out
