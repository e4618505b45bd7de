"""The seeded experiment (issue 4, item 8): SFT vs SFT + pairwise DPO (ms-swift, the published recipe) vs SFT + APO
(our trainer) on the synthetic CXR-MAX benchmark, with the same preference budget, over several seeds.

    .venv/bin/python scripts/experiment.py --seeds 0 1 2 --out results/experiment      # random tiny students
    .venv/bin/python scripts/experiment.py --config configs/experiment/pretrained.json  # issue 13: the base that sees

A config file holds settings frozen before the evaluation seeds run (chosen on a development seed); flags still win.

Per seed S (everything is a function of S: data, tiny model, every trainer), under OUT/seedS/:
  data/      apo synth                          the benchmark: 7 drifting teachers, ground-truth labels and sides
  base/      apo tiny-model                     random tiny Qwen2.5-VL (--base random, the default so far)
             or one shared base that sees       --base pretrained: `apo tiny-model --pretrain --seed
                                                --base-seed` in OUT/base-pretrained, built once, used by every seed
  sft/       scripts/SFT-Qwen2.5.sh             stage 1 on every teacher trajectory -> sft/merged = pi_st
  apo/       scripts/APO-Qwen2.5.sh             vote consensus -> groups + pairwise rows -> apo train (PL loss)
  dpo/       scripts/DPO-Qwen2.5.sh             ms-swift DPO on the pairwise rows of the same groups
  pairwise/  apo train --loss dpo               (optional arm) our trainer with DPO's pairwise loss
  apo_self_vote/, apo_model/                    (optional arms) APO on pi_st's self-vote / in-context t+ instead
                                                of the vote; positives.json scores each t+ against the truth
  eval/ARM/  apo eval-report                    greedy generation on the test split, labeler metrics vs truth
  teachers/  apo consensus + apo drift          the teachers (and the vote) on the same test split, for reference
Budget: one epoch over the same preference data and the same number of optimizer steps. APO sees 2 groups
{t+, ~6 teacher negatives} per step; DPO sees the same (t+, negative) comparisons as rows, B = round(2 x negatives /
groups) per step, so both see every comparison once, in ~the same number of steps, with the same LR schedule, LoRA,
beta and seed. Stages are resumable: a stage whose settings (and upstream settings) are unchanged is reused; a
changed one is redone together with everything downstream. OUT/experiment.json and OUT/EXPERIMENT.md aggregate
mean +- std over seeds and the paired differences (APO - SFT, APO - DPO, DPO - SFT, ...) pooled over all test cases
with 95 % bootstrap intervals over seeds and cases (apo.evaluation.paired), greedy and, with --num-samples K, over K
sampled answers per case; OUT/reading.md, if present, is copied into EXPERIMENT.md as the written reading.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# APO trained on other positives than the vote (issue 14: does the paper's "compare" stage matter?): arm -> strategy
POSITIVE_ARMS = {"apo_self_vote": "self-vote", "apo_model": "model"}
ARMS = ("base", "sft", "dpo", "apo", "pairwise", *POSITIVE_ARMS)
PAIRS = (
    ("apo", "sft"),
    ("apo", "dpo"),
    ("dpo", "sft"),
    ("apo", "pairwise"),
    ("sft", "base"),
    ("apo_self_vote", "apo"),
    ("apo_model", "apo"),
    ("apo_self_vote", "sft"),
    ("apo_model", "sft"),
)
# how the tables name an arm ("-" separates the two arms of a pair key, so arm names use "_")
ARM_LABELS = {"apo_self_vote": "APO (self-vote t⁺)", "apo_model": "APO (model t⁺)"}
# (key in metrics.json, label, better direction) of the table; drift-sensitive first.
METRICS = (
    ("drift.f1", "labeler F1", +1),
    ("drift.side_accuracy", "side acc.", +1),
    ("drift.hallucination_rate", "hallucination", -1),
    ("drift.omission_rate", "omission", -1),
    ("drift.hedge_rate", "hedge", -1),
    ("drift.refusal_rate", "refusal", -1),
    ("drift.mean_words", "words", 0),
    ("nlg.BLEU-1", "BLEU-1", +1),
    ("nlg.ROUGE-L", "ROUGE-L", +1),
    ("clinical.micro.f1", "CE F1 (vs report)", +1),
    ("diag.modal_opener", "modal opener", 0),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config",
        default=None,
        help="JSON file of frozen settings ({option dest: value}, e.g. configs/experiment/pretrained.json); it\n"
        "replaces the defaults below, flags given on the command line still win",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "results" / "experiment"))
    p.add_argument(
        "--arms",
        nargs="+",
        default=["sft", "dpo", "apo", "pairwise"],
        choices=ARMS,
        help="students evaluated (sft, dpo, apo always trained; pairwise = apo train --loss dpo, our\n"
        "trainer with DPO's loss on the same groups: separates the objective from the implementation;\n"
        "apo_self_vote / apo_model = APO on pi_st's self-vote / in-context consensus t+ instead of the vote)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="seeds run side by side; every process is single-threaded, so results do not depend on it",
    )
    p.add_argument(
        "--base",
        choices=["random", "pretrained"],
        default="random",
        help="random: each seed's own random tiny model (the runs in results/experiment); pretrained: one shared\n"
        "base that sees (apo tiny-model --pretrain), the student issue 13 asks the experiment to start from",
    )
    p.add_argument("--base-seed", type=int, default=0, help="seed of the shared pretrained base")
    p.add_argument("--base-dir", default=None, help="the shared pretrained base's folder (default OUT/base-pretrained)")
    g = p.add_argument_group("data")
    g.add_argument("--cases", type=int, default=240)
    g.add_argument("--test-fraction", type=float, default=0.25)
    g = p.add_argument_group("stage 1: SFT (ms-swift; LoRA + full embeddings/head: the tiny model is random)")
    g.add_argument("--sft-steps", type=int, default=1200)
    g.add_argument("--sft-lr", type=float, default=5e-3)
    g.add_argument("--sft-batch", type=int, default=8)
    g.add_argument("--sft-lora", type=int, nargs=2, default=[32, 64], metavar=("R", "ALPHA"))
    g.add_argument(
        "--sft-replay",
        type=int,
        nargs=3,
        default=[0, 0, 0],
        metavar=("DESCRIBE", "COMPARE", "ASK"),
        help="rehearsal rows of the shared base's own tasks mixed into every seed's SFT (`apo replay`, written once\n"
        "next to the base; --base pretrained only); 0 0 0: none",
    )
    g = p.add_argument_group("stage 3: the preference stage, shared by APO and DPO")
    g.add_argument("--negatives", choices=["all", "conflicting"], default="all")
    g.add_argument("--pref-lr", type=float, default=2e-3, help="APO and DPO learning rate (cosine, 5%% warmup)")
    g.add_argument("--dpo-lr", type=float, default=None, help="DPO's own learning rate (default: --pref-lr)")
    g.add_argument(
        "--pairwise-lr",
        type=float,
        default=None,
        help="the pairwise arm's own learning rate (default: --pref-lr, APO's)",
    )
    g.add_argument("--beta", type=float, default=0.5)
    g.add_argument(
        "--sft-weight",
        type=float,
        default=0.0,
        help="NLL on t+ beside the preference loss: APO --sft_weight, ms-swift DPO --rpo_alpha",
    )
    g.add_argument("--epochs", type=float, default=1.0, help="epochs over the groups / pairs (same for both)")
    g.add_argument("--groups-per-step", type=int, default=2)
    g.add_argument("--pref-lora", type=int, nargs=2, default=[8, 32], metavar=("R", "ALPHA"))
    g.add_argument(
        "--self-vote-samples",
        type=int,
        default=4,
        help="apo_self_vote: pi_st's samples per training case (temperature 1, seeded by the seed)",
    )
    g.add_argument(
        "--consensus-max-length",
        type=int,
        default=2048,
        help="apo_model: token budget of pi_st's consensus prompt (image + question + every trajectory + answer)",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--max-new-tokens", type=int, default=160)
    g.add_argument(
        "--num-samples",
        type=int,
        default=0,
        help="sampled answers per test case besides the greedy one (seeded by the seed; 0 = greedy only)",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --num-samples")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the paired intervals")
    g.add_argument("--eval-limit", type=int, default=None, help="first N test cases only")
    g.add_argument("--report-only", action="store_true", help="aggregate what is there; run nothing")
    first, _ = p.parse_known_args(argv)
    if first.config:
        p.set_defaults(**load_config(p, first.config))
    args = p.parse_args(argv)
    if min(args.sft_replay) < 0:
        p.error(f"--sft-replay: counts must not be negative ({args.sft_replay})")
    if any(args.sft_replay) and args.base != "pretrained":
        p.error("--sft-replay: needs --base pretrained (the rows are the pretrained base's own tasks)")
    return args


def load_config(parser, path) -> dict:
    """The settings of a config file, checked against the parser: an unknown key or a value of the wrong type stops
    the run with one line naming the file and the key."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        parser.error(f"--config {path}: {e}")
    if not isinstance(cfg, dict):
        parser.error(f"--config {path}: expected a JSON object of settings")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "report_only")}
    out = {}
    for key, value in cfg.items():
        if key.startswith("_"):  # "_comment" and the like
            continue
        if key not in actions:
            parser.error(f"--config {path}: unknown setting {key!r} (known: {', '.join(sorted(actions))})")
        out[key] = _config_value(parser, path, key, value, actions[key])
    return out


