"""Stage 2, "compare": one consensus trajectory t+ per case (`apo consensus`).

Strategies:
  model  (the paper's; default) the SFT model pi_st sees the image, the question and the N teacher trajectories and
         writes t+ ~ pi_st(. | v, l, T): an in-context, trajectory-level vote. Each trajectory is cut to a per-teacher
         token budget so the prompt fits --max-length with the image tokens and --max-new-tokens; what was cut is
         recorded per teacher ("truncated": {teacher: tokens_cut}). A case whose image(s) and question alone leave no
         room stops the run naming the case; with --skip-bad it is recorded with an empty text and a "skipped"
         reason, and build-pairs drops it (empty_positive).
  self-vote  pi_st answers the case's own question K times (seeded samples at --temperature; no teacher text in its
         context) and t+ is the sample whose labels agree best with the teachers': for each sample, the mean over
         the teachers of the fraction of the 14 observations whose labels agree, side included; ties go to the
         earlier sample; samples that label nothing (refusals) only if every sample does. A self-distilled,
         on-policy positive that needs no in-context reading: a baseline for `model` and a fallback for a student
         that cannot read N trajectories. Every teacher stays a negative (t+ is none of theirs).
  vote   the medoid teacher trajectory by labeler agreement (no model): for each trajectory, the mean over the other
         teachers of the fraction of the 14 observations whose labels agree, side included (a finding put on the
         wrong side disagrees, so a side-flipping teacher is not the medoid); highest wins, ties go to the earlier
         teacher; refusals (nothing labelled) only if every teacher refuses. "source_teacher" names the winner so
         build-pairs keeps it out of its own negatives. A baseline, and the demo's strategy (a tiny model cannot
         synthesise anything meaningful).

Output: JSONL, one record per case {"case_id", "strategy", "text", "truncated", ...}, no timestamps. Resumable: a rerun
skips finished cases and the final file is byte-identical to an uninterrupted run. Multi-GPU: see apo.model.generation.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from apo.constants import OBSERVATIONS
from apo.data import MAX_TEXT_CHARS, add_data_arguments, cases_from_args
from apo.errors import ApoError
from apo.evaluation import labeler
from apo.io.jobs import check_outputs, claim, fingerprint, run_resumable
from apo.io.records import Rejects, iter_jsonl, write_rejects
from apo.model import generation  # generation.generate looked up per call: tests stand in for it
from apo.model.chat import prompt_text
from apo.model.generation import (
    add_model_arguments,
    add_overwrite_argument,
    estimate_length,
    model_from_args,
    model_identity,
    pixels_from_args,
)

log = logging.getLogger(__name__)

CONSENSUS_PROMPT = (
    "{question}\n\n"
    "Here are {n} reasoning trajectories from different models answering this question about the image.\n\n"
    "{blocks}\n\n"
    "Compare them with each other and with the image, then write one self-consistent answer to the question. "
    "Keep what the trajectories jointly support; drop any finding, side or severity that lacks cross-teacher support. "
    "Answer directly, as a radiologist would, without mentioning the trajectories or the models."
)
CUT_MARK = " [...]"  # tells the model a trajectory was cut, so it does not read the cut as the teacher's ending


def consensus_prompt(question: str, texts: list[str]) -> str:
    blocks = "\n\n".join(f"Trajectory {i}:\n{t.strip()}" for i, t in enumerate(texts, 1))
    return CONSENSUS_PROMPT.format(question=question.strip(), n=len(texts), blocks=blocks)


# ---------------------------------------------------------------- vote


def agreement(labels_a: dict, labels_b: dict) -> float:
    """Fraction of the 14 observations on which two readings agree (None == None counts as agreement). A reading maps
    an observation to its label, or to (label, side) when sides are compared."""
    return sum(labels_a.get(o) == labels_b.get(o) for o in OBSERVATIONS) / len(OBSERVATIONS)


def mentions_nothing(labels: dict) -> bool:
    """The labeler read no observation at all in this trajectory (a refusal, or text about nothing the 14
    observations cover); such a trajectory is no candidate for the medoid while another one is."""
    return all(labels.get(o) is None for o in OBSERVATIONS)


def vote(texts: list[str], label=None, side=None) -> tuple[int, list[float]]:
    """Index of the medoid trajectory and every trajectory's agreement score (labels and sides)."""
    readings = [reading(t, label, side) for t in texts]
    labels = [{o: v[0] for o, v in r.items()} for r in readings]
    n = len(texts)
    scores = [
        sum(agreement(readings[i], readings[j]) for j in range(n) if j != i) / (n - 1) if n > 1 else 1.0
        for i in range(n)
    ]
    candidates = [i for i in range(n) if not mentions_nothing(labels[i])] or list(range(n))
    best = max(candidates, key=lambda i: (scores[i], -i))  # ties: the earlier teacher
    return best, scores


