"""`--backend vllm` glue, on CPU: vLLM itself needs a CUDA machine (and pins another torch), so a stand-in `vllm`
module answers with the same tiny model through transformers, the way vLLM's offline API is called: LLM(**engine
args).generate([{"prompt", "multi_modal_data": {"image"}}], SamplingParams, lora_request). If our engine hands it
the same chat text, images and greedy settings as the hf backend, the consensus files are byte-identical."""

import json
import sys
import types

import pytest
from test_consensus import write_dataset

from apo.cli import main
from apo.errors import ApoError


class FakeLLM:
    instances = []

    def __init__(self, model, **kw):
        from apo.model.loading import load_model

        self.kw = dict(model=model, **kw)
        self.model, self.processor = load_model(model)
        self.calls = []
        FakeLLM.instances.append(self)

    def generate(self, inputs, params, lora_request=None, use_tqdm=True):
        import torch

        self.calls.append((inputs, params, lora_request))
        outs = []
        for x in inputs:
            images = x.get("multi_modal_data", {}).get("image")
            images = images if isinstance(images, list) or images is None else [images]
            enc = self.processor(text=[x["prompt"]], images=images, return_tensors="pt")
            assert params.temperature == 0.0  # greedy
            with torch.inference_mode():
                seq = self.model.generate(
                    **enc,
                    max_new_tokens=params.max_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=0,
                )
            text = self.processor.tokenizer.decode(seq[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text)]))
        return outs


class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, i, path: ("lora", name, i, path)
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    FakeLLM.instances.clear()
    return FakeLLM


def test_vllm_backend_writes_what_the_hf_backend_writes(tmp_path, tiny_model_dir, fake_vllm):
    data = write_dataset(tmp_path, n_cases=3, repeat=1)
    common = [
        "consensus",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--max-new-tokens",
        "6",
        "--max-length",
        "1500",
    ]
    assert main([*common, "--out", str(tmp_path / "hf.jsonl"), "--batch-size", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "vllm.jsonl"), "--backend", "vllm", "--batch-size", "2"]) == 0
    assert (tmp_path / "vllm.jsonl").read_bytes() == (tmp_path / "hf.jsonl").read_bytes()
    (llm,) = fake_vllm.instances
    assert llm.kw["max_model_len"] == 1500 and llm.kw["limit_mm_per_prompt"] == {"image": 4}
    assert "enable_lora" not in llm.kw
    inputs, params, lora = llm.calls[0]
    assert lora is None and params.max_tokens == 6
    assert inputs[0]["prompt"].count("<|image_pad|>") == 1 and inputs[0]["prompt"].endswith("assistant\n")
    recs = [json.loads(l) for l in (tmp_path / "vllm.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in recs] == ["c0", "c1", "c2"]


def test_vllm_backend_serves_an_adapter_as_lora(tmp_path, tiny_model_dir, fake_vllm):
    from apo.model.generation import VllmEngine, generate

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 32, "target_modules": ["q_proj"]}))
    engine = VllmEngine(str(tiny_model_dir), str(adapter))
    assert engine.llm.kw["enable_lora"] is True and engine.llm.kw["max_lora_rank"] == 32
    data = write_dataset(tmp_path, n_cases=2, repeat=1)
    img = str(tmp_path / "img" / "0.png")
    answers = generate(engine, engine.processor, [([img, img], "two views?"), ([], "no image?")], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    inputs, _, lora = engine.llm.calls[0]
    assert lora == ("lora", "adapter", 1, str(adapter))
    assert len(inputs[0]["multi_modal_data"]["image"]) == 2 and inputs[0]["prompt"].count("<|image_pad|>") == 2
    assert "multi_modal_data" not in inputs[1]

    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "modules_to_save": ["embed_tokens"]}))
    with pytest.raises(ApoError, match="merge it"):
        VllmEngine(str(tiny_model_dir), str(adapter))
    assert data.exists()


def test_vllm_backend_errors_are_clear(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from apo.model.generation import VllmEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed: import fails
    data = write_dataset(tmp_path, n_cases=1, repeat=1)
    assert (
        main(
            [
                "consensus",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(data),
                "--out",
                str(tmp_path / "x.jsonl"),
                "--backend",
                "vllm",
            ]
        )
        == 2
    )
    assert "pip install -e '.[vllm]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    sys.modules["vllm"].LLM = FakeLLM
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(ApoError, match="without torchrun"):
        VllmEngine(str(tiny_model_dir))
