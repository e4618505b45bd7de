"""Stage 1 data ("learn"): one ms-swift SFT row per teacher trajectory.

    apo prepare-sft --dataset cxrmax_train.jsonl --image-root MIMIC-CXR-JPG/ --out sft.jsonl

Rows are ms-swift's standard format, so `swift sft --dataset sft.jsonl` reads them as they are:
    {"messages": [{"role": "user", "content": "<image>question"}, {"role": "assistant", "content": trajectory}],
     "images": ["/abs/path.jpg"], "case_id": ..., "teacher": ...}
Every teacher's answer becomes its own sample: q* = argmin_q sum_u KL(pi_u || q) is plain next-token loss over all
of them.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from apo.data import add_data_arguments, cases_from_args
from apo.io.jobs import check_outputs
from apo.model.chat import swift_user_content


def sft_rows(cases):
    for case in cases:
        for t in case.trajectories:
            yield {
                "messages": [
                    {"role": "user", "content": swift_user_content(len(case.images), case.prompt)},
                    {"role": "assistant", "content": t.text},
                ],
                "images": list(case.images),
                "case_id": case.case_id,
                "teacher": t.teacher,
            }


def add_arguments(p) -> None:
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="ms-swift JSONL to write")


def run(args) -> int:
    out = Path(args.out)
    check_outputs({"--out": out}, {"--dataset": args.dataset})
    cases = cases_from_args(args, rejects_default=f"{out}.rejects.jsonl")
    counts = collections.Counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in sft_rows(cases):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[row["teacher"]] += 1
    os.replace(tmp, out)  # a killed run never leaves a half file under the real name
    width = max([len(t) for t in counts] + [7])
    print(f"prepare-sft: {len(cases)} cases -> {sum(counts.values())} rows in {out}")
    for teacher, n in sorted(counts.items()):
        print(f"  {teacher:<{width}} {n}")
    return 0