def vote_record(case, label=None) -> dict:
    best, scores = vote([t.text for t in case.trajectories], label)
    return {
        "case_id": case.case_id,
        "strategy": "vote",
        "text": case.trajectories[best].text,
        "source_teacher": case.trajectories[best].teacher,
        "truncated": {},
        "agreement": {t.teacher: round(s, 6) for t, s in zip(case.trajectories, scores)},
    }


def reading(text: str, label=None, side=None) -> dict:
    """{observation: (label, side)}: what `vote` and `self_vote` compare (a finding on the wrong side disagrees)."""
    lab, sides = (label or labeler.label)(text), (side or labeler.laterality)(text)
    return {o: (lab.get(o), sides.get(o)) for o in OBSERVATIONS}


def self_vote(samples: list[str], teachers: list[str], label=None, side=None) -> tuple[int, list[float]]:
    """Index of the sample that agrees best with the teachers (mean agreement, labels and sides) and every sample's
    score. Samples that label nothing are candidates only if all do; ties go to the earlier sample."""
    theirs = [reading(t, label, side) for t in teachers]
    ours = [reading(t, label, side) for t in samples]
    scores = [sum(agreement(r, t) for t in theirs) / len(theirs) if theirs else 0.0 for r in ours]
    candidates = [i for i, r in enumerate(ours) if not mentions_nothing({o: v[0] for o, v in r.items()})]
    best = max(candidates or range(len(samples)), key=lambda i: (scores[i], -i))
    return best, scores


def self_vote_records(model, processor, cases, num_samples, temperature, seed, max_new_tokens, batch_size):
    """One record per case: K samples of pi_st on the case's question, the one closest to the teachers as t+. Sample
    k of a case uses its own generator seeded from (seed, case id, k): independent of batching and resumes."""
    answers = generation.generate(
        model,
        processor,
        [(c.images, c.prompt) for c in cases for _ in range(num_samples)],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=False,
        greedy=False,
        temperature=temperature,
        seeds=[generation.sample_seed(seed, c.case_id, k) for c in cases for k in range(num_samples)],
    )
    out = []
    for i, c in enumerate(cases):
        samples = answers[i * num_samples : (i + 1) * num_samples]
        best, scores = self_vote(samples, [t.text for t in c.trajectories])
        out.append(
            {
                "case_id": c.case_id,
                "strategy": "self-vote",
                "text": samples[best],
                "teachers": c.teachers,
                "truncated": {},
                "chosen_sample": best,
                "agreement": [round(x, 6) for x in scores],
                "seed": seed,
                "temperature": temperature,
            }
        )
    return out


# ---------------------------------------------------------------- model


def _water_fill(lengths: list[int], budget: int) -> list[int]:
    """Per-teacher token allowance: short trajectories keep everything, the rest share what is left equally
    (the remainder to the earlier teachers), so no teacher is cut more than it must be."""
    alloc = [0] * len(lengths)
    left, remaining = budget, sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    while remaining:
        share = left // len(remaining)
        if lengths[remaining[0]] <= share:
            i = remaining.pop(0)
            alloc[i] = lengths[i]
            left -= lengths[i]
            continue
        extra = left - share * len(remaining)
        for k, i in enumerate(sorted(remaining)):
            alloc[i] = share + (1 if k < extra else 0)
        break
    return alloc


