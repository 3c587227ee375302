"""A setting a class's constructor refuses is one ``train.py: error:`` line naming it (issue 33, W-16 follow-up).

jsonargparse instantiates the config's classes and wraps what a constructor raises in its own Union error; train.py
unwraps a :class:`~core.errors.UserError` to its one line, but a plain ``ValueError`` came out as "Does not validate
against any of the Union subtypes" and ~80 lines of traceback. Each case is a shipped demo config with one bad value.
"""
from __future__ import annotations

import re

import pytest

from conftest import train_in_process


@pytest.fixture(scope="module")
def laion_root(tmp_path_factory) -> str:
    """A folder for the projection demo's synthetic captions: written once, by the first case that builds its data."""
    return str(tmp_path_factory.mktemp("laion_synthetic"))


CASES = [  # config, the bad settings, the start of the one error line (after "train.py: error: ")
    ("demo", ["--data.init_args.findings", "[Nonsense]"], "findings: unknown CheXpert class(es) ['Nonsense']"),
    ("demo", ["--data.init_args.findings", "[No Finding, Fracture]",
              "--data.init_args.prompt_templates", "{No Finding: a chest x-ray, Fracture: a fracture}"],
     "findings ['Fracture'] have no phantoms"),
    ("demo", ["--data.init_args.phantom_size", "16"], "phantom_size: 16; expected at least 32 pixels"),
    ("demo", ["--data.init_args.train_split", "training"], "train_split: 'training'; expected one of"),
    ("demo", ["--data.init_args.prompt_templates", "{No Finding: a chest x-ray}"],
     "prompt_templates has no prompt for finding(s) ['Pleural Effusion']"),
    ("demo", ["--data.init_args.prompt_templates", "{No Finding: a chest x-ray, Pleural Effusion: ' '}"],
     "prompt_templates: the prompt for ['Pleural Effusion'] is empty"),
    ("demo", ["--trainer.callbacks.init_args.prompts", "[]"], "prompts: SampleGrid needs at least one prompt"),
    ("unet_text_encoder_demo", ["--model.init_args.text_encoder_layers", "99"],
     "text_encoder_layers: 99; the text encoder of 'tiny-phantom' has"),
    ("projection_demo", ["--data.init_args.val_captions", "-1"], "val_captions: -1; expected 0 or more"),
    ("projection_demo", ["--data.init_args.max_captions", "0"], "max_captions: 0; expected at least 1"),
    ("projection_demo", ["--data.init_args.min_length", "20", "--data.init_args.max_length", "10"],
     "min_length 20 is larger than max_length 10"),
    ("projection_demo", ["--model.init_args.domain_encoder.max_length", "2"], "max_length: 2 leaves no room"),
]


@pytest.mark.parametrize("config, bad, message", CASES, ids=[" ".join(bad) for _, bad, _ in CASES])
def test_a_setting_a_constructor_refuses_is_one_line_naming_it_and_makes_no_run(tmp_path, laion_root, config, bad, message):
    runs = tmp_path / "runs"
    data = ["--data.init_args.root", laion_root] if config == "projection_demo" else []
    code, _, err = train_in_process("--config", config, "--runs_dir", str(runs), "--run_name", "e", *data, *bad)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 1 and "Traceback" not in err and "Does not validate" not in err, err[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"train.py: error: {message}"), err[-3000:]
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("module, name, settings, error, message", [
    ("lightning_modules.unet_text_encoder", "UNetTextEncoderFineTuning", {"text_encoder_learning_rate": -1.0},
     "ModuleConfigError", "text_encoder_learning_rate: -1.0; expected a positive rate"),
    ("datamodules.laion", "LAIONCaptionDataModule", {"data_files": "captions", "batch_size": 0}, "LAIONDataError",
     "batch_size: 0; expected at least 1"),
    ("callbacks.sample_grid", "SampleGrid", {"prompts": []}, "SampleGridError", "prompts: SampleGrid needs"),
], ids=["text_encoder_learning_rate", "LAION batch_size", "SampleGrid prompts"])
def test_the_refusals_are_user_errors_and_still_value_errors(module, name, settings, error, message):
    """From Python (on the command line train.py's own start checks refuse the first two settings before any class is
    built): the refusal is its module's UserError, which every entry point prints as one line, and still a ValueError
    for callers that catch that."""
    import importlib

    from core.errors import UserError

    code = importlib.import_module(module)
    with pytest.raises(getattr(code, error), match=re.escape(message)) as caught:
        getattr(code, name)(**settings)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


def test_a_refused_synthetic_laion_start_writes_no_captions(tmp_path):
    """The demo LAION data module checks its settings before it writes its made-up captions: a refused start leaves
    no ``root`` behind."""
    from datamodules.laion import LAIONDataError
    from synthetic.laion import SyntheticLAIONDataModule

    root = tmp_path / "laion_synthetic"
    with pytest.raises(LAIONDataError, match="val_captions: -1"):
        SyntheticLAIONDataModule(root=str(root), n_captions=20, val_captions=-1)
    assert not root.exists() and not list(tmp_path.iterdir())
