"""The public API: `from apo import ...` names, lazily (no torch for `import apo`), with runnable docstrings."""

import doctest
import subprocess
import sys

import pytest

import apo

PUBLIC = {
    "plackett_luce_loss": "apo.loss",
    "dpo_loss": "apo.loss",
    "APOConfig": "apo.trainer.config",
    "APOTrainer": "apo.trainer.trainer",
    "GroupCollator": "apo.trainer.collator",
    "PackedGroupCollator": "apo.model.packing",
    "load_groups": "apo.trainer.collator",
    "build_model": "apo.trainer.trainer",
}


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_apo_and_synth_help_do_not_import_torch():
    probe = "import sys, apo; print('torch' in sys.modules, sorted(apo.__all__) == apo.__all__)"
    assert _run(probe).stdout.split() == ["False", "True"]
    help_probe = (
        "import sys\nfrom apo.cli import main\n"
        "try:\n    main(['synth', '--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    out = _run(help_probe)
    assert "--out" in out.stdout and out.stdout.split()[-1] == "False", out.stderr[-2000:]
    # and the lazy names do import it when used
    assert (
        _run("import sys; from apo import plackett_luce_loss; print('torch' in sys.modules)").stdout.strip() == "True"
    )


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_are_the_library_objects(name):
    import importlib

    assert getattr(apo, name) is getattr(importlib.import_module(PUBLIC[name]), name)
    assert name in dir(apo) and name in apo.__all__
    assert getattr(apo, name).__doc__, f"{name} needs a docstring"


def test_unknown_names_and_submodules():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        apo.nope  # noqa: B018
    from apo import consensus  # a submodule, not a public name: still importable as before

    assert consensus.__name__ == "apo.consensus"


def test_loss_docstring_examples_run():
    import apo.loss

    result = doctest.testmod(apo.loss, raise_on_error=False)
    assert result.attempted >= 8 and result.failed == 0


def test_docstrings_give_shapes():
    assert "[B, 1+N]" in apo.plackett_luce_loss.__doc__ and "[R, T]" in apo.GroupCollator.__doc__
    assert "[1, T]" in apo.PackedGroupCollator.__doc__ and "APOTrainer(model=model" in apo.APOTrainer.__doc__


def test_trainer_example_from_own_code(tiny_model_dir, tmp_path):
    """The APOTrainer docstring's example, on the tiny model: two steps, the adapter saved."""
    from trainer_helpers import make_groups

    from apo import APOConfig, APOTrainer, build_model, load_groups

    config = APOConfig(
        output_dir=str(tmp_path / "run"),
        model_name_or_path=str(tiny_model_dir),
        groups_file=str(make_groups(tmp_path, n_groups=2)),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_length=1024,
    )
    model, processor = build_model(config)
    trainer = APOTrainer(
        model=model, args=config, train_dataset=load_groups(config.groups_file), processing_class=processor
    )
    trainer.train()
    trainer.save_final()
    assert trainer.state.global_step == 2 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