def fit_trajectories(processor, image_paths, question, texts, max_length, max_new_tokens):
    """-> (prompt, tokens cut per trajectory, prompt tokens). Cuts the ends of the longest trajectories until the
    chat-formatted prompt with its image tokens fits max_length - max_new_tokens."""
    tok = processor.tokenizer
    limit = max_length - max_new_tokens

    def length(ts):
        return estimate_length(
            processor, image_paths, prompt_text(processor, len(image_paths), consensus_prompt(question, ts))
        )

    fixed = length([""] * len(texts))
    if fixed >= limit:
        raise ApoError(
            f"--max-length {max_length}: the image(s), question and instructions alone take {fixed} tokens "
            f"and --max-new-tokens {max_new_tokens} more; raise --max-length"
        )
    ids = [tok(t.strip(), add_special_tokens=False)["input_ids"] for t in texts]
    mark = len(tok(CUT_MARK, add_special_tokens=False)["input_ids"])
    budget = limit - fixed
    for _ in range(8):  # re-tokenising a cut text can merge differently at the seam; shrink until it fits
        alloc = _water_fill([len(x) for x in ids], budget)
        kept = [a if a >= len(x) else max(0, a - mark) for a, x in zip(alloc, ids)]
        cut_texts = [
            t.strip() if k >= len(x) else tok.decode(x[:k]).rstrip() + CUT_MARK for t, x, k in zip(texts, ids, kept)
        ]
        n = length(cut_texts)
        if n <= limit:
            prompt = consensus_prompt(question, cut_texts)
            return prompt, [len(x) - k for x, k in zip(ids, kept)], n
        budget -= n - limit
    raise ApoError(f"could not fit the trajectories into --max-length {max_length}")


def model_records(
    model, processor, cases, max_length, max_new_tokens, batch_size, skip_bad=False, pixels=None
) -> list[dict]:
    """One record per case. A case whose image(s) and question alone do not fit --max-length stops the run naming
    it, or with skip_bad gets an empty text and a "skipped" reason (build-pairs drops it: empty_positive)."""
    fits, skipped = [], {}
    for c in cases:
        try:
            fits.append(
                (
                    c,
                    *fit_trajectories(
                        processor, c.images, c.prompt, [t.text for t in c.trajectories], max_length, max_new_tokens
                    ),
                )
            )
        except ApoError as e:
            if not skip_bad:
                raise ApoError(f"case {c.case_id}: {e} (or pass --skip-bad to skip such cases)") from None
            skipped[c.case_id] = str(e)
    texts = (
        generation.generate(
            model,
            processor,
            [(c.images, p) for c, p, _, _ in fits],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
        )
        if fits
        else []
    )
    done = {
        c.case_id: {
            "case_id": c.case_id,
            "strategy": "model",
            "text": text,
            "teachers": c.teachers,
            "prompt_tokens": n,
            "truncated": {t.teacher: k for t, k in zip(c.trajectories, cut) if k},
            **({"pixel_budget": pixels} if pixels else {}),
        }
        for (c, _, cut, n), text in zip(fits, texts)
    }
    return [
        done.get(c.case_id)
        or {
            "case_id": c.case_id,
            "strategy": "model",
            "text": "",
            "teachers": c.teachers,
            "skipped": skipped[c.case_id],
            "truncated": {},
        }
        for c in cases
    ]


# ---------------------------------------------------------------- reading it back (build-pairs, drift)


