"""ms-swift-style preference rows with several rejected answers -> APO groups (stage-3 data for any Qwen2.5-VL data).

    {"messages": [{"role": "system", "content": "..."}?,                 # optional; else the template's default
                  {"role": "user", "content": "<image>What changed?"},   # any number of earlier turns (history)
                  {"role": "assistant", "content": "..."}, ...,
                  {"role": "user", "content": "And now?"},
                  {"role": "assistant", "content": CHOSEN}],             # the last turn is the chosen answer
     "images": ["a.png", ...],                                         # one per "<image>" tag, in order
     "rejected_responses": [R1, R2, ...]}                              # the N negatives, ranked below CHOSEN

`rejected_responses` is a new key: ms-swift gives a *list* in `rejected_response` another meaning (the messages of
one reply), so a list there is refused; a *string* `rejected_response` is one negative (ms-swift's DPO rows as they
are). Optional: `id`/`case_id` (else a digest of the row), `teachers` (names of the negatives, for the per-teacher
reward metrics; else rejected_1..N).

A row becomes a group with one extra key, `messages`: the prompt conversation (everything before the chosen turn) in
the processor's chat format, "<image>" tags turned into image entries where they stand. `GroupCollator.encode_group`
renders it with the processor's chat template, so the plain and the packed path see the same prompt tokens, history
and system prompt included (the packed kernel treats a prompt as one block of tokens, whatever its turns).
"""

from __future__ import annotations

import hashlib
import json

IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")


def is_swift_row(row) -> bool:
    """Per-row format detection: groups rows (`apo build-pairs`) never carry `messages`."""
    return isinstance(row, dict) and "messages" in row


def _image_paths(row) -> list | str:
    value = row.get("images", [])
    if value is None:
        value = []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return f"images must be a list of paths, got {type(value).__name__}"
    out = []
    for v in value:
        if isinstance(v, dict):  # ms-swift also accepts {"path": ...}
            v = v.get("path")
        if not isinstance(v, str) or not v.strip():
            return f"images must be a list of non-empty paths, got {v!r}"
        out.append(v)
    return out


def _rejected(row) -> list | str:
    many, one = row.get("rejected_responses"), row.get("rejected_response")
    if many is not None and one is not None:
        return "give rejected_responses (several) or rejected_response (one), not both"
    if isinstance(one, list):
        return (
            "rejected_response is a list (ms-swift's messages of one reply); "
            "put several rejected answers in rejected_responses"
        )
    if one is not None:
        many = [one]
    if many is None:
        return "no rejected answers (rejected_responses or rejected_response)"
    if not isinstance(many, list):
        return f"rejected_responses must be a list of strings, got {type(many).__name__}"
    if not many:
        return "rejected_responses is empty: a group needs at least one negative"
    return many


def swift_problem(row, max_chars: int) -> str | None:
    """Why this row cannot be a group (one line), or None."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        return "messages must be a non-empty list of {role, content}"
    for i, m in enumerate(msgs, 1):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}"
        if role == "system" and i != 1:
            return f"message {i}: a system message must come first"
        if not isinstance(content, str):
            return f"message {i} ({role}): content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"message {i} ({role}): empty content"
        if len(content) > max_chars:
            return f"message {i} ({role}): {len(content)} characters (limit {max_chars})"
    if msgs[-1]["role"] != "assistant":
        return "the last message must be the assistant's chosen answer"
    if not any(m["role"] == "user" for m in msgs[:-1]):
        return "no user turn before the chosen answer"
    if IMAGE_TAG in msgs[-1]["content"]:
        return "the chosen answer contains an <image> tag"
    images = _image_paths(row)
    if isinstance(images, str):
        return images
    tags = sum(m["content"].count(IMAGE_TAG) for m in msgs[:-1])
    if tags != len(images):
        return f"{tags} <image> tag(s) in messages but {len(images)} image(s)"
    rejected = _rejected(row)
    if isinstance(rejected, str):
        return rejected
    for i, text in enumerate(rejected, 1):
        if not isinstance(text, str) or not text.strip():  # an empty candidate would score log-prob 0
            return f"rejected answer {i} must be a non-empty string"
        if len(text) > max_chars:
            return f"rejected answer {i} has {len(text)} characters (limit {max_chars})"
    teachers = row.get("teachers")
    if teachers is not None and (
        not isinstance(teachers, list)
        or len(teachers) != len(rejected)
        or not all(isinstance(t, str) and t.strip() for t in teachers)
    ):
        return "teachers must be non-empty strings, one per rejected answer"
    cid = row.get("id", row.get("case_id"))
    if cid is not None and (isinstance(cid, (dict, list, bool)) or not str(cid).strip()):
        return "invalid id"
    return None


def chat_content(text: str) -> list[dict]:
    """An ms-swift content string -> the processor's content list, each "<image>" an image entry where it stands."""
    parts = text.split(IMAGE_TAG)
    out = []
    for k, part in enumerate(parts):
        if k:
            out.append({"type": "image"})
        if part:
            out.append({"type": "text", "text": part})
    return out


def swift_group(row) -> dict:
    """A checked row (`swift_problem` is None) -> a group: the `load_groups` fields plus `messages` (the prompt)."""
    msgs, images, rejected = row["messages"], _image_paths(row), _rejected(row)
    prompt = [{"role": m["role"], "content": chat_content(m["content"])} for m in msgs[:-1]]
    cid = row.get("id", row.get("case_id"))
    if cid is None:  # the whole row: two rows with one prompt but other answers are two groups
        blob = json.dumps([msgs, images, rejected], ensure_ascii=False, sort_keys=True)
        cid = "swift-" + hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]
    last_user = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
    return {
        "case_id": str(cid),
        "prompt": last_user.replace(IMAGE_TAG, "").strip() or last_user,  # for logs; the model sees `messages`
        "images": images,
        "positive": msgs[-1]["content"],
        "negatives": list(rejected),
        "teachers": list(row.get("teachers") or [f"rejected_{i}" for i in range(1, len(rejected) + 1)]),
        "messages": prompt,
    }
