"""Groups -> one padded batch of candidate rows (stage-3 data side).

A group {prompt, images, positive t+, negatives t_1..t_N} becomes 1+N rows, each = image(s) + prompt + one
candidate response, in the processor's own chat template, so APO scores exactly what SFT trained and eval prompts.
The group structure stays explicit: `group_index`/`candidate_index` per row and `valid` [B, 1+N] per group, so the
trainer can scatter row log-probs back into the [B, 1+N] matrix the loss takes. This is the plain path (`--packed
false`); `apo.model.packing.PackedGroupCollator` reuses `encode_group` and packs each group's image and prompt once.

Over-length policy: the prompt (with its image tokens) is never cut, since cutting image tokens breaks the model and
cutting the question changes the task; each response is truncated to `max_length - prompt length` tokens. A
candidate with no response token left is dropped (no row) and marked invalid - never scored as log-prob 0. That
can only happen when the prompt alone fills `max_length`, so it drops the whole group; it is logged (once, then
counted in `dropped`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from apo.data import MAX_TEXT_CHARS, ImageResolver
from apo.errors import ApoError, DataError
from apo.io.records import Rejects, iter_jsonl, write_rejects
from apo.model.chat import assistant_message, load_images, user_message
from apo.trainer.swift_rows import is_swift_row, swift_group, swift_problem

log = logging.getLogger(__name__)

GROUP_FIELDS = ("case_id", "prompt", "images", "positive", "negatives", "teachers")


def _group_problem(g) -> str | None:
    if not isinstance(g, dict):
        return f"a group must be an object, got {type(g).__name__}"
    missing = [k for k in GROUP_FIELDS if k not in g]
    if missing:
        return f"missing fields {missing}"
    if g["case_id"] is None or isinstance(g["case_id"], (dict, list, bool)) or not str(g["case_id"]).strip():
        return "missing or invalid case_id"
    if not isinstance(g["images"], list) or not all(isinstance(p, str) and p.strip() for p in g["images"]):
        return "images must be a list of paths"
    if (
        not isinstance(g["negatives"], list)
        or not isinstance(g["teachers"], list)
        or len(g["teachers"]) != len(g["negatives"])
    ):
        return "negatives and teachers must be lists of the same length"
    if not g["negatives"]:
        return "a group needs at least one negative"
    if not all(isinstance(t, str) and t.strip() for t in g["teachers"]):
        return "teachers must be non-empty strings"
    for what, text in [("prompt", g["prompt"]), ("positive", g["positive"])] + [
        (f"negative {i + 1}", t) for i, t in enumerate(g["negatives"])
    ]:
        if not isinstance(text, str) or not text.strip():  # an empty candidate would score log-prob 0
            return f"{what} must be a non-empty string"
        if len(text) > MAX_TEXT_CHARS:
            return f"{what} has {len(text)} characters (limit {MAX_TEXT_CHARS})"
    return None


def load_groups(
    path, max_negatives: int | None = None, skip_bad: bool = False, rejects_path=None, image_rules=None
) -> list[dict]:
    """Read groups.jsonl (from `apo build-pairs`) or ms-swift-style rows with several rejected answers
    (`apo.trainer.swift_rows`; detected per row, a file may mix them); a malformed line raises DataError naming it,
    or with `skip_bad` is left out and listed with its reason in `rejects_path` (default: next to the file).
    Everything is checked now, not as a crash hours into training: field types, non-empty texts, duplicate case ids,
    and every image (exists, decodes, not absurdly large). build-pairs writes absolute image paths (fenced by its
    --image-root); a relative path resolves against the groups file's folder and may not leave it."""
    path = Path(path)
    if not path.is_file():
        raise ApoError(f"{path}: groups file not found (write it with `apo build-pairs`)")
    root = path.parent.resolve()
    rejects = Rejects(path, skip_bad)
    groups, lines, raws, first = [], [], [], {}
    for line in iter_jsonl(path):
        lineno, g = line.number, line.value
        if line.error:
            rejects.add(lineno, line.error, line.raw)
            continue
        swift = is_swift_row(g)
        problem = swift_problem(g, MAX_TEXT_CHARS) if swift else _group_problem(g)
        if problem:
            rejects.add(lineno, problem, g)
            continue
        row = g
        g = swift_group(g) if swift else g
        g["case_id"] = str(g["case_id"])
        if g["case_id"] in first:
            rejects.add(lineno, f"duplicate case_id {g['case_id']!r} (first at line {first[g['case_id']]})", row)
            continue
        images = []
        for p in g["images"]:
            full = Path(p) if Path(p).is_absolute() else (root / p).resolve()
            if not Path(p).is_absolute() and not full.is_relative_to(root):
                rejects.add(lineno, f"image path {p!r} leaves the groups file's folder {root}", row)
                break
            images.append(str(full))
        else:
            first[g["case_id"]] = lineno
            g["images"] = images
            if max_negatives is not None:
                g["negatives"], g["teachers"] = g["negatives"][:max_negatives], g["teachers"][:max_negatives]
            groups.append({k: g[k] for k in GROUP_FIELDS + ("messages",) if k in g})
            lines.append(lineno)
            raws.append(row)
    check = ImageResolver(root, allow_absolute=True, verify="full", rules=image_rules)
    check.check_all(p for g in groups for p in g["images"])
    kept = []
    for g, lineno, row in zip(groups, lines, raws):
        problem = next((check.problem(p) for p in g["images"] if check.problem(p)), None)
        if problem:
            rejects.add(lineno, problem, row)
        else:
            kept.append(g)
    if rejects.items:
        rejects_path = Path(rejects_path or f"{path}.rejects.jsonl")
        write_rejects(rejects.items, rejects_path)
        log.warning(
            "%s: skipped %d bad record(s), kept %d group(s); reasons in %s",
            path,
            len(rejects.items),
            len(kept),
            rejects_path,
        )
    elif rejects_path is not None:
        Path(rejects_path).unlink(missing_ok=True)  # no stale list from an earlier run
    else:
        Path(f"{path}.rejects.jsonl").unlink(missing_ok=True)
    if not kept:
        raise DataError(path, None, "no groups")
    return kept


