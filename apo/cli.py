"""The `apo` console script: one subcommand per stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int | None`; this file only wires them.
Modules are imported when their subcommand runs, so `apo synth --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from apo.errors import ApoError

# name -> (module, one-line help). Order = the order of the pipeline.
COMMANDS = {
    "synth": (
        "apo.world.synth",
        "write the synthetic CXR-MAX-format benchmark (images, 7 drifting teachers, MS-CXR-T pairs)",
    ),
    "tiny-model": ("apo.world.tiny", "build a tiny randomly initialised Qwen2.5-VL (model + processor) for CPU runs"),
    "prepare-sft": ("apo.sft", "stage 1 data: one ms-swift SFT row per teacher trajectory"),
    "replay": (
        "apo.world.replay",
        "stage 1 rehearsal rows (embedded world): the pretrained base's own tasks on new images, mixed into SFT",
    ),
    "consensus": ("apo.consensus", "stage 2: the SFT model writes the consensus trajectory t+ for each case"),
    "build-pairs": ("apo.pairs", "stage 3 data: groups {t+, teacher negatives} (+ pairwise DPO rows)"),
    "train": ("apo.trainer.cli", "stage 3: APO training (Plackett-Luce over t+ and the teachers)"),
    "eval-report": ("apo.evaluation.report", "report generation: predictions + NLG and clinical-efficacy metrics"),
    "eval-mscxrt": ("apo.evaluation.mscxrt", "MS-CXR-T temporal classification: Top-1 per finding and average"),
    "drift": (
        "apo.evaluation.drift",
        "teacher-drift analysis: agreement, side errors, hallucination, refusal, divergence",
    ),
    "audit": (
        "apo.audit",
        "pre-flight: per-stage lengths under the pixel budget, rows each stage would lose, memory per GPU (no weights)",
    ),
    "tables": ("apo.evaluation.tables", "the paper's tables (markdown + LaTeX) and training-curve plots from results"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apo", description="Autonomous Preference Optimization (learn -> compare -> critique)"
    )
    parser.add_argument("--log-level", default=os.environ.get("APO_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only == name:  # import only the module that will run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        parser = build_parser(command)  # defaults read from the environment (MAX_PIXELS, ...) may be wrong already
    except ApoError as e:
        print(f"apo{' ' + command if command else ''}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        rc = module.run(args)
        sys.stdout.flush()  # inside the try: a closed pipe raises here, not at exit past every handler
    except ApoError as e:  # the user's problem: one clear line, no traceback
        print(f"apo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"apo {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `apo ... | head`: the reader left; what was written is all it wanted, no traceback
        # Python's recipe: point stdout at devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe
    finally:
        from apo.io.jobs import release_all

        release_all()  # output locks (apo.io.jobs.claim) end with the command
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