def _config_value(parser, path, key, value, act):
    """One config value as argparse would have parsed it from the command line, or one error line."""

    def bad(why):
        parser.error(f"--config {path}: {key}: {value!r} {why}")

    many = act.nargs not in (None, "?")
    if many and not isinstance(value, list):
        value = [value]  # "seeds": 3 means [3]
    if not many and isinstance(value, list):
        bad("is a list; expected one value")
    values = value if many else [value]
    if isinstance(act.nargs, int) and len(values) != act.nargs:
        bad(f"has {len(values)} values; expected {act.nargs}")
    if act.nargs == "+" and not values:
        bad("is empty")
    conv = []
    for v in values:
        if isinstance(v, bool) or v is None:  # JSON true/null are never a number, a path or a choice
            bad("is not a valid value")
        if act.type is int and not (isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())):
            bad("is not a valid int")
        try:
            conv.append(act.type(v) if act.type else v)
        except (TypeError, ValueError):
            bad(f"is not a valid {act.type.__name__}")
    if act.choices is not None and any(v not in act.choices for v in conv):
        bad(f"not among {list(act.choices)}")
    if key in ("out", "base_dir"):  # a committed config names folders of the repository
        conv = [str(ROOT / v) for v in conv]
    return conv if many else conv[0]


# ---------------------------------------------------------------- running stages