def _record_problem(rec) -> str | None:
    if not isinstance(rec, dict):
        return f"record must be an object, got {type(rec).__name__}"
    cid = rec.get("case_id")
    if cid is None or isinstance(cid, (dict, list, bool)) or not str(cid).strip():
        return "missing or invalid case_id"
    if not isinstance(rec.get("text"), str):
        return f"text must be a string, got {type(rec.get('text')).__name__}"
    if len(rec["text"]) > MAX_TEXT_CHARS:
        return f"text has {len(rec['text'])} characters (limit {MAX_TEXT_CHARS})"
    if not isinstance(rec.get("source_teacher", ""), (str, type(None))):
        return "source_teacher must be a string"
    return None


def read_consensus(path, skip_bad: bool = False) -> tuple[dict, list[dict]]:
    """-> ({case_id: record}, rejected lines) from a consensus JSONL. A record needs a case_id and a string text
    (empty = no consensus for that case). A bad line raises DataError(file, line, reason) unless skip_bad. A last line
    with no newline that does not parse is a run still writing (or killed while writing): ignored, with a note."""
    path = Path(path)
    if not path.is_file():
        raise ApoError(f"--consensus {path}: file not found (run `apo consensus` first)")
    records, first, rejects = {}, {}, Rejects(path, skip_bad)
    for line in iter_jsonl(path):
        reason = line.error or _record_problem(line.value)
        cid = None if reason else str(line.value["case_id"])
        if cid in records:
            reason = f"duplicate case_id {cid!r} (first at line {first[cid]})"
        if reason and line.torn:
            print(f"{path}: ignoring a torn last line ({reason}; is `apo consensus` still running?)")
            break
        if reason:
            rejects.add(line.number, reason, line.raw)
            continue
        records[cid], first[cid] = line.value, line.number
    if rejects.items:
        print(f"{path}: skipped {len(rejects.items)} bad consensus line(s), kept {len(records)}")
    return records, rejects.items


def load_consensus(path, skip_bad: bool = False, rejects_path=None) -> dict:
    """{case_id: consensus record} for the stages that read `apo consensus` output (build-pairs, drift); with
    skip_bad, bad lines are listed in rejects_path (default: next to the file)."""
    records, rejects = read_consensus(path, skip_bad)
    if rejects:
        write_rejects(rejects, rejects_path or f"{path}.rejects.jsonl")
    elif rejects_path is not None:
        Path(rejects_path).unlink(missing_ok=True)  # no stale list from an earlier run
    return records


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    add_model_arguments(parser, required=False)
    parser.add_argument("--out", required=True, help="consensus JSONL (resumable: a rerun skips finished cases)")
    parser.add_argument(
        "--strategy",
        choices=("model", "self-vote", "vote"),
        default="model",
        help="model: the SFT model writes t+ in context (the paper's); self-vote: the SFT model's own sample that\n"
        "agrees best with the teachers; vote: medoid teacher by labels",
    )
    g = parser.add_argument_group("self-vote")
    g.add_argument("--num-samples", type=int, default=8, help="samples of pi_st per case (self-vote)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (self-vote)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (self-vote): the same seed, the same t+")
    parser.add_argument(
        "--max-length",
        type=int,
        default=4096,
        help="prompt + answer token limit; trajectories are cut per teacher to fit",
    )
    add_overwrite_argument(parser)


def summary(records: list[dict]) -> str:
    lines = [f"consensus: {len(records)} cases"]
    by_source = Counter(r.get("source_teacher") for r in records if r.get("source_teacher"))
    if by_source:
        lines.append("  medoid teacher: " + ", ".join(f"{t} {n}" for t, n in by_source.most_common()))
    cut_cases = [r for r in records if r.get("truncated")]
    if any(r.get("strategy") == "model" for r in records):
        lines.append(f"  truncated: {len(cut_cases)} of {len(records)} cases had a trajectory cut")
        per = Counter()
        hits = Counter()
        for r in cut_cases:
            for t, k in r["truncated"].items():
                per[t] += k
                hits[t] += 1
        for t in sorted(per, key=lambda t: -per[t]):
            lines.append(f"    {t}: cut in {hits[t]} cases, {per[t]} tokens ({per[t] / hits[t]:.0f} per cut case)")
    skipped = sum("skipped" in r for r in records)
    if skipped:
        lines.append(
            f"  skipped: {skipped} case(s) whose image(s) and question alone exceed --max-length "
            '("skipped" in their records)'
        )
    empty = sum(not r["text"].strip() for r in records)
    if empty:
        lines.append(f"  empty answers: {empty} (build-pairs drops these cases)")
    return "\n".join(lines)


