"""Session fixtures: one tiny Qwen2.5-VL and one small synthetic CXR-MAX set, built once and shared."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MODELSCOPE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from apo.world.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from apo.world.synth import generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, cases=40, seed=0)
    return out
