"""train.py end to end: the demo run, its folder, resume, export and CLI errors (runs in subprocesses; errors at start
and --print_config in this process)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest
import torch
import yaml

from callbacks.loss_log import read_loss_log
from conftest import PYTHON, REPO, demo_args, run_train, train_and_signal, train_in_process


@pytest.mark.slow
def test_reference_run_leaves_a_complete_run_folder(reference_run):
    ckpt = reference_run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert sorted(p.name for p in (reference_run / "samples").glob("*.png")) == ["step_000012.png", "step_000024.png"]
    offline = list((reference_run / "wandb").glob("offline-run-*"))
    run_id = (reference_run / "wandb_run_id.txt").read_text().strip()
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    config = yaml.safe_load((reference_run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "lightning_modules.unet.UNetFineTuning"
    assert config["trainer"]["max_steps"] == 24
    provenance = json.loads((reference_run / "provenance.json").read_text())["records"]
    assert provenance[0]["what"] == "train" and provenance[0]["packages"]["torch"]
    assert "commit" in provenance[0]["git"] and provenance[0]["settings"]["seed_everything"] == 0
    assert "WANDB_API_KEY" not in (reference_run / "config.yaml").read_text()


@pytest.mark.slow
def test_loss_log_has_every_batch(reference_run):
    losses = read_loss_log(reference_run / "losses.csv")
    assert sorted(losses) == list(range(24)) and all(v > 0 for v in losses.values())


@pytest.mark.slow
def test_checkpoint_holds_only_the_unet(reference_run):
    checkpoint = torch.load(reference_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all(k.startswith("sd.unet.") for k in keys)
    assert checkpoint["global_step"] == 24 and checkpoint["optimizer_states"]


def _same_as_reference(reference_run, run_dir):
    assert read_loss_log(run_dir / "losses.csv") == read_loss_log(reference_run / "losses.csv")  # exact, every step
    a = torch.load(reference_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(reference_run, tmp_path):
    """kill -9 after the step-10 checkpoint (mid-way to the next): resume from it and end where the reference ends.
    The first start already passes --ckpt_path last (as a requeue script does): with no checkpoint it starts fresh.
    Both starts use two dataloader workers (the reference uses none): the same batches arrive in the same order,
    so on one CPU process the losses are still exactly equal."""
    common = demo_args(tmp_path, "--run_name", "killed", "--trainer.callbacks=[]", "--wandb_mode", "disabled",
                       "--data.init_args.num_workers", "2")
    run = tmp_path / "runs" / "killed"
    code, out, _ = train_and_signal([*common, "--trainer.max_steps", "24", "--ckpt_path", "last"], run / "losses.csv",
                                    signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert f"no checkpoint in {run / 'checkpoints'}: starting fresh" in out
    # the kill may land inside a save: last.ckpt is then the previous, complete checkpoint
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] in (5, 10, 15, 20)
    proc = run_train(*common, "--trainer.max_steps", "24", "--ckpt_path", "last")
    assert "resuming" in proc.stdout
    assert "not resumable" not in proc.stderr  # Lightning's warning does not apply to the suite's sampler (silenced)
    _same_as_reference(reference_run, run)
    # a half-written file was cleaned up; the checkpoint before the last is kept as a fall-back
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "last.prev.ckpt"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_is_bit_identical(reference_run, tmp_path):
    """SIGTERM (SLURM pre-emption): the run saves last.ckpt at the batch it finished and exits 143; resuming
    ends where the reference ends and continues the same W&B run. The W&B key in the environment is written
    nowhere in the run folder."""
    secret = "wandb-key-0123456789abcdef-must-not-leak"
    common = demo_args(tmp_path, "--run_name", "preempted", "--trainer.callbacks=[]", "--wandb_mode", "offline")
    run = tmp_path / "runs" / "preempted"
    code, _, err = train_and_signal([*common, "--trainer.max_steps", "24"], run / "losses.csv", signal.SIGTERM,
                                    env={"WANDB_API_KEY": secret})
    assert code == 143, err[-3000:]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 10 <= step < 24 and f"received SIGTERM: saved {run / 'checkpoints' / 'last.ckpt'} at step {step}" in err
    proc = run_train(*common, "--trainer.max_steps", "24", "--ckpt_path", "last")
    assert f"from {run / 'checkpoints' / 'last.ckpt'}" in proc.stdout
    _same_as_reference(reference_run, run)
    leaked = [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, leaked
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    starts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(r.name.endswith(run_id) for r in starts)  # one W&B run, two starts


@pytest.mark.slow
def test_existing_run_is_not_overwritten_by_accident(reference_run, tmp_path):
    shutil.copytree(reference_run, tmp_path / "runs" / "ref")
    code, _, err = train_in_process(*demo_args(tmp_path, "--run_name", "ref", "--trainer.max_steps", "2"))
    assert code != 0 and "already holds checkpoints" in err and "--ckpt_path last" in err


@pytest.mark.slow
def test_export_reloads_in_plain_diffusers_and_generates(reference_run, tmp_path):
    out = tmp_path / "export"
    subprocess.run([PYTHON, str(REPO / "export.py"), str(reference_run), str(out)], check=True, capture_output=True, cwd=REPO)
    assert list((out / "unet").glob("*.safetensors")) and not list(out.rglob("*.bin"))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    image = pipe("a photo of a lung xray", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    trained = torch.load(reference_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["sd.unet.conv_in.weight"]
    assert torch.equal(pipe.unet.conv_in.weight, trained)


def test_export_of_a_run_without_checkpoint_is_a_clear_error(tmp_path):
    import export

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        export.main([str(tmp_path / "empty"), str(tmp_path / "out")])
    assert "export.py: error:" in str(exit_.value.code) and "no checkpoint" in str(exit_.value.code)


# DDP with two CPU processes: tests/test_fid_callback.py::test_ddp_two_processes_shard_generation_and_agree trains the
# demo there (the U-Net, its checkpoint and the FID callback's sharding in one run).


def test_unknown_config_key_fails_at_start(tmp_path):
    code, _, err = train_in_process(*demo_args(tmp_path, "--model.init_args.learning_rat", "0.1"))
    assert code != 0 and "learning_rat" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_wrong_type_in_the_config_fails_at_start_naming_key_and_value(tmp_path):
    code, _, err = train_in_process(*demo_args(tmp_path, "--trainer.max_steps", "ten"))
    assert code != 0 and "max_steps" in err and "ten" in err


def test_unknown_config_name_lists_the_known_ones(tmp_path):
    code, _, err = train_in_process("--config", "unet_priro")
    assert code != 0 and "unet_prior" in err


@pytest.mark.parametrize("name", ["unet_no_findings", "unet", "unet_prior", "demo"])
def test_shipped_configs_validate(name):
    code, out, err = train_in_process("--config", name, "--print_config")
    assert code == 0, err
    config = yaml.safe_load(out)
    assert config["model"]["class_path"] == "lightning_modules.unet.UNetFineTuning"
    if name != "demo":
        assert config["trainer"]["max_steps"] == 400
        assert config["model"]["init_args"]["model"]["pretrained"] == "CompVis/stable-diffusion-v1-4"