def by_length(cases):
    """Longest context first (question + trajectories, in characters: a cheap, monotone stand-in for tokens; the
    image tokens are alike within a data set), ties in data set order. Generation then pads little in every batch,
    and an out-of-memory shows on the first one. The output file keeps data set order (run_resumable's `order`)."""
    size = {c.case_id: len(c.prompt) + sum(len(t.text) for t in c.trajectories) for c in cases}
    return sorted(cases, key=lambda c: -size[c.case_id])


def run_identity(args) -> dict:
    """What decides this command's records (OUT.identity.json; a rerun with another one is refused)."""
    ident = {
        "command": "consensus",
        "strategy": args.strategy,
        "dataset": fingerprint(args.dataset),
        "split": args.split,
        "teachers": args.teachers,
        "image_root": str(Path(args.image_root).resolve()) if args.image_root else None,
    }
    if args.strategy == "model":
        ident.update(model_identity(args), max_length=args.max_length, prompt=CONSENSUS_PROMPT + CUT_MARK)
    if args.strategy == "self-vote":
        ident.update(model_identity(args), num_samples=args.num_samples, temperature=args.temperature, seed=args.seed)
    return ident


def run(args) -> int:
    if args.strategy in ("model", "self-vote") and not args.model:
        raise ApoError(f"--strategy {args.strategy} needs --model (the SFT model); --strategy vote needs none")
    if args.strategy == "self-vote" and (args.num_samples < 1 or not args.temperature > 0):
        raise ApoError(
            f"--strategy self-vote needs --num-samples >= 1 and --temperature > 0 "
            f"(got {args.num_samples}, {args.temperature})"
        )
    check_outputs({"--out": args.out}, {"--dataset": args.dataset})
    claim(args.out, run_identity(args), args.overwrite)  # before the model loads: one writer, no foreign results
    cases = cases_from_args(args, rejects_default=f"{args.out}.rejects.jsonl")
    usable = [c for c in cases if c.trajectories]
    if len(usable) < len(cases):
        print(
            f"consensus: {len(cases) - len(usable)} case(s) have no teacher trajectory; skipped (build-pairs lists "
            f"them)"
        )
    if not usable:
        raise ApoError(f"{args.dataset}: no case with teacher trajectories")
    if args.strategy == "vote":

        def process(chunk):
            return [vote_record(c, labeler.label) for c in chunk]

        chunk_size = 256
    elif args.strategy == "self-vote":
        model, processor = model_from_args(args)

        def process(chunk):
            return self_vote_records(
                model,
                processor,
                chunk,
                args.num_samples,
                args.temperature,
                args.seed,
                args.max_new_tokens,
                args.batch_size,
            )

        chunk_size = args.batch_size * 4
    else:
        model, processor = model_from_args(args)

        def process(chunk):
            return model_records(
                model,
                processor,
                chunk,
                args.max_length,
                args.max_new_tokens,
                args.batch_size,
                args.skip_bad,
                pixels_from_args(args),
            )

        chunk_size = args.batch_size * 4  # a crash loses at most this many answers
        usable = by_length(usable)  # batches of like lengths over the whole set, not only within a chunk
    results = run_resumable(
        args.out,
        usable,
        key=lambda c: c.case_id,
        process=process,
        chunk_size=chunk_size,
        order=[c.case_id for c in cases],
        desc=f"consensus ({args.strategy})",
        identity=run_identity(args),
    )
    if results is None:  # not rank 0: rank 0 merges and reports
        return 0
    print(summary(list(results.values())))
    print(f"wrote {args.out}")
    return 0