def run_env(extra=None):
    """The environment every command runs in: offline, single-threaded, the project's venv first."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        MODELSCOPE_OFFLINE="1",
        USE_HF="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}",
    )
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


class Seed:
    """One seed's run folder, its stages (each cached by a fingerprint of its settings) and their wall times."""

    def __init__(self, args, seed: int):
        self.args, self.seed = args, seed
        self.dir = Path(args.out).resolve() / f"seed{seed}"
        self.marks = self.dir / ".stages"
        self.logs = self.dir / "logs"
        self.keys: dict[str, str] = {}
        self.times: dict[str, float] = {}
        self.ran: list[str] = []

    def stage(self, name: str, outputs: list[Path], cmd: list[str], env=None, after=()):
        """Run `cmd` unless a finished run with the same settings (and the same upstream stages) is recorded."""
        settings = {
            "cmd": [str(c).replace(str(self.dir), "$SEED_DIR") for c in cmd],
            "env": {k: str(v).replace(str(self.dir), "$SEED_DIR") for k, v in sorted((env or {}).items())},
            "after": [self.keys[a] for a in after],
        }
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.keys[name] = key
        mark = self.marks / f"{name}.json"
        if mark.is_file():
            done = json.loads(mark.read_text())
            if done.get("key") == key and all(o.exists() for o in outputs):
                self.times[name] = done.get("seconds", 0.0)
                return
            say(f"seed {self.seed}: {name}: settings changed, redoing it")
        for o in outputs:  # a stale or half-written output is never mixed with a new run
            shutil.rmtree(o, ignore_errors=True) if o.is_dir() else o.unlink(missing_ok=True)
        mark.unlink(missing_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.marks.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        say(f"seed {self.seed}: {name} ...")
        t0 = time.time()
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(map(str, cmd)) + "\n" + "".join(f"  {k}={v}\n" for k, v in (env or {}).items()))
            fh.flush()
            rc = subprocess.run(
                [str(c) for c in cmd], cwd=ROOT, env=run_env(env), stdout=fh, stderr=subprocess.STDOUT
            ).returncode
        seconds = round(time.time() - t0, 1)
        if rc != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
            raise SystemExit(f"seed {self.seed}: {name} failed (exit {rc}); log {log}:\n{tail}")
        missing = [str(o) for o in outputs if not o.exists()]
        if missing:
            raise SystemExit(f"seed {self.seed}: {name} finished but did not write {missing}; log {log}")
        mark.write_text(json.dumps({"key": key, "settings": settings, "seconds": seconds}, indent=1))
        self.times[name] = seconds
        self.ran.append(name)
        say(f"seed {self.seed}: {name} done in {seconds:.0f} s")

    def run(self):
        a, s, d = self.args, self.seed, self.dir
        data, base, sft = d / "data", d / "base", d / "sft"
        train, test = data / "cxrmax_train.jsonl", data / "cxrmax_test.jsonl"
        self.stage(
            "synth",
            [data],
            ["apo", "synth", "--out", data, "--cases", a.cases, "--seed", s, "--test-fraction", a.test_fraction],
        )
        if a.base == "pretrained":
            # one base for every seed, built once by main(); this stage only checks it is there, and its key carries
            # the weights' digest, so a changed base redoes everything downstream
            base = shared_base(a)
            check = ["test", "-f", base / "pretraining.json"]
            self.stage("tiny", [], check, env={"BASE_WEIGHTS_SHA256": base_digest(base)})
        else:
            self.stage("tiny", [base], ["apo", "tiny-model", "--out", base, "--seed", s])
        self.stage(
            "prepare_sft",
            [d / "sft.jsonl"],
            ["apo", "prepare-sft", "--dataset", train, "--out", d / "sft.jsonl"],
            after=["synth"],
        )
        sft_data = str(d / "sft.jsonl")
        if any(a.sft_replay):  # the shared rows (built once by main()); the path carries their counts
            sft_data += f" {replay_rows(a)}"
        # The tiny model is random: LoRA alone cannot give it a vocabulary, so embeddings and head train in full.
        self.stage(
            "sft",
            [sft],
            ["bash", ROOT / "scripts" / "SFT-Qwen2.5.sh"],
            after=["tiny", "prepare_sft"],
            env=dict(
                MODEL=base,
                DATASET=sft_data,
                OUTPUT_DIR=sft,
                TORCH_DTYPE="float32",
                BATCH_SIZE=a.sft_batch,
                GRAD_ACC=1,
                LEARNING_RATE=a.sft_lr,
                LORA_RANK=a.sft_lora[0],
                LORA_ALPHA=a.sft_lora[1],
                MODULES_TO_SAVE="embed_tokens lm_head",
                MAX_STEPS=a.sft_steps,
                SAVE_STEPS=a.sft_steps,
                LOGGING_STEPS=20,
                MAX_LENGTH=1024,
                WARMUP_RATIO=0.05,
                GRADIENT_CHECKPOINTING="false",
                DATALOADER_WORKERS=0,
                REPORT_TO="none",
                MERGE_LORA="true",
                SEED=s,
            ),
        )
        pi_st = sft / "merged"
        # Shared preference settings: same LoRA, LR schedule, beta, NLL weight, epochs, seed for APO and DPO.
        lr_dpo = arm_lrs(a)[1]
        common = [
            "--num_train_epochs",
            a.epochs,
            "--max_steps",
            -1,
            "--per_device_train_batch_size",
            a.groups_per_step,
            "--gradient_accumulation_steps",
            1,
            "--learning_rate",
            a.pref_lr,
            "--lr_scheduler_type",
            "cosine",
            "--warmup_steps",
            0.05,
            "--beta",
            a.beta,
            "--sft_weight",
            a.sft_weight,
            "--lora_r",
            a.pref_lora[0],
            "--lora_alpha",
            a.pref_lora[1],
            "--lora_dropout",
            0.05,
            "--max_length",
            1024,
            "--logging_steps",
            5,
            "--seed",
            s,
            "--merge_on_save",
            "false",
        ]
        apo_dir = d / "apo"

        def apo_stage(name: str, strategy: str, **extra):
            """Consensus (`strategy`) -> groups -> APO training in d/name, with the shared settings above."""
            env = dict(
                MODEL=pi_st,
                SFT_ADAPTER="",
                DATASET=train,
                WORK_DIR=d / name,
                STRATEGY=strategy,
                NEGATIVES=a.negatives,
                DEEPSPEED="",
                CONFIG=ROOT / "configs" / "apo" / "demo.yaml",
                **extra,
            )
            self.stage(name, [d / name], ["bash", ROOT / "scripts" / "APO-Qwen2.5.sh", *common], after=["sft"], env=env)

        apo_stage("apo", "vote")
        stats = json.loads((apo_dir / "groups.jsonl.stats.json").read_text())
        groups, negs = stats["groups"], stats["negatives"]
        pairs_per_step = max(1, round(a.groups_per_step * negs / groups))
        dpo_extra = ["--lr_scheduler_type", "cosine", "--lora_dropout", "0.05"]
        if a.sft_weight > 0:
            dpo_extra += ["--rpo_alpha", a.sft_weight]
        self.stage(
            "dpo",
            [d / "dpo"],
            ["bash", ROOT / "scripts" / "DPO-Qwen2.5.sh", *dpo_extra],
            after=["apo"],
            env=dict(
                MODEL=pi_st,
                DATASET=apo_dir / "dpo_pairs.jsonl",
                OUTPUT_DIR=d / "dpo",
                NPROC_PER_NODE=1,
                DEEPSPEED="",
                TORCH_DTYPE="float32",
                BATCH_SIZE=pairs_per_step,
                GRAD_ACC=1,
                LEARNING_RATE=lr_dpo,
                BETA=a.beta,
                NUM_TRAIN_EPOCHS=a.epochs,
                LORA_RANK=a.pref_lora[0],
                LORA_ALPHA=a.pref_lora[1],
                MAX_STEPS=-1,
                SAVE_STEPS=100000,
                LOGGING_STEPS=5,
                MAX_LENGTH=1024,
                DATALOADER_WORKERS=0,
                REPORT_TO="none",
                SEED=s,
            ),
        )
        if "pairwise" in a.arms:
            self.stage(
                "pairwise",
                [d / "pairwise"],
                [
                    "apo",
                    "train",
                    "--config",
                    ROOT / "configs" / "apo" / "demo.yaml",
                    "--model_name_or_path",
                    pi_st,
                    "--groups_file",
                    apo_dir / "groups.jsonl",
                    "--output_dir",
                    d / "pairwise",
                    "--loss",
                    "dpo",
                    *common,
                    # given only when it differs, so the stage key of earlier runs stays the same (last flag wins)
                    *(["--learning_rate", a.pairwise_lr] if a.pairwise_lr is not None else []),
                ],
                after=["apo"],
            )
        positives = {"vote": apo_dir / "consensus.jsonl"}
        for arm, strategy in POSITIVE_ARMS.items():
            if arm not in a.arms:
                continue
            # the same preference stage as "apo" (settings, groups per step, epochs, seed); only t+ differs. Each
            # strategy gets only the settings it reads, so changing one does not redo the other.
            own = (
                dict(SELF_VOTE_SAMPLES=a.self_vote_samples, SELF_VOTE_SEED=s)
                if strategy == "self-vote"
                else dict(CONSENSUS_MAX_LENGTH=a.consensus_max_length)
            )
            apo_stage(arm, strategy, CONSENSUS_MAX_NEW_TOKENS=a.max_new_tokens, CONSENSUS_BATCH=16, **own)
            positives[strategy] = d / arm / "consensus.jsonl"
        if len(positives) > 1:  # each t+ scored against the truth on the training cases
            self.stage(
                "positives",
                [d / "positives.json"],
                [
                    "python",  # the project's venv (run_env puts it first on PATH), like every other stage
                    ROOT / "scripts" / "consensus_quality.py",
                    "--dataset",
                    train,
                    "--out",
                    d / "positives.json",
                    "--consensus",
                    *[f"{k}={v}" for k, v in positives.items()],
                ],
                after=["apo", *[arm for arm in POSITIVE_ARMS if arm in a.arms]],
            )
        models = {
            "base": (base, None),
            "sft": (pi_st, None),
            "dpo": (pi_st, d / "dpo" / "last"),
            "apo": (pi_st, apo_dir / "model"),
            "pairwise": (pi_st, d / "pairwise"),
            **{arm: (pi_st, d / arm / "model") for arm in POSITIVE_ARMS},
        }
        for arm in a.arms:
            model, adapter = models[arm]
            cmd = [
                "apo",
                "eval-report",
                "--model",
                model,
                "--dataset",
                test,
                "--out",
                d / "eval" / arm,
                "--max-new-tokens",
                a.max_new_tokens,
                "--batch-size",
                16,
            ]
            cmd += ["--adapter", adapter] if adapter else []
            cmd += ["--limit", a.eval_limit] if a.eval_limit else []
            if a.num_samples:  # absent when 0: the greedy-only stages keep their keys (and resume)
                cmd += ["--num-samples", a.num_samples, "--temperature", a.temperature, "--seed", s]
            self.stage(f"eval_{arm}", [d / "eval" / arm], cmd, after=[{"base": "tiny", "sft": "sft"}.get(arm, arm)])
        # The teachers and the vote consensus scored on the same test split (what "inheriting drift" is measured
        # against).
        self.stage(
            "teachers",
            [d / "teachers"],
            [
                "bash",
                "-c",
                'apo consensus --strategy vote --dataset "$1" --out "$2/consensus.jsonl" && '
                'apo drift --dataset "$1" --consensus "$2/consensus.jsonl" --out "$2"',
                "_",
                test,
                d / "teachers",
            ],
            after=["synth"],
        )
        (d / "timings.json").write_text(json.dumps(self.times, indent=1))
        return self.collect(groups, negs, pairs_per_step)

    def collect(self, groups=None, negs=None, pairs_per_step=None) -> dict:
        d = self.dir
        out = {"seed": self.seed, "arms": {}, "teachers": {}, "timings_s": self.times}
        opener, teacher, share = modal_opener(d / "data" / "cxrmax_train.jsonl")
        out["modal_opener"] = {"sentence": opener, "teacher": teacher, "train_share": share}
        for arm in ARMS:
            f = d / "eval" / arm / "metrics.json"
            if f.is_file():
                out["arms"][arm] = flat(json.loads(f.read_text()))
                preds = [
                    json.loads(x)["prediction"]
                    for x in (d / "eval" / arm / "predictions.jsonl").read_text().splitlines()
                    if x.strip()
                ]
                out["arms"][arm]["diag.modal_opener"] = (
                    (sum(first_sentence(p) == opener for p in preds) / len(preds)) if preds and opener else None
                )
        out["case_counts"] = case_counts_of(d)
        f = d / "teachers" / "drift.json"
        if f.is_file():
            for name, st in json.loads(f.read_text())["per_teacher"].items():
                st = dict(st, side_accuracy=None if st.get("side_error_rate") is None else 1 - st["side_error_rate"])
                out["teachers"][name] = {f"drift.{k}": v for k, v in st.items() if isinstance(v, (int, float))}
        out["curves"] = {
            "apo": curve(d / "apo" / "model" / "trainer_state.json"),
            "dpo": curve(d / "dpo" / "logging.jsonl"),
            "sft": curve(d / "sft" / "logging.jsonl"),
        }
        if (d / "pairwise" / "trainer_state.json").is_file():
            out["curves"]["pairwise"] = curve(d / "pairwise" / "trainer_state.json")
        positive_arms = [arm for arm in POSITIVE_ARMS if arm in self.args.arms]  # never an earlier run's leftovers
        for arm in positive_arms:
            if (d / arm / "model" / "trainer_state.json").is_file():
                out["curves"][arm] = curve(d / arm / "model" / "trainer_state.json")
        if positive_arms and (d / "positives.json").is_file():
            out["positives"] = json.loads((d / "positives.json").read_text())
        st = d / "apo" / "groups.jsonl.stats.json"
        if groups is None and st.is_file():
            s = json.loads(st.read_text())
            groups, negs = s["groups"], s["negatives"]
            pairs_per_step = max(1, round(self.args.groups_per_step * negs / groups))
        out["budget"] = {
            "groups": groups,
            "comparisons": negs,
            "groups_per_step": self.args.groups_per_step,
            "pairs_per_step": pairs_per_step,
            "apo_steps": out["curves"]["apo"].get("steps"),
            "dpo_steps": out["curves"]["dpo"].get("steps"),
        }
        for arm in positive_arms:  # their own groups, from their own t+ (no negative is the t+ teacher's)
            st = d / arm / "groups.jsonl.stats.json"
            if st.is_file():
                s = json.loads(st.read_text())
                out["budget"][arm] = {"groups": s["groups"], "comparisons": s["negatives"]}
        return out


