"""`apo replay`: rehearsal rows for stage 1 on the embedded world (the base's own tasks, on images it never saw).

    apo replay --base runs/cache/base-seed0 --out runs/demo/replay --describe 600 --compare 300
    DATASET="runs/demo/sft.jsonl runs/demo/replay/replay.jsonl" bash scripts/SFT-Qwen2.5.sh

SFT on a narrow domain makes a model forget what it could do before; ms-swift users mix general data into
`--dataset` for that (`--dataset domain.jsonl AI-ModelScope/alpaca-gpt4-data-en#500`). A 7B instruct model keeps
most of its skills through a LoRA on 24k images; the embedded tiny base does not: 600 SFT steps on the teachers'
answers took its MS-CXR-T Top-1 to 0 (it answers in the teachers' words, which never name a change) and its merge
skill back to an untaught base's (docs/seeing_base.md). Its "general data" are its own pretraining tasks, so these
rows are those tasks in ms-swift's format: describe and compare (merge and ask rehearse only a base built with
them; for another base they teach a new task). They are
made by `apo.world.pretrain`'s own makers on indices from REPLAY_OFFSET up, which pretraining (indices below its
example counts) never draws: same style, new images. Images are written losslessly (PNG) as the base saw them (its
JPEG-roundtripped pixels), so a row is exactly a pretraining example it did not see.

Every arm of an experiment starts from the same pi_st, so replay changes the common starting point, not one arm.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from apo.errors import ApoError

REPLAY_OFFSET = 1_000_000  # example indices from here on: far above any pretraining example count
IDENTITY = "replay.identity.json"


def identity(base_identity: dict, n_describe: int, n_compare: int, n_merge: int, n_ask: int) -> dict:
    from apo.world import pretrain

    return {
        "kind": "apo-replay-rows",
        "recipe_version": pretrain.RECIPE_VERSION,
        "seed": base_identity["seed"],
        "offset": REPLAY_OFFSET,
        "describe": n_describe,
        "compare": n_compare,
        "merge": n_merge,
        "ask": n_ask,
    }


def base_identity(base_dir: Path) -> dict:
    """The pretrained base's identity (its seed draws the rows' images); one line if the folder is not a base."""
    path = base_dir / "pretraining.json"
    try:
        ident = json.loads(path.read_text(encoding="utf-8"))["identity"]
        if ident.get("kind") != "apo-pretrained-base":
            raise KeyError("kind")
        int(ident["seed"])
        return ident
    except FileNotFoundError:
        raise ApoError(
            f"--base {base_dir}: no pretraining.json (not a base from `apo tiny-model --pretrain`)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ApoError(f"--base {base_dir}: pretraining.json is unreadable or not a pretrained base's ({e})") from None


def write_replay(
    out_dir, base_dir, n_describe: int, n_compare: int, n_merge: int = 0, n_ask: int = 0, workers: int = 2
) -> dict:
    """Write `out_dir`/replay.jsonl (ms-swift rows) and its images; returns {"rows": n, "path": ..., "reused": bool}.
    A folder already holding rows with the same identity is reused; any other non-empty folder is refused."""
    from PIL import Image

    from apo.model.chat import swift_user_content
    from apo.world import pretrain

    counts = {"describe": n_describe, "compare": n_compare, "merge": n_merge, "ask": n_ask}
    if min(counts.values()) < 0 or sum(counts.values()) == 0:
        raise ApoError("--describe/--compare/--merge/--ask: counts must not be negative, and one must be positive")
    out, base_dir = Path(out_dir), Path(base_dir)
    ident = identity(base_identity(base_dir), n_describe, n_compare, n_merge, n_ask)
    rows_path, ident_path = out / "replay.jsonl", out / IDENTITY
    if out.exists() and not out.is_dir():
        raise ApoError(f"--out {out}: is a file, not a folder")
    if ident_path.exists() and rows_path.exists():
        try:
            same = json.loads(ident_path.read_text(encoding="utf-8")) == ident
        except (OSError, ValueError):
            same = False
        if same:
            with rows_path.open(encoding="utf-8") as f:
                return {"rows": sum(1 for _ in f), "path": str(rows_path), "reused": True}
    if out.exists() and any(out.iterdir()):
        raise ApoError(
            f"--out {out}: not empty and holds no replay rows of this base and these counts; choose a new folder"
        )
    # drawn into a sibling and renamed when whole: an interrupted run leaves no half folder under the real name
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)

    examples = pretrain.make_examples(
        ident["seed"], n_describe, n_compare, workers, False, n_merge, n_ask, first=REPLAY_OFFSET
    )
    indices = [i for n in counts.values() for i in range(REPLAY_OFFSET, REPLAY_OFFSET + n)]  # make_examples' order

    with open(work / rows_path.name, "w", encoding="utf-8") as f:
        for i, ex in zip(indices, examples):
            task = ex["task"]
            paths = []
            for k, pixels in enumerate(ex["images"]):
                name = f"{task}-{i}-{k}.png"
                Image.fromarray(pixels).save(work / "images" / name)
                paths.append(str((out / "images" / name).resolve()))  # where it lies once renamed
            row = {
                "messages": [
                    {"role": "user", "content": swift_user_content(len(paths), ex["prompt"])},
                    {"role": "assistant", "content": ex["answer"]},
                ],
                "images": paths,
                "case_id": f"replay-{task}-{i}",
                "teacher": f"replay-{task}",
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (work / IDENTITY).write_text(json.dumps(ident, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(work, out)
    return {"rows": len(examples), "path": str(rows_path), "reused": False}


def add_arguments(p) -> None:
    p.add_argument(
        "--base", required=True, help="the pretrained base (`apo tiny-model --pretrain`): its seed draws the images"
    )
    p.add_argument("--out", required=True, help="output folder: replay.jsonl (ms-swift rows) and images/")
    p.add_argument("--describe", type=int, default=600, help="describe rows (one image -> its findings)")
    p.add_argument("--compare", type=int, default=300, help="compare rows (previous, current -> the change)")
    p.add_argument(
        "--merge", type=int, default=0, help="merge rows (an image + noisy descriptions -> the supported one)"
    )
    p.add_argument("--ask", type=int, default=0, help="ask rows (a question naming one finding -> the answer about it)")
    p.add_argument("--workers", type=int, default=2, help="processes drawing the images")


def run(args) -> int:
    rec = write_replay(args.out, args.base, args.describe, args.compare, args.merge, args.ask, workers=args.workers)
    verb = "reused" if rec["reused"] else "wrote"
    print(f"replay: {verb} {rec['rows']} rows of the base's own tasks in {rec['path']}")
    return 0
