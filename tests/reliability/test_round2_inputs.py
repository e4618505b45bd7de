"""Round 2 (issue 16), inputs: config and CLI mistakes and broken model folders (class 6), images the processor
refuses and high-bit-depth images (class 2), dataset folders (class 3), the default image root's fence (class 7),
identity strings, conflicting labels, empty data, --split on a file (class 8). No model is loaded."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apo.data import load_cases
from apo.errors import ApoError
from apo.io.mimic import mimic_image_path
from apo.model.chat import load_images

from .round2 import (
    StandIn,
    fake_adapter,
    fake_model,
    folder_world,
    jpeg,
    long_row,
    ok,
    one_line,
    run,
)
from .world import TEXTS, build, data_rows, jsonl

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
DEMO = str(Path(__file__).parents[2] / "configs" / "apo" / "demo.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = build(tmp_path_factory.mktemp("world3"))
    w["model"] = fake_model(w["root"] / "model")
    return w


# ------------------------------------------------------------------ class 6: apo train config and CLI mistakes

CONFIG_FILES = {  # name -> (file name, content, what the one line must say)
    "yaml_syntax": ("c.yaml", "lora_r: 8\nbeta: [0.1\n", r"c\.yaml:\d+: YAML syntax error"),
    "yaml_tab_indent": ("c.yaml", "lora_r: 8\n\tbeta: 0.1\n", r"c\.yaml:\d+: YAML syntax error"),
    "json_syntax": ("c.json", '{"lora_r": 8,', r"c\.json:1: invalid JSON"),
    "not_a_mapping": ("c.yaml", "- lora_r\n- 8\n", r"c\.yaml: a config file must be a mapping"),
    "scalar_file": ("c.yaml", "just words\n", r"must be a mapping"),
    "non_utf8": ("c.yaml", b"lora_r: 8\nbeta: \xff\n", r"c\.yaml: not UTF-8"),
    "max_steps_word": ("c.yaml", "max_steps: two\n", r"key max_steps: expected an integer, got 'two'"),
    "max_steps_float": ("c.yaml", "max_steps: 2.7\n", r"key max_steps: expected an integer, got 2\.7"),
    "max_steps_bool": ("c.yaml", "max_steps: true\n", r"key max_steps: expected an integer, got True"),
    "lora_r_list": ("c.yaml", "lora_r: [8]\n", r"key lora_r: expected an integer, got \[8\]"),
    "beta_word": ("c.yaml", "beta: high\n", r"key beta: expected a number"),
    "use_lora_string": ("c.yaml", "use_lora: 'yes'\n", r"key use_lora: expected true or false"),
    "loss_unknown": ("c.yaml", "loss: ppo\n", r"key loss: expected one of apo, dpo"),
    "scheduler_unknown": ("c.yaml", "lr_scheduler_type: cosinus\n", r"key lr_scheduler_type: expected one of"),
    "save_strategy_unknown": ("c.yaml", "save_strategy: sometimes\n", r"key save_strategy: expected one of no, steps"),
    "groups_file_number": ("c.yaml", "groups_file: 12\n", r"key groups_file: expected a string"),
    "misspelled_key": ("c.yaml", "lorar_r: 8\n", r"unknown keys \['lorar_r'\] \(did you mean 'lora_r'\?\)"),
    "lora_r_zero": ("c.yaml", "lora_r: 0\n", r"--lora_r must be >= 1"),
    "lora_alpha_negative": ("c.yaml", "lora_alpha: -4\n", r"--lora_alpha must be >= 1"),
    "lora_dropout_range": ("c.yaml", "lora_dropout: 1.5\n", r"--lora_dropout must be in \[0, 1\)"),
    "learning_rate_negative": ("c.yaml", "learning_rate: -0.001\n", r"--learning_rate must be >= 0"),
    "beta_zero": ("c.yaml", "beta: 0\n", r"--beta must be > 0"),
    "max_length_zero": ("c.yaml", "max_length: 0\n", r"--max_length must be >= 1"),
    "max_negatives_zero": ("c.yaml", "max_negatives: 0\n", r"--max_negatives must be >= 1"),
    "sft_weight_negative": ("c.yaml", "sft_weight: -1\n", r"--sft_weight must be >= 0"),
    "torch_dtype_unknown": ("c.yaml", "torch_dtype: float8\n", r"torch_dtype"),
    "missing_file": (None, None, r"config file not found"),
}


def _train(w, tmp, config=DEMO, *extra, model=None, groups=None):
    return [
        "train",
        "--config",
        config,
        "--model_name_or_path",
        model or w["model"],
        "--groups_file",
        groups or w["groups"],
        "--output_dir",
        tmp / "apo",
        *extra,
    ]


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_config_file_mistake_is_one_line(world, tmp_path, capsys, case):
    name, content, pattern = CONFIG_FILES[case]
    cfg = tmp_path / (name or "missing.yaml")
    if content is not None:
        (cfg.write_bytes if isinstance(content, bytes) else cfg.write_text)(content)
    one_line(*run(capsys, _train(world, tmp_path, cfg)), "train", pattern)
    assert not (tmp_path / "apo").exists()


CLI_OVERRIDES = {
    "misspelled_flag": (
        ["--lerning_rate", "1e-4"],
        r"unknown option --lerning_rate \(did you mean --learning_rate\?\)",
    ),
    "misspelled_flag_equals": (["--max_step=3"], r"unknown option --max_step \(did you mean --max_steps\?\)"),
    "wrong_type": (["--max_steps", "two"], r"command line: argument --max_steps/--max-steps: invalid int value: 'two'"),
    "float_for_int": (["--lora_r", "2.5"], r"argument --lora_r/--lora-r: invalid int value: '2.5'"),
    "missing_value": (["--max_steps"], r"argument --max_steps/--max-steps: expected one argument"),
    "bad_choice": (["--loss", "ppo"], r"argument --loss: invalid choice"),
    "out_of_range": (["--lora_r", "0"], r"--lora_r must be >= 1"),
    "beta_negative": (["--beta", "-1"], r"--beta must be > 0"),
    "bool_word": (["--use_lora", "perhaps"], r"argument --use_lora"),
}


@pytest.mark.parametrize("case", sorted(CLI_OVERRIDES))
def test_cli_override_mistake_is_one_line(world, tmp_path, capsys, case):
    extra, pattern = CLI_OVERRIDES[case]
    one_line(*run(capsys, _train(world, tmp_path, DEMO, *extra)), "train", pattern)


def _model_folder(tmp: Path, kind: str) -> Path:
    m = tmp / "m"
    if kind == "missing":
        return m
    m.mkdir()
    if kind == "no_config":
        (m / "model.safetensors").write_bytes(b"\0" * 16)
    elif kind == "corrupt_config":
        (m / "config.json").write_text('{"model_type": "qwen2_5_vl",')
        (m / "model.safetensors").write_bytes(b"\0" * 16)
    elif kind == "config_not_object":
        (m / "config.json").write_text("[1, 2]")
    elif kind == "no_weights":
        (m / "config.json").write_text("{}")
    elif kind == "truncated_weights":
        fake_model(m)
        data = (m / "model.safetensors").read_bytes()
        (m / "model.safetensors").write_bytes(data[:-5])
    elif kind == "weights_header_garbage":
        (m / "config.json").write_text("{}")
        (m / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"x")
    return m


MODEL_FAULTS = {
    "missing": r"no such folder",
    "no_config": r"not a model folder \(no config\.json there\)",
    "corrupt_config": r"config\.json is corrupt",
    "config_not_object": r"config\.json is corrupt \(not a JSON object\)",
    "no_weights": r"no weight files",
    "truncated_weights": r"model\.safetensors: .*(truncated|header needs)",
    "weights_header_garbage": r"model\.safetensors: truncated",
}


@pytest.mark.parametrize("kind", sorted(MODEL_FAULTS))
@pytest.mark.parametrize("command", ["train", "eval-report", "eval-mscxrt", "consensus"])
def test_broken_model_folder_is_one_line(world, tmp_path, capsys, command, kind):
    m = _model_folder(tmp_path, kind)
    argv = {
        "train": _train(world, tmp_path, DEMO, model=m),
        "eval-report": [
            "eval-report",
            "--model",
            m,
            "--dataset",
            world["data"],
            "--image-root",
            world["root"],
            "--out",
            tmp_path / "ev",
        ],
        "eval-mscxrt": [
            "eval-mscxrt",
            "--model",
            m,
            "--csv",
            world["csv"],
            "--image-root",
            world["root"],
            "--out",
            tmp_path / "ms",
        ],
        "consensus": [
            "consensus",
            "--model",
            m,
            "--dataset",
            world["data"],
            "--image-root",
            world["root"],
            "--out",
            tmp_path / "c.jsonl",
        ],
    }[command]
    flag = "--model_name_or_path" if command == "train" else "--model"
    one_line(*run(capsys, argv), command, rf"{flag} {m}: {MODEL_FAULTS[kind]}")


@pytest.mark.parametrize("kind", ["no_adapter_config", "corrupt_adapter_config", "truncated_adapter_weights"])
@pytest.mark.parametrize("command", ["train", "eval-report"])
def test_broken_adapter_folder_is_one_line(world, tmp_path, capsys, command, kind):
    a = fake_adapter(tmp_path / "a")
    if kind == "no_adapter_config":
        (a / "adapter_config.json").unlink()
    elif kind == "corrupt_adapter_config":
        (a / "adapter_config.json").write_text("{r: 8")
    else:
        data = (a / "adapter_model.safetensors").read_bytes()
        (a / "adapter_model.safetensors").write_bytes(data[:-3])
    if command == "train":
        argv, flag = _train(world, tmp_path, DEMO, "--adapter_name_or_path", a), "--adapter_name_or_path"
    else:
        argv, flag = (
            [
                "eval-report",
                "--model",
                world["model"],
                "--adapter",
                a,
                "--dataset",
                world["data"],
                "--image-root",
                world["root"],
                "--out",
                tmp_path / "ev",
            ],
            "--adapter",
        )
    one_line(
        *run(capsys, argv),
        command,
        rf"{flag} {a}: (no adapter_config|adapter_config\.json is corrupt|adapter_model\.safetensors: 83 bytes, "
        r"its header needs 86)",
    )


def test_train_groups_file_missing(world, tmp_path, capsys):
    one_line(
        *run(capsys, _train(world, tmp_path, groups=tmp_path / "nope.jsonl")), "train", r"--groups_file .*not found"
    )


# ------------------------------------------------------------------ class 2: images the processor refuses, bit depth


def _odd_image(folder: Path, kind: str) -> str:
    name = f"odd-{kind}.png" if kind != "tiff_float" else "odd-float.tif"
    p = folder / name
    if kind == "aspect_wide":
        Image.new("L", (1200, 4)).save(p)  # 300:1: smart_resize refuses > 200
    elif kind == "aspect_tall":
        Image.new("RGB", (3, 700)).save(p)
    elif kind == "tiff_float":
        Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32), mode="F").save(p)
    return name


IMAGE_FAULTS = {
    "aspect_wide": r"image is 1200x4 pixels: the image processor refuses it \(absolute aspect ratio",
    "aspect_tall": r"image is 3x700 pixels: the image processor refuses it",
    "tiff_float": r"image has floating-point pixels \(mode F\)",
}


def _image_argv(w, tmp, command, data):
    common = ["--dataset", data]
    return {
        "prepare-sft": ["prepare-sft", *common, "--out", tmp / "sft.jsonl"],
        "consensus": ["consensus", "--strategy", "vote", *common, "--out", tmp / "c.jsonl"],
        "build-pairs": ["build-pairs", *common, "--consensus", tmp / "cons.jsonl", "--out", tmp / "g.jsonl"],
        "eval-report": ["eval-report", "--model", w["model"], *common, "--out", tmp / "ev"],
    }[command]


@pytest.mark.parametrize("kind", sorted(IMAGE_FAULTS))
@pytest.mark.parametrize("command", ["prepare-sft", "consensus", "build-pairs", "eval-report"])
def test_image_the_processor_refuses_is_caught_up_front(world, tmp_path, capsys, monkeypatch, command, kind):
    stand_in = StandIn(monkeypatch)
    name = _odd_image(tmp_path, kind)
    rows = list(data_rows(["c0", "c1"])) + [long_row("odd", teacher=t, image=name) for t in TEXTS]
    data = folder_world(tmp_path, rows)
    (tmp_path / "cons.jsonl").write_bytes(world["consensus"].read_bytes())
    argv = _image_argv(world, tmp_path, command, data)
    one_line(*run(capsys, argv), command, rf"{data}:\d+: {IMAGE_FAULTS[kind]}")
    assert stand_in.loaded == 0
    ok(*run(capsys, argv + ["--skip-bad"]))  # --skip-bad: the case is left out, the others kept


@pytest.mark.parametrize("kind", sorted(IMAGE_FAULTS))
def test_groups_image_the_processor_refuses(world, tmp_path, capsys, kind):
    from apo.trainer.collator import load_groups

    name = _odd_image(tmp_path, kind)
    row = json.loads(world["groups"].read_bytes().splitlines()[0])
    row["case_id"], row["images"] = "odd", [name]
    groups = tmp_path / "groups.jsonl"
    groups.write_bytes(world["groups"].read_bytes() + jsonl([row]))
    n = len(world["groups"].read_bytes().splitlines()) + 1
    one_line(*run(capsys, _train(world, tmp_path, groups=groups)), "train", rf"{groups}:{n}: {IMAGE_FAULTS[kind]}")
    assert len(load_groups(groups, skip_bad=True)) == n - 1  # training's skip_bad leaves it out up front


def test_mscxrt_image_the_processor_refuses(world, tmp_path, capsys, monkeypatch):
    StandIn(monkeypatch)
    root = tmp_path / "mimic"
    for sub, dicom, size in (("51000000", "prev", (64, 64)), ("50000000", "cur", (1000, 3))):
        p = mimic_image_path(root, "10000000", sub, dicom)
        p.parent.mkdir(parents=True, exist_ok=True)
        jpeg(p, size)
    csv = tmp_path / "m.csv"
    header = world["csv"].read_text().splitlines()[0]
    csv.write_text(header + "\ncur,prev,50000000,51000000,10000000,improving,,,,\n")
    argv = ["eval-mscxrt", "--model", world["model"], "--csv", csv, "--image-root", root, "--out", tmp_path / "ms"]
    one_line(*run(capsys, argv), "eval-mscxrt", rf"{csv}:2: image is 1000x3 pixels: the image processor refuses")


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "x16.png"
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(p)  # mid-grey in 16 bits
    assert Image.open(p).mode.startswith("I")
    (img,) = load_images([p])
    assert img.mode == "RGB" and np.asarray(img).mean() == pytest.approx(128, abs=1)  # PIL's convert: 255 (white)


def test_16_bit_png_passes_the_up_front_check(tmp_path, capsys):
    p = tmp_path / "c16.png"
    Image.fromarray(np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)).save(p)
    data = folder_world(tmp_path, [long_row("c16", image="c16.png")])
    ok(*run(capsys, ["prepare-sft", "--dataset", data, "--out", tmp_path / "sft.jsonl"]))


def test_model_image_rules_come_from_its_preprocessor_config(tmp_path):
    from apo.data import image_rules

    m = fake_model(tmp_path / "m")
    (m / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, "merge_size": 2, "max_pixels": 1000}))
    assert image_rules(m) == {"patch_size": 16, "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 1000}
    (m / "preprocessor_config.json").write_text("{broken")
    assert image_rules(m)["patch_size"] == 14  # the model loader reports a broken folder; the check uses defaults


# ------------------------------------------------------------------ class 3: dataset folders


def _shard(path: Path, rows, raw_tail=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jsonl(rows) + raw_tail)
    return path


def _folder(tmp: Path, layout: str) -> tuple[Path, str, list]:
    """-> (dataset folder, expected error pattern or None, argv extras)."""
    d = tmp / "ds"
    folder_world(tmp, [])
    rows0, rows1 = list(data_rows(["c0"])), list(data_rows(["c1"]))
    if layout == "bad_line_in_shard":
        _shard(d / "train" / "part-0.jsonl", rows0)
        _shard(d / "train" / "part-1.jsonl", rows1, b'{"case_id": "x", "image": \n')
        return d, rf"{d}:train/part-1\.jsonl:{len(rows1) + 1}: invalid JSON", []
    if layout == "bad_line_in_other_split":
        _shard(d / "train" / "part-0.jsonl", rows0)
        _shard(d / "test" / "part-0.jsonl", rows1, b"{broken\n")
        return d, None, ["--split", "train"]
    if layout == "bad_line_asked_split":
        _shard(d / "train" / "part-0.jsonl", rows0)
        _shard(d / "test" / "part-0.jsonl", rows1, b"{broken\n")
        return d, rf"{d}:test/part-0\.jsonl:{len(rows1) + 1}: invalid JSON", ["--split", "test"]
    if layout == "mixed_id_types":
        for r in rows1:
            r["case_id"] = 7
        _shard(d / "train-0.jsonl", rows0)
        _shard(d / "train-1.jsonl", rows1)
        return d, None, []
    if layout == "parquet_int_answer":
        import pandas as pd

        d.mkdir(parents=True)
        pd.DataFrame(rows0).to_parquet(d / "train-0.parquet")
        bad = [{**rows1[0], "response": 42}]
        pd.DataFrame(bad).to_parquet(d / "train-1.parquet")
        return d, rf"{d}:train-1\.parquet:row 1: response of .* must be a string, got int", []
    if layout == "broken_parquet_shard":
        _shard(d / "train-0.jsonl", rows0)
        (d / "train-1.parquet").write_bytes(b"PAR1 not really")
        return d, rf"{d}:train-1\.parquet: cannot read parquet", []
    if layout == "two_splits_no_choice":
        _shard(d / "train.jsonl", rows0)
        _shard(d / "test.jsonl", rows1)
        return d, rf"{d}: dataset has splits \['test', 'train'\]; choose one with --split", []
    if layout == "unknown_split":
        _shard(d / "train.jsonl", rows0)
        return d, rf"{d}: no split 'validation' \(has \['train'\]\)", ["--split", "validation"]
    if layout == "empty_folder":
        d.mkdir(parents=True)
        return d, rf"{d}: no data files in this folder", []
    if layout == "non_utf8_shard":
        _shard(d / "data.jsonl", rows0, b'{"case_id": "\xff"}\n')
        return d, rf"{d}:data\.jsonl:{len(rows0) + 1}: not UTF-8", []
    if layout == "save_to_disk_dict":
        import datasets

        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows0), "test": datasets.Dataset.from_list(rows1)}
        ).save_to_disk(str(d))
        return d, None, ["--split", "test"]
    if layout == "save_to_disk_missing_arrow":
        import datasets

        datasets.Dataset.from_list(rows0).save_to_disk(str(d))
        for f in d.glob("*.arrow"):
            f.unlink()
        return d, rf"{d}: data files listed in state\.json are missing", []
    if layout == "save_to_disk_corrupt_arrow":
        import datasets

        datasets.Dataset.from_list(rows0).save_to_disk(str(d))
        for f in d.glob("*.arrow"):
            f.write_bytes(b"garbage")
        return d, rf"{d}:data-00000-of-00001\.arrow: cannot read arrow file", []
    raise KeyError(layout)


FOLDERS = [
    "bad_line_in_shard",
    "bad_line_in_other_split",
    "bad_line_asked_split",
    "mixed_id_types",
    "parquet_int_answer",
    "broken_parquet_shard",
    "two_splits_no_choice",
    "unknown_split",
    "empty_folder",
    "non_utf8_shard",
    "save_to_disk_dict",
    "save_to_disk_missing_arrow",
    "save_to_disk_corrupt_arrow",
]


@pytest.mark.parametrize("layout", FOLDERS)
def test_dataset_folder(tmp_path, capsys, layout):
    d, pattern, extra = _folder(tmp_path, layout)
    argv = ["prepare-sft", "--dataset", d, "--image-root", tmp_path, "--out", tmp_path / "sft.jsonl", *extra]
    rc, err = run(capsys, argv)
    if pattern is None:
        ok(rc, err)
        rows = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
        if layout == "mixed_id_types":  # ints stay what they were, as text: no cast through a shared schema
            assert sorted({r["case_id"] for r in rows}) == ["7", "c0"]
    else:
        one_line(rc, err, "prepare-sft", pattern)


@pytest.mark.parametrize("layout", ["bad_line_in_shard", "parquet_int_answer", "non_utf8_shard"])
def test_dataset_folder_skip_bad_keeps_the_good_shards(tmp_path, capsys, layout):
    d, _, extra = _folder(tmp_path, layout)
    argv = ["prepare-sft", "--dataset", d, "--image-root", tmp_path, "--out", tmp_path / "sft.jsonl", "--skip-bad"]
    ok(*run(capsys, argv + extra))
    rejects = [json.loads(x) for x in (tmp_path / "sft.jsonl.rejects.jsonl").read_text().splitlines()]
    shard = {
        "bad_line_in_shard": "train/part-1.jsonl:",
        "parquet_int_answer": "train-1.parquet:row 1",
        "non_utf8_shard": "data.jsonl:",
    }[layout]
    assert len(rejects) == 1 and rejects[0]["record"].startswith(shard), rejects
    kept = len(TEXTS) * (2 if layout == "bad_line_in_shard" else 1)  # every good row of every shard
    assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == kept


# ------------------------------------------------------------------ class 7: the default image root's fence


def _fence_data(tmp: Path, kind: str):
    d = tmp / "inner"
    folder_world(d, [])
    outside = jpeg(tmp / "outside.jpg")
    if kind == "dotdot":
        image = "../outside.jpg"
    elif kind == "absolute":
        image = str(outside)
    elif kind == "symlink":
        (d / "link.jpg").symlink_to(outside)
        image = "link.jpg"
    else:
        image = "c0.jpg"
    rows = [long_row("x", teacher=t, image=image, report="Small left pleural effusion.") for t in TEXTS]
    return folder_world(d, rows)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("command", ["prepare-sft", "consensus", "drift", "eval-report"])
def test_default_image_root_is_fenced(world, tmp_path, capsys, monkeypatch, command, kind):
    StandIn(monkeypatch)
    data = _fence_data(tmp_path, kind)
    out = {"prepare-sft": tmp_path / "s.jsonl", "consensus": tmp_path / "c.jsonl"}.get(command, tmp_path / "o")
    argv = [command, "--dataset", data, "--out", out]
    argv += ["--strategy", "vote"] if command == "consensus" else []
    argv += ["--model", world["model"]] if command == "eval-report" else []
    one_line(*run(capsys, argv), command, rf"{data}:1: image path .* leaves the image root {data.parent}")
    ok(*run(capsys, argv + ["--allow-absolute-paths"]))  # the documented way out


# ------------------------------------------------------------------ class 8: identity strings, labels, empty data


def _cases(tmp, rows, **kw):
    return load_cases(folder_world(tmp, rows), **kw)


STRINGS_BAD = {  # rows -> pattern of the one line (prepare-sft)
    "teacher_zero_width_space": ([long_row(teacher="GPT-5-nano\u200b")], r":1: teacher name .* U\+200B"),
    "teacher_bom": ([long_row(teacher="\ufeffGrok-4")], r":1: teacher name .* U\+FEFF"),
    "teacher_rtl_mark": ([long_row(teacher="Grok\u200f-4")], r":1: teacher name .* U\+200F"),
    "teacher_newline_inside": ([long_row(teacher="Grok\n4")], r":1: teacher name .* U\+000A"),
    "teacher_nbsp": ([long_row(teacher="Grok\u00a04")], r":1: teacher name .* U\+00A0"),
    "case_id_control": ([long_row(cid="c\x070")], r":1: case id .* U\+0007"),
    "case_id_zero_width_joiner": ([long_row(cid="c\u200d0")], r":1: case id .* U\+200D"),
    "case_id_float": ([long_row(cid=1.5)], r":1: case id must be a string or an integer, got float"),
    "case_id_bool": ([long_row(cid=True)], r":1: missing case id|case id must be"),
    "case_id_blank": ([long_row(cid="   ")], r":1: case id is empty"),
    "conflicting_labels": (
        [long_row(labels={"Edema": 1}), long_row(teacher="Grok-4", labels={"Edema": 0})],
        r":2: case 'c0' has other labels than at 1 \(Edema\)",
    ),
    "wide_duplicate_teacher_after_nfc": (
        [
            {
                "case_id": "w",
                "image": "c0.jpg",
                "question": "q?",
                "trajectories": {"Cafe\u0301": "a.", "Caf\u00e9": "b."},
            }
        ],
        r":1: teacher 'Café' answers twice",
    ),
    "empty_file": ([], r": no usable case \(no records\)"),
    "all_rejected_with_skip_bad": ([{"case_id": "a"}], r"no usable case \(all 1 record\(s\) rejected"),
    "split_on_file_without_split_field": ([long_row()], r": --split train: a single data file has no splits"),
    "split_not_in_file": ([long_row(split="train")], r": --split test: no row of that split"),
}


@pytest.mark.parametrize("case", sorted(STRINGS_BAD))
def test_identity_and_data_mistakes_are_one_line(tmp_path, capsys, case):
    rows, pattern = STRINGS_BAD[case]
    data = folder_world(tmp_path, rows)
    argv = ["prepare-sft", "--dataset", data, "--out", tmp_path / "sft.jsonl"]
    argv += ["--skip-bad"] if case == "all_rejected_with_skip_bad" else []
    argv += ["--split", "train"] if case == "split_on_file_without_split_field" else []
    argv += ["--split", "test"] if case == "split_not_in_file" else []
    one_line(*run(capsys, argv), "prepare-sft", pattern)
    assert not (tmp_path / "sft.jsonl").exists()


STRINGS_SAME = {  # rows that name ONE case / ONE teacher in different spellings
    "int_and_string_case_id": [long_row(cid=0), long_row(cid="0", teacher="Grok-4")],
    "falsy_int_case_id": [long_row(cid=0)],
    "leading_space_case_id": [long_row(cid=" c0"), long_row(cid="c0", teacher="Grok-4")],
    "trailing_space_teacher": [long_row(teacher="Grok-4 "), long_row(cid="c1", teacher="Grok-4")],
    "nfd_vs_nfc_teacher": [long_row(teacher="Cafe\u0301"), long_row(cid="c1", teacher="Caf\u00e9")],
    "same_labels_twice": [long_row(labels={"Edema": 1}), long_row(teacher="Grok-4", labels={"Edema": 1})],
}


@pytest.mark.parametrize("case", sorted(STRINGS_SAME))
def test_identity_strings_are_normalised(tmp_path, case):
    cases = _cases(tmp_path, STRINGS_SAME[case])
    teachers = {t for c in cases for t in c.teachers}
    if case in ("int_and_string_case_id", "leading_space_case_id", "same_labels_twice"):
        assert len(cases) == 1 and len(cases[0].trajectories) == 2
    if case == "falsy_int_case_id":
        assert [c.case_id for c in cases] == ["0"]
    if case in ("trailing_space_teacher", "nfd_vs_nfc_teacher"):
        assert len(teachers) == 1, teachers


def test_split_field_on_a_single_file_selects_rows(tmp_path):
    rows = [long_row("a", split="train"), long_row("b", split="test"), long_row("c", split="train")]
    assert [c.case_id for c in _cases(tmp_path, rows, split="train")] == ["a", "c"]


def test_load_cases_empty_raises(tmp_path):
    with pytest.raises(ApoError, match="no usable case"):
        _cases(tmp_path, [])
