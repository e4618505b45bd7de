"""apo.model.loading: one offline rule for every stage (HF_HUB_OFFLINE read as huggingface_hub reads it)."""

import pytest

from apo.errors import ApoError
from apo.model.loading import adapter_config, check_model, is_offline


@pytest.mark.parametrize(
    "value, offline",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("", False),
        (None, False),
    ],
)
def test_offline_rule(monkeypatch, value, offline):
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert is_offline() is offline


def test_offline_needs_local_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    check_model(tmp_path)
    with pytest.raises(ApoError, match="--model_name_or_path Qwen/x: no such folder"):
        check_model("Qwen/x", "--model_name_or_path")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_model("Qwen/x")  # online: a hub id is fine
    with pytest.raises(ApoError, match="adapter_config.json"):
        adapter_config(tmp_path)
