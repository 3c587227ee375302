"""The end of a finished train.py run: what it left (checkpoint, grids, fid.csv, losses, W&B) and the commands that come
next, read from the run folder; and the start of a run without Lightning's FLOPs column or W&B's anonymous warning."""
from __future__ import annotations

import logging
import os
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from callbacks.fid import FIDCallback
from callbacks.run_summary import ParameterSummary, end_of_run_summary
from core.run_folder import RunFolder

EFFUSION = "a photo of a lung xray with a visible pleural effusion"


def fid_row(step: int, prompt: str, fid: float, reference: str = "No Finding") -> dict:
    return {"step": step, "prompt": prompt, "reference": reference, "fid": fid, "n_generated": 8, "n_real": 5,
            "features": "classifier", "weights": "trained"}


def item(summary: str, name: str) -> str:
    """The summary's line for ``name`` (``checkpoint``, ``samples``, ...)."""
    return next(line for line in summary.splitlines() if line.strip().startswith(name))


def next_commands(summary: str) -> list[str]:
    lines = summary.splitlines()
    return [line.strip() for line in lines[lines.index("next:") + 1:]]


@pytest.mark.slow  # the trained reference run
def test_the_summary_of_a_finished_run_names_what_it_left_and_what_comes_next(reference_run, tmp_path):
    run = tmp_path / "ref"
    shutil.copytree(reference_run, run)  # a copy: fid.csv is added below, the shared run stays as it is
    # the FID callback's own writer, two validations: the summary shows the last value of each prompt
    FIDCallback._append_csv(run / "fid.csv", [fid_row(12, "a photo of a lung xray", 250.0),
                                              fid_row(12, EFFUSION, 240.0, "Pleural Effusion")])
    FIDCallback._append_csv(run / "fid.csv", [fid_row(24, "a photo of a lung xray", 150.25),
                                              fid_row(24, EFFUSION, 140.5, "Pleural Effusion")])

    summary = end_of_run_summary(RunFolder(run))
    lines = summary.splitlines()
    assert lines[0] == f"run folder: {run}" and len(lines) <= 15

    assert f"{run / 'checkpoints' / 'last.ckpt'} (step 24," in item(summary, "checkpoint")
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids and all(name in item(summary, "samples") for name in grids)
    fid = [line for line in lines if "(step " in line and "generated" in line]
    assert len(fid) == 2 and "150.25  a photo of a lung xray " in fid[0] and "140.50  " + EFFUSION in fid[1]
    assert all("(step 24, N = 8 generated / 5 real)" in line for line in fid) and "250.00" not in summary
    assert f"{run / 'fid.csv'}" in item(summary, "FID") and "classifier features" in item(summary, "FID")
    last = (run / "losses.csv").read_text().splitlines()[-1].split(",")
    assert f"last loss {float(last[2]):.4f} at step {last[1]}" in item(summary, "losses")
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    sync = item(summary, "W&B").split("wandb sync ")[1]
    assert sync.endswith(run_id) and Path(sync).is_dir() and Path(sync).parent == run / "wandb"

    generate_cmd, export_cmd, study = next_commands(summary)
    import generate

    args = generate.build_parser().parse_args(shlex.split(generate_cmd)[2:])  # the flags shown are generate.py's
    assert Path(args.run) == run and args.prompt == [EFFUSION] and args.out == "generated/ref"
    assert shlex.split(export_cmd) == ["python", "export.py", str(run), "exported/ref"]
    assert shlex.split(study) == ["python", "-m", "synthetic.finding_correctness_demo", str(run)]  # a tiny-phantom U-Net


