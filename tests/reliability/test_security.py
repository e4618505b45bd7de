"""Security (issue 6, item 5): no remote code unless asked, no pickles from untrusted files, no path escapes.

Findings this file pins down (transformers 5.19, torch 2.15, peft 0.20):
- every from_pretrained in apo/, benchmarks/ and scripts/ leaves trust_remote_code at its default (False) or passes
  the user's --trust-remote-code (generation only); a model folder that ships code (config auto_map) is loaded with
  the library's own classes and its code is never imported;
- our only torch.load (a user's CheXbert checkpoint) is weights_only=True; our caches are JSON/JSONL, weights
  safetensors; Trainer resume loads optimizer.pt / scheduler.pt / rng_state*.pth / scaler.pt with
  torch.load(weights_only=True) and never loads training_args.bin (checked below against the installed source);
  DeepSpeed's own checkpoint loader is weights_only=False (documented in apo/trainer/checkpoint.py);
- image paths: the loader fences --image-root (test_fuzz_data, test_bad_input), MS-CXR-T ids must be plain ids,
  groups.jsonl relative paths stay in its folder, MIMIC report ids cannot leave --reports-dir.
"""

import ast
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*REPO.glob("apo/**/*.py"), *REPO.glob("benchmarks/**/*.py"), *REPO.glob("scripts/**/*.py")])


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == name) or (isinstance(f, ast.Name) and f.id == name):
                yield node


def _kw(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_remote_code_no_pickle(path):
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    assert not re.search(r"""trust_remote_code["']?\s*[=:]\s*True""", text), f"{path}: trust_remote_code=True"
    for call in _calls(tree, "from_pretrained"):
        v = _kw(call, "trust_remote_code")
        assert v is None or isinstance(v, (ast.Name, ast.Attribute)), f"{path}:{call.lineno}: {ast.unparse(v)}"
    for call in _calls(tree, "load"):
        if ast.unparse(call.func) == "torch.load":
            v = _kw(call, "weights_only")
            assert isinstance(v, ast.Constant) and v.value is True, (
                f"{path}:{call.lineno}: torch.load without weights_only=True"
            )
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), (
                f"{path}:{node.lineno}: pickle import"
            )


def test_trust_remote_code_is_off_unless_asked():
    from apo.cli import build_parser

    for argv in (
        ["consensus", "--dataset", "d", "--out", "o"],
        ["eval-report", "--model", "m", "--dataset", "d", "--out", "o"],
        ["eval-mscxrt", "--model", "m", "--csv", "c", "--image-root", "r", "--out", "o"],
    ):
        assert build_parser(argv[0]).parse_args(argv).trust_remote_code is False
        assert build_parser(argv[0]).parse_args(argv + ["--trust-remote-code"]).trust_remote_code is True


def test_a_model_folder_that_ships_code_does_not_run_it(tiny_model_dir, tmp_path):
    """config.json/processor_config.json name modules in the folder (auto_map); importing them would drop a file.
    Generation and training load the folder with the library's classes, and the file never appears."""
    from apo.model.loading import load_model
    from apo.trainer.config import parse_config
    from apo.trainer.trainer import build_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    sentinel = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\nclass Evil: pass\n")
    for name in ("config.json", "processor_config.json"):
        cfg = json.loads((model / name).read_text())
        cfg["auto_map"] = {
            k: "evil.Evil"
            for k in ("AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoProcessor", "AutoImageProcessor")
        }
        (model / name).write_text(json.dumps(cfg))
    net, processor = load_model(str(model))
    assert type(net).__name__ == "Qwen2_5_VLForConditionalGeneration" and not sentinel.exists()
    config = parse_config(
        str(REPO / "configs/apo/demo.yaml"),
        ["--model_name_or_path", str(model), "--groups_file", "g", "--output_dir", str(tmp_path)],
    )
    build_model(config)
    assert not sentinel.exists()


def test_trainer_resume_loads_only_weights_only_pickles():
    """The installed Trainer: every torch.load in its resume path is weights_only=True; training_args.bin is never
    loaded. A dependency upgrade that changes this fails here."""
    import transformers.trainer as hf

    tree = ast.parse(inspect.getsource(hf))
    loads = [c for c in _calls(tree, "load") if ast.unparse(c.func) == "torch.load"]
    assert loads, "no torch.load found: the check would be vacuous"
    for call in loads:
        v = _kw(call, "weights_only")
        assert isinstance(v, ast.Constant) and v.value is True, f"transformers/trainer.py:{call.lineno}"
    src = inspect.getsource(hf.Trainer._load_from_checkpoint) + inspect.getsource(hf.Trainer._load_rng_state)
    assert "TRAINING_ARGS_NAME" not in src


def test_mimic_report_ids_cannot_leave_reports_dir(tmp_path):
    from apo.io.mimic import mimic_report_path

    (tmp_path / "secret.txt").write_text("FINDINGS: leaked.")
    reports = tmp_path / "reports"
    (reports / "files" / "p10" / "p10000001").mkdir(parents=True)
    (reports / "files" / "p10" / "p10000001" / "s50000001.txt").write_text("FINDINGS: ok.")
    assert mimic_report_path(reports, "10000001", "50000001") is not None
    for subject, study in [("../../..", "secret"), ("10000001", "/../../../secret"), ("1*", "5*"), ("", "50000001")]:
        assert mimic_report_path(reports, subject, study) is None, (subject, study)