def candidate_key(case_id: str, text: str) -> str:
    """Stable id of one (case, response) pair: the reference log-prob cache is keyed by it."""
    return f"{case_id}|{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


class GroupCollator:
    """B groups -> one padded batch of candidate rows (the plain path), R = the groups' valid candidates:

    input_ids, attention_mask, mm_token_type_ids, labels  [R, T] (labels -100 outside each response)
    pixel_values, image_grid_thw                          each row's images (repeated per row)
    group_index, candidate_index                          [R]: the row's group b and column j (0 = positive)
    valid                                                 [B, 1+N] bool; ref_keys, case_id, teachers: lists

    collator = GroupCollator(processor, max_length=4096)
    batch = collator(load_groups("groups.jsonl")[:2])
    logps, n_tokens = apo.model.logps.forward_logps(model, batch)   # [R] each
    """

    def __init__(self, processor, max_length: int = 4096, end_token: str = "<|im_end|>"):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.max_length, self.end_token = max_length, end_token
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.dropped = 0  # candidates dropped for length, over the collator's life

    def encode_group(self, g: dict):
        """The prompt once (ids + pixels), then each candidate's response token ids (None if dropped)."""
        images = load_images(g["images"])
        # the prompt conversation of an ms-swift-style row (history, system prompt), else one user turn
        messages = g.get("messages") or user_message(len(images), g["prompt"])
        prompt_text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.processor(text=[prompt_text], images=images or None, return_tensors="pt")
        budget = self.max_length - enc["input_ids"].shape[1]
        responses = []
        for text in [g["positive"], *g["negatives"]]:
            full = self.processor.apply_chat_template(messages + [assistant_message(text)], tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError("chat template: prompt+response does not start with the generation prompt")
            suffix = full[len(prompt_text) :]
            end = suffix.rfind(self.end_token)  # label through the closing <|im_end|>, not the template's "\n"
            suffix = suffix[: end + len(self.end_token)] if end >= 0 else suffix
            ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"][: max(budget, 0)]
            responses.append(ids or None)
        if responses[0] is None or not any(responses[1:]):  # nothing left to rank: the whole group goes
            (log.warning if self.dropped == 0 else log.debug)(
                "case %s: prompt is %d tokens, >= max_length %d; group dropped (raise max_length or shrink images)",
                g["case_id"],
                enc["input_ids"].shape[1],
                self.max_length,
            )
            self.dropped += len(responses)
            responses = [None] * len(responses)
        return enc, responses

    def __call__(self, groups: list[dict]) -> dict:
        n_cols = 1 + max(len(g["negatives"]) for g in groups)
        valid = torch.zeros(len(groups), n_cols, dtype=torch.bool)
        rows, pixels, grids, gidx, cidx, keys = [], [], [], [], [], []
        for b, g in enumerate(groups):
            enc, responses = self.encode_group(g)
            prompt_ids = enc["input_ids"][0].tolist()
            prompt_mm = enc.get("mm_token_type_ids", torch.zeros_like(enc["input_ids"]))[0].tolist()
            for j, (ids, text) in enumerate(zip(responses, [g["positive"], *g["negatives"]])):
                if ids is None:
                    continue
                valid[b, j] = True
                rows.append((prompt_ids + ids, prompt_mm + [0] * len(ids), [-100] * len(prompt_ids) + ids))
                if "pixel_values" in enc:  # repeated per row for now: every row sees its group's images
                    pixels.append(enc["pixel_values"])
                    grids.append(enc["image_grid_thw"])
                gidx.append(b)
                cidx.append(j)
                keys.append(candidate_key(g["case_id"], text))
        width = max((len(r[0]) for r in rows), default=0)
        pad = lambda seq, v: seq + [v] * (width - len(seq))  # right padding
        batch = {
            "input_ids": torch.tensor([pad(r[0], self.pad_id) for r in rows], dtype=torch.long).view(len(rows), width),
            "attention_mask": torch.tensor([pad([1] * len(r[0]), 0) for r in rows], dtype=torch.long).view(
                len(rows), width
            ),
            "mm_token_type_ids": torch.tensor([pad(r[1], 0) for r in rows], dtype=torch.long).view(len(rows), width),
            "labels": torch.tensor([pad(r[2], -100) for r in rows], dtype=torch.long).view(len(rows), width),
            "group_index": torch.tensor(gidx, dtype=torch.long),
            "candidate_index": torch.tensor(cidx, dtype=torch.long),
            "valid": valid,
            "case_id": [g["case_id"] for g in groups],
            "teachers": [list(g["teachers"]) for g in groups],  # aligned with columns 1..N
            "ref_keys": keys,  # per row
        }
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat(grids)
        return batch