def test_a_run_folder_missing_its_files_gives_na_lines_not_a_crash(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    summary = end_of_run_summary(RunFolder(run))
    for name in ("checkpoint", "samples", "FID", "losses", "W&B"):
        assert "n/a" in item(summary, name), summary
    assert "no fid.csv" in item(summary, "FID") and "no grids" in item(summary, "samples")
    # no config: the commands still name the folder
    assert [c.split()[1] for c in next_commands(summary)] == ["generate.py", "export.py", "evaluate.py"]
    assert all(str(run) in c for c in next_commands(summary))

    # present but unreadable: said, never raised
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    (run / "fid.csv").write_text("step,prompt\n12\n")
    (run / "losses.csv").write_text("batch,step,loss\n0,1\n")
    summary = end_of_run_summary(RunFolder(run), wandb_mode="disabled")
    assert "step n/a" in item(summary, "checkpoint")
    assert "unreadable" in item(summary, "FID") and "unreadable" in item(summary, "losses")
    assert item(summary, "W&B").split(None, 1)[1] == "disabled (--wandb_mode disabled)"


def write_config(run: Path, model_class: str, pretrained: str, data_class: str, root: str) -> RunFolder:
    run.mkdir(parents=True)
    config = {"model": {"class_path": model_class, "init_args": {"model": {"pretrained": pretrained}}},
              "data": {"class_path": data_class, "init_args": {"root": root}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return RunFolder(run)


def test_the_next_study_matches_the_run(tmp_path):
    # a real run on MIMIC: the generation study on its data and base model
    real = write_config(tmp_path / "runs" / "unet", "lightning_modules.unet.UNetFineTuning", "CompVis/stable-diffusion-v1-4",
                        "datamodules.mimic_cxr.MIMICCXRDataModule", "/data/mimic-cxr-jpg")
    study = shlex.split(next_commands(end_of_run_summary(real))[2])
    assert study[:3] == ["python", "evaluate.py", "generation"]
    flags = dict(zip(study[3::2], study[4::2]))
    assert flags == {"--mimic_root": "/data/mimic-cxr-jpg", "--base": "CompVis/stable-diffusion-v1-4",
                     "--runs": str(real.path), "--out": "studies/generation_unet"}

    # a textual-inversion demo: its token in the generate prompt, the generation study (the finding-correctness demo
    # asks plain prompts, which a textual-inversion model answers as its base model)
    ti = write_config(tmp_path / "runs" / "ti", "lightning_modules.textual_inversion.TextualInversion", "tiny-phantom",
                      "synthetic.phantoms.PhantomCXRDataModule", "data/phantoms")
    generate_cmd, _, study = next_commands(end_of_run_summary(ti, subject="<lung-xray>"))
    assert "--prompt 'a photo of a <lung-xray> with a visible pleural effusion'" in generate_cmd
    assert study.startswith("python evaluate.py generation --mimic_root data/phantoms --split all --base tiny-phantom "
                            f"--runs {ti.path} ") and "--classifier tiny-phantom" in study


def test_the_start_of_a_run_has_no_flops_column_and_no_anonymous_warning(tmp_path, caplog, capfd, monkeypatch):
    import torch
    from lightning.pytorch import LightningModule, Trainer

    import train

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.trained, self.frozen = torch.nn.Linear(10, 10), torch.nn.Linear(10, 2)
            self.frozen.requires_grad_(False)

    summary = ParameterSummary()
    with caplog.at_level(logging.INFO):
        summary.on_fit_start(Trainer(accelerator="cpu", logger=False, enable_progress_bar=False), Tiny())
    assert "Tiny: 110 trained parameters, 22 frozen (132 in all, 0.0 MB)" in caplog.text
    assert "FLOPs" not in caplog.text and "Flops" not in caplog.text

    # W&B's own warning, as a user sees it (WANDB_SILENT, set for the suite, would hide it)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    logger = train.wandb_logger(RunFolder(tmp_path / "w"), "offline", "cxr-test", None)
    try:
        logger.experiment
    finally:
        import wandb

        wandb.finish()
        wandb.teardown()  # stop this process's W&B service, and never hand it (WANDB_SERVICE) to later tests' train.py
        os.environ.pop("WANDB_SERVICE", None)  # subprocesses: a resumed run would find its run id "in use" there
    err = capfd.readouterr()
    assert "anonymous" not in err.out + err.err
    assert "offline" in err.out + err.err  # W&B did print its start lines