def case_counts_of(seed_dir: Path) -> dict:
    """{arm: {"greedy": {case_id: counts}, "sampled": {case_id: counts} (K samples pooled)}} of every evaluated arm:
    what the paired bootstrap resamples (apo.evaluation.paired)."""
    sys.path.insert(0, str(ROOT))
    from apo.data import load_cases
    from apo.evaluation.paired import case_counts

    test = seed_dir / "data" / "cxrmax_test.jsonl"
    if not test.is_file():
        return {}
    cases = {c.case_id: c for c in load_cases(test)}
    out = {}
    for arm in ARMS:
        folder = seed_dir / "eval" / arm
        if not (folder / "metrics.json").is_file():
            continue
        out[arm] = {}
        for mode, file, field in (
            ("greedy", "predictions.jsonl", "prediction"),
            ("sampled", "samples.jsonl", "samples"),
        ):
            f = folder / file
            if not f.is_file():
                continue
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            out[arm][mode] = {
                r["case_id"]: case_counts(cases[r["case_id"]], [r[field]] if mode == "greedy" else r[field])
                for r in rows
                if r["case_id"] in cases
            }
    return out


def shared_base(args) -> Path:
    return Path(args.base_dir or Path(args.out) / "base-pretrained").resolve()


def base_digest(folder: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from apo.world.pretrain import weights_digest

    return weights_digest(folder)


def build_shared_base(args) -> None:
    """Pretrain (or reuse: the pretraining is cached by its identity) the base every seed starts from."""
    folder = shared_base(args)
    say(f"shared base: apo tiny-model --pretrain --seed {args.base_seed} -> {folder}")
    cmd = ["apo", "tiny-model", "--pretrain", "--out", str(folder), "--seed", str(args.base_seed)]
    # the stages' environment, but torch's own thread count as when the demo builds a base (threads change the bits)
    env = {k: v for k, v in run_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") or k in os.environ}
    env.update({k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ})
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        raise SystemExit(f"shared base: `{' '.join(cmd)}` failed")


def replay_rows(args) -> Path:
    """The shared rehearsal rows' file: one folder per base and count triple, next to the shared base."""
    base = shared_base(args)
    return base.parent / (f"{base.name}-replay-" + "-".join(map(str, args.sft_replay))) / "replay.jsonl"


def build_replay(args) -> None:
    """Write (or reuse: `apo replay` keeps rows of the same base and counts) the rows every seed's SFT mixes in."""
    folder = replay_rows(args).parent
    n_describe, n_compare, n_ask = args.sft_replay
    cmd = ["apo", "replay", "--base", str(shared_base(args)), "--out", str(folder)]
    cmd += ["--describe", str(n_describe), "--compare", str(n_compare), "--ask", str(n_ask)]
    say(f"replay rows: {' '.join(cmd)}")
    if subprocess.run(cmd, cwd=ROOT, env=run_env()).returncode != 0:
        raise SystemExit(f"replay rows: `{' '.join(cmd)}` failed")


def first_sentence(text: str) -> str:
    return text.strip().split(".")[0].strip()


def modal_opener(train: Path):
    """The most frequent first sentence of the training answers, its (main) teacher and its share: greedy decoding
    of an SFT student tends to collapse onto it, and with it onto that teacher's style."""
    if not train.is_file():
        return None, None, None
    from collections import Counter

    firsts, by = Counter(), {}
    rows = [json.loads(x) for x in train.read_text().splitlines() if x.strip()]
    for r in rows:
        f = first_sentence(r.get("response", ""))
        firsts[f] += 1
        by.setdefault(f, Counter())[r.get("model")] += 1
    top, n = firsts.most_common(1)[0]
    return top, by[top].most_common(1)[0][0], round(n / len(rows), 4)


def flat(m: dict, prefix="") -> dict:
    out = {}
    for k, v in m.items():
        if isinstance(v, dict) and k not in ("per_observation", "label_distribution", "counts"):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def curve(path: Path) -> dict:
    """First/last fifth of the training log: loss, reward margin, pairwise/ranking accuracy, steps."""
    if not path.is_file():
        return {}
    if path.suffix == ".jsonl":
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        steps = max(
            (int(str(r["global_step/max_steps"]).split("/")[1]) for r in rows if "global_step/max_steps" in r),
            default=None,
        )
    else:
        state = json.loads(path.read_text())
        rows, steps = state["log_history"], state.get("global_step")
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    k = max(1, len(rows) // 5)

    def avg(part, key):
        xs = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "steps": steps,
        **{
            f"{key.split('/')[-1]}_{w}": avg(part, key)
            for w, part in (("first", rows[:k]), ("last", rows[-k:]))
            for key in ("loss", "rewards/margins", "rewards/accuracies")
        },
    }


def say(msg):
    sys.stdout.write(f"[experiment {time.strftime('%H:%M:%S')}] {msg}\n")  # one write: seeds run in threads
    sys.stdout.flush()


# ---------------------------------------------------------------- aggregation and the report


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def bootstrap_pairs(per_seed: list[dict], arms, n_boot: int) -> dict:
    """{"greedy"|"sampled": {"apo-sft": {rate: {diff, low, high, better_share, ...}}}}: paired differences with 95 %
    bootstrap intervals over seeds and cases (apo.evaluation.paired), on the cases both arms answered in every seed."""
    sys.path.insert(0, str(ROOT))
    from apo.evaluation.paired import paired_bootstrap

    out = {}
    for mode in ("greedy", "sampled"):
        for a, b in PAIRS:
            if a not in arms or b not in arms:
                continue
            xs, ys = [], []
            for s in per_seed:
                ca = s.get("case_counts", {}).get(a, {}).get(mode)
                cb = s.get("case_counts", {}).get(b, {}).get(mode)
                if not ca or not cb:
                    continue
                ids = sorted(set(ca) & set(cb))
                xs.append([ca[i] for i in ids])
                ys.append([cb[i] for i in ids])
            if xs and all(xs):
                out.setdefault(mode, {})[f"{a}-{b}"] = paired_bootstrap(xs, ys, n_boot=n_boot, seed=0)
    return out


def aggregate(per_seed: list[dict], arms, n_boot: int = 2000) -> dict:
    agg = {"arms": {}, "paired": {}, "teachers": {}}
    for arm in arms:
        rows = [s["arms"].get(arm) for s in per_seed if s["arms"].get(arm)]
        agg["arms"][arm] = {
            key: dict(zip(("mean", "std"), mean_std([r.get(key) for r in rows])), values=[r.get(key) for r in rows])
            for key, _, _ in METRICS + (("drift.side_n", "", 0),)
        }
    for a, b in PAIRS:
        if a not in arms or b not in arms:
            continue
        agg["paired"][f"{a}-{b}"] = {}
        for key, _, better in METRICS:
            diffs = [
                s["arms"][a].get(key) - s["arms"][b].get(key)
                for s in per_seed
                if a in s["arms"]
                and b in s["arms"]
                and s["arms"][a].get(key) is not None
                and s["arms"][b].get(key) is not None
            ]
            m, sd = mean_std(diffs)
            wins = sum((x * better) > 0 for x in diffs) if better else None
            agg["paired"][f"{a}-{b}"][key] = {"mean": m, "std": sd, "diffs": diffs, "wins": wins, "n": len(diffs)}
    agg["bootstrap"] = bootstrap_pairs(per_seed, arms, n_boot)
    pos = [s["positives"] for s in per_seed if s.get("positives")]
    if pos:
        strategies = sorted({k for p in pos for k, v in p.items() if isinstance(v, dict)})
        agg["positives"] = {
            "strategies": {
                name: {
                    k: mean_std([p[name].get(k) for p in pos if name in p])[0]
                    for k in sorted(
                        {k for p in pos if name in p for k, v in p[name].items() if isinstance(v, (int, float))}
                    )
                }
                for name in strategies
            },
            "best_teacher_exact": mean_std([p.get("best_teacher_exact") for p in pos])[0],
            "n_seeds": len(pos),
        }
    names = sorted({t for s in per_seed for t in s["teachers"]})
    for t in names:
        rows = [s["teachers"][t] for s in per_seed if t in s["teachers"]]
        agg["teachers"][t] = {key: mean_std([r.get(key) for r in rows])[0] for key, _, _ in METRICS}
    return agg


def fmt(m, sd=None, signed=False):
    if m is None:
        return "–"
    s = f"{m:+.3f}" if signed else (f"{m:.1f}" if abs(m) >= 10 else f"{m:.3f}")
    return s if sd is None else s + (f" ± {sd:.1f}" if abs(m) >= 10 else f" ± {sd:.3f}")


def main_table(agg, arms, base: str = "random") -> str:
    head = (
        "| student | "
        + " | ".join(f"{lab} {'↑' if b > 0 else '↓' if b < 0 else ''}".strip() for _, lab, b in METRICS)
        + " |"
    )
    lines = [head, "|---|" + "---:|" * len(METRICS)]
    names = {
        "base": f"base ({'shared, pretrained' if base == 'pretrained' else 'random'}, reference)",
        "sft": "SFT",
        "dpo": "SFT + DPO (ms-swift)",
        "apo": "SFT + APO",
        "pairwise": "SFT + pairwise loss (apo train --loss dpo)",
        **{arm: f"SFT + {label}" for arm, label in ARM_LABELS.items()},
    }
    for arm in arms:
        a = agg["arms"][arm]
        lines.append(f"| {names[arm]} | " + " | ".join(fmt(a[k]["mean"], a[k]["std"]) for k, _, _ in METRICS) + " |")
    return "\n".join(lines)


def pair_label(pair: str) -> str:
    """A pair key as the tables print it: "apo_model-apo" -> "APO (model t⁺) − APO"."""
    return " − ".join(ARM_LABELS.get(arm, arm.upper()) for arm in pair.split("-"))


def positives_table(agg) -> str:
    """Each strategy's t+ against the truth on the training cases, mean over seeds."""
    pos = agg.get("positives") or {}
    keys = ("exact", "exact_findings", "f1", "hallucination", "omission", "wrong_side", "refusal")
    lines = ["| t⁺ strategy | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, row in pos.get("strategies", {}).items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(k)) for k in keys) + " |")
    best = pos.get("best_teacher_exact")
    return "\n".join(lines) + (
        f"\n\nMean over {pos.get('n_seeds')} seeds. Best single teacher's exact on the same cases: {fmt(best)}."
    )


def paired_table(agg) -> str:
    lines = ["| difference | " + " | ".join(lab for _, lab, _ in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for pair, row in agg["paired"].items():
        cells = []
        for k, _, better in METRICS:
            r = row[k]
            cell = fmt(r["mean"], r["std"], signed=True) if r["mean"] is not None else "–"
            if better and r["n"] and any(r["diffs"]):
                cell += f" ({r['wins']}/{r['n']})"
            cells.append(cell)
        lines.append(f"| {pair_label(pair)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bootstrap_table(agg, mode: str) -> str:
    """Paired differences pooled over every case of every seed, with 95 % bootstrap intervals over seeds and cases."""
    sys.path.insert(0, str(ROOT))
    from apo.evaluation.paired import RATES

    rows = agg.get("bootstrap", {}).get(mode)
    if not rows:
        return f"({mode}: no per-case answers to resample)"
    arrows = {+1: "↑", -1: "↓"}
    lines = [
        "| difference | seeds / cases | " + " | ".join(f"{r} {arrows[RATES[r][1]]}" for r in RATES) + " |",
        "|---|---:|" + "---:|" * len(RATES),
    ]
    for pair, row in rows.items():
        n = next((x for x in row.values() if x), {})
        cells = [f"{n.get('n_seeds', '?')} / {n.get('n_cases', '?')}"]
        for r in RATES:
            x = row.get(r)
            if x is None:
                cells.append("–")
                continue
            star = "**" if x["low"] > 0 or x["high"] < 0 else ""  # the interval excludes 0
            cells.append(f"{star}{x['diff']:+.3f}{star} [{x['low']:+.3f}, {x['high']:+.3f}]")
        lines.append(f"| {pair_label(pair)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nBold: the 95 % interval excludes 0 (one interval per cell, no correction for the many cells: read a"
        " pattern across rates and modes, not a single bold number). Resampling seeds and then cases is the"
        " conservative choice: the seed level already carries case noise."
    )


def teacher_table(agg) -> str:
    keys = [m for m in METRICS if m[0].startswith("drift.")]
    lines = ["| source (test split) | " + " | ".join(lab for _, lab, _ in keys) + " |", "|---|" + "---:|" * len(keys)]
    for t, row in agg["teachers"].items():
        lines.append(f"| {t} | " + " | ".join(fmt(row[k]) for k, _, _ in keys) + " |")
    return "\n".join(lines)


def per_seed_table(per_seed, arms) -> str:
    keys = METRICS[:6]
    lines = [
        "| seed | student | " + " | ".join(lab for _, lab, _ in keys) + " | side n | train loss first→last | "
        "margin first→last | steps |",
        "|---|---|" + "---:|" * (len(keys) + 4),
    ]
    for s in per_seed:
        for arm in arms:
            r, c = s["arms"].get(arm, {}), s["curves"].get(arm, {})
            trained = (
                f"{fmt(c.get('loss_first'))}→{fmt(c.get('loss_last'))} | "
                f"{fmt(c.get('margins_first'))}→{fmt(c.get('margins_last'))} | {c.get('steps')}"
                if c
                else " | | "
            )
            lines.append(
                f"| {s['seed']} | {arm} | "
                + " | ".join(fmt(r.get(k)) for k, _, _ in keys)
                + f" | {r.get('drift.side_n', '–')} | {trained} |"
            )
    return "\n".join(lines) + (
        "\n\nLosses and margins: means over the first and last fifth of the logged steps "
        "(APO: Plackett-Luce over 1 + ~6; DPO and pairwise: sigmoid per pair, ln 2 at start)."
    )


def _invocation_rows(out: Path) -> list[dict]:
    f = out / "invocations.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def invocations(out: Path) -> str:
    rows = _invocation_rows(out)
    return (
        "\n".join(
            f"- {r['at']}: `{' '.join(map(str, r['argv']))}`: {r['wall_s']:.0f} s, jobs {r['jobs']}, ran "
            + "; ".join(f"{k}: {', '.join(v) or 'nothing'}" for k, v in r["stages_run"].items())
            for r in rows
        )
        or "- (none recorded)"
    )


def arm_lrs(args) -> tuple[float, float, float]:
    """(APO, DPO, pairwise) learning rates: --dpo-lr and --pairwise-lr default to --pref-lr."""
    apo = args.pref_lr
    return (
        apo,
        args.dpo_lr if args.dpo_lr is not None else apo,
        args.pairwise_lr if args.pairwise_lr is not None else apo,
    )


def lr_note(args) -> str:
    apo, dpo, pairwise = arm_lrs(args)
    if apo == dpo == pairwise:
        return f"the same, {apo:g}"
    return f"each arm its own, chosen on the development seed (APO {apo:g}, DPO {dpo:g}, pairwise {pairwise:g})"


def positives_note(args) -> str:
    """How the positive-strategy arms' t+ were written (empty when none ran)."""
    parts = []
    if "apo_self_vote" in args.arms:
        parts.append(f"apo_self_vote: `--strategy self-vote`, {args.self_vote_samples} samples of π_st per case at T 1")
    if "apo_model" in args.arms:
        parts.append(f"apo_model: `--strategy model`, π_st reads the answers in {args.consensus_max_length} tokens")
    return f" ({'; '.join(parts)}; same settings, groups per step and epochs)" if parts else ""


def shown(path) -> str:
    """A path as the report prints it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def rerun_command(args) -> str:
    """The command that reruns this experiment: the invocation's own flags (a config's overrides included)."""
    if args.argv is not None:
        argv = [a for a in args.argv if a != "--report-only"]
        return " ".join([".venv/bin/python scripts/experiment.py", *argv])
    return f".venv/bin/python scripts/experiment.py --seeds {' '.join(map(str, args.seeds))} --out {args.out}"


def frozen_claim(args) -> bool:
    """True when the run is exactly its config (no overrides) and the development seed 0 is not among its seeds."""
    plain = args.argv is not None and [a for a in args.argv if a != "--report-only"] == ["--config", args.config]
    return bool(args.config) and plain and 0 not in args.seeds


def write_report(args, per_seed, agg, wall_s, out: Path):
    arms = [a for a in args.arms if a in agg["arms"]]
    b0 = per_seed[0]["budget"]
    t = {k: round(sum(s["timings_s"].get(k, 0) for s in per_seed), 1) for k in per_seed[0]["timings_s"]}
    reading = out / "reading.md"
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "report_only", "jobs", "config", "argv")}
    md = f"""# Seeded experiment: SFT vs SFT + DPO vs SFT + APO on the synthetic benchmark

Mean ± sample std over seeds {", ".join(map(str, args.seeds))} (n = {len(per_seed)}); each seed draws its own data, {
        "training order, and starts from one shared pretrained base"
        if args.base == "pretrained"
        else "tiny model and training order"
    }. Test split: {per_seed[0]["arms"].get("sft", {}).get("n", "?")} cases per seed, greedy decoding, scored by
`apo eval-report` (labeler vs the ground-truth labels; side accuracy only over findings whose side the answer states).

```
{rerun_command(args)}
```
({"the config file" if args.config else "defaults: `--arms " + " ".join(args.arms) + " --jobs 2`"} and the
settings below; rerunning reuses every finished stage.)

## Result

{main_table(agg, arms, args.base)}

*modal opener*: share of answers that begin with the most frequent first sentence of the training answers
({
        "; ".join(
            dict.fromkeys(
                f"“{s['modal_opener']['sentence']}.”, {s['modal_opener']['teacher']}, "
                f"{100 * s['modal_opener']['train_share']:.0f}% of training answers"
                for s in per_seed
                if (s.get("modal_opener") or {}).get("sentence")
            )
        )
    }):
how far greedy decoding collapses onto one teacher's style. Directions: ↑ / ↓ = higher / lower is better.

Paired differences (same seed, same data, same π_st), mean ± std over seeds; (k/n) = seeds where the first is better:

{paired_table(agg)}

### Paired differences with 95 % bootstrap intervals (over seeds, then cases within each seed)

Rates pooled over all test cases of all seeds (a ratio of sums, as each metric is defined); each bootstrap draw
resamples the seeds, then the cases of each drawn seed, and scores both students on the same draw. Greedy answers:

{bootstrap_table(agg, "greedy")}

{
        f"Sampled answers ({args.num_samples} per case at temperature {args.temperature}, pooled per case):"
        + chr(10) * 2
        + bootstrap_table(agg, "sampled")
        + chr(10)
        if agg.get("bootstrap", {}).get("sampled")
        else ""
    }
{
        "The positives t⁺ of the APO arms, scored against the truth on each seed's training cases"
        " (`scripts/consensus_quality.py`), mean over seeds:" + chr(10) * 2 + positives_table(agg) + chr(10)
        if agg.get("positives")
        else ""
    }
The teachers (and the vote consensus, APO's t⁺) scored the same way on the same test splits, mean over seeds:

{teacher_table(agg)}

## Budget (the same for APO and DPO)

One epoch over the same preference data, in the same number of optimizer steps. `apo build-pairs` writes, from one
vote consensus, the groups {{t⁺, teacher negatives}} (APO) and one pairwise row per (t⁺, negative) (DPO); seed {
        per_seed[0]["seed"]
    } has {b0["groups"]} groups and {b0["comparisons"]} comparisons. APO takes {b0["groups_per_step"]} groups per step
({b0["apo_steps"]} steps), ms-swift DPO {b0["pairs_per_step"]} pairs per step ({b0["dpo_steps"]} steps): both see every
(t⁺, τᵘ) comparison exactly once, with the same LR schedule, LoRA, β, NLL weight and seed; learning rates: {
        lr_note(args)
    }. Why this budget: it is the
paper's (1 epoch of the preference data) and it isolates the objective: Plackett-Luce over the group vs independent
pairs on identical comparisons. It does not equalise compute: DPO re-encodes t⁺ once per pair (2 sequences per
comparison), APO once per group (1 + ~1/N); wall times are below.{
        "".join(
            f" {ARM_LABELS[arm]} builds its own groups from its t⁺ with the same settings, groups per step and epochs"
            f" (its t⁺ is no teacher's, so every teacher is a negative): {b0[arm]['groups']} groups,"
            f" {b0[arm]['comparisons']} comparisons on seed {per_seed[0]['seed']}."
            for arm in POSITIVE_ARMS
            if arm in b0
        )
    }

## Settings ({
        f"frozen in `{shown(args.config)}` before the evaluation seeds ran; chosen on the "
        "development seed 0, which is not among them (the file's comment says what was chosen where)"
        if frozen_claim(args)
        else f"from `{shown(args.config)}` with the overrides in the command above"
        if args.config
        else "tuned on seed 0 only, then frozen for every seed"
    })

```
{json.dumps(settings, indent=1)}
```
Fixed: synthetic benchmark `apo synth` (7 teachers, default drift profiles); tiny Qwen2.5-VL `apo tiny-model`;
SFT through `scripts/SFT-Qwen2.5.sh` (ms-swift, LoRA r/α {args.sft_lora[0]}/{
        args.sft_lora[1]
    } + embed_tokens and lm_head
trained in full, max length 1024, warmup 5 %, cosine); consensus `--strategy vote`{
        positives_note(args)
    }; APO through `scripts/APO-Qwen2.5.sh`
with `configs/apo/demo.yaml` and the overrides above (cosine, 5 % warmup, LoRA dropout 0.05); DPO through
`scripts/DPO-Qwen2.5.sh` (ms-swift `rlhf_type dpo`, sigmoid loss{
        ", rpo_alpha = sft-weight" if args.sft_weight else ""
    });
both preference students are LoRA adapters on π_st = SFT merged, the reference is π_st. One process per stage,
`OMP_NUM_THREADS=1`.

## Per seed

{per_seed_table(per_seed, arms)}

## Wall time

Invocations (wall seconds, `--jobs`, stages actually run; reused stages cost nothing):
{invocations(out)}
Stage times summed over seeds (s): {json.dumps(t)}.

## Reading

{reading.read_text().strip() if reading.is_file() else "(not written yet: put it in " + str(reading) + ")"}
"""
    (out / "EXPERIMENT.md").write_text(md, encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the report's rerun command
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    seeds = [Seed(args, s) for s in args.seeds]
    if args.base == "pretrained" and not args.report_only:
        build_shared_base(args)
        if any(args.sft_replay):
            build_replay(args)
    if args.report_only:
        missing = [
            f"seed{s.seed}/eval/{arm}"
            for s in seeds
            for arm in args.arms
            if not (s.dir / "eval" / arm / "metrics.json").is_file()
        ]
        if missing:  # never overwrite a report with a partial or empty one
            raise SystemExit(
                f"experiment.py: --report-only: {out} lacks {len(missing)} evaluated arm(s) ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}); run without --report-only to finish them"
            )
        per_seed = [s.collect() for s in seeds]
        for s in per_seed:
            f = Path(args.out).resolve() / f"seed{s['seed']}" / "timings.json"
            s["timings_s"] = json.loads(f.read_text()) if f.is_file() else {}
    elif args.jobs > 1:
        with ThreadPoolExecutor(args.jobs) as pool:
            per_seed = list(pool.map(Seed.run, seeds))
    else:
        per_seed = [s.run() for s in seeds]
    wall = time.time() - t0
    ran = {f"seed{s.seed}": sorted(s.ran) for s in seeds}
    if any(ran.values()):  # every invocation that ran something, so a resumed run still reports the whole cost
        with open(out / "invocations.jsonl", "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "argv": sys.argv[1:] if argv is None else argv,
                        "wall_s": round(wall, 1),
                        "jobs": args.jobs,
                        "stages_run": ran,
                        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                    }
                )
                + "\n"
            )
    agg = aggregate(per_seed, args.arms, args.bootstrap)
    result = {
        "command": " ".join(["scripts/experiment.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("report_only",)},
        "wall_seconds": round(wall, 1),  # this invocation (a --report-only one costs seconds)
        "wall_seconds_all_runs": round(sum(r["wall_s"] for r in _invocation_rows(out)), 1),
        "aggregate": agg,
        "per_seed": [{k: v for k, v in s.items() if k != "case_counts"} for s in per_seed],
    }
    (out / "experiment.json").write_text(json.dumps(result, indent=1, sort_keys=True), encoding="utf-8")
    write_report(args, per_seed, agg, wall, out)
    print(main_table(agg, [a for a in args.arms if a in agg["arms"]], args.base))
    print()
    print(paired_table(agg))
    for mode in ("greedy", "sampled"):
        if agg.get("bootstrap", {}).get(mode):
            print(f"\n{mode}, paired differences with 95 % bootstrap intervals:\n{bootstrap_table(agg, mode)}")
    say(f"wrote {out / 'EXPERIMENT.md'} and {out / 'experiment.json'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
