"""train.py's start, third pass (issue 33): a start refused before training records nothing and leaves no new folder,
run names stay inside --runs_dir, the monitor's impossible thresholds and its stop (exit status, resume), LoRA's alpha
and what a LoRA resume must keep, and one line for a class's own error inside jsonargparse. Each test reproduces the
case as a user meets it."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import demo_args, train_in_process

PHANTOM = {"pretrained": "tiny-phantom"}


def one_error_line(err: str) -> str:
    """The ``train.py: error:`` line of a refused start, after checking it is the only one and no traceback came."""
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def files_of(run: Path) -> dict:
    """Every file of a run folder but its lock, and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------------------------------------- W-2: nothing before training
def phantoms_with_a_repeated_row(tmp: Path) -> Path:
    """The demo's phantom folder (as PhantomCXRDataModule writes it for demo_args) with one metadata row twice."""
    from datamodules import mimic_cxr
    from synthetic.phantoms import PhantomCXRDataModule

    root = tmp / "phantoms"
    PhantomCXRDataModule(root=str(root), n_per_finding=6)._ensure_data()
    metadata = pd.read_csv(root / mimic_cxr.METADATA_CSV, dtype={"dicom_id": str})
    pd.concat([metadata, metadata.iloc[[0]]]).to_csv(root / mimic_cxr.METADATA_CSV, index=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["a monitor that cannot calibrate", "a repeated CSV row"])
def test_a_start_refused_after_the_lock_leaves_no_run_folder(tmp_path, cause):
    """Refused in the trainer's setup (W&B already started, then the datamodule or the monitor's calibration): one line,
    and no config.yaml, configs/, provenance.json, .lock or W&B files, i.e. no folder at all."""
    if cause == "a repeated CSV row":
        phantoms_with_a_repeated_row(tmp_path)
        extra, expected = [], "appear on more than one row"
    else:  # 2 validation phantoms; the 0.99 quantile needs 200
        extra = ["--trainer.callbacks=[]", "--trainer.callbacks+=callbacks.memorization.MemorizationMonitor",
                 "--trainer.callbacks.init_args.quantile", "0.99"]
        expected = "calibrating the copy threshold at quantile 0.99 needs at least 200"
    code, _, err = train_in_process(*demo_args(tmp_path, "--run_name", "new", "--trainer.max_steps", "2", *extra))
    assert code == 1 and expected in one_error_line(err)
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step LoRA demo run (no prior preservation, no W&B): ``(its run folder, the phantom folder it trained on)``."""
    tmp = tmp_path_factory.mktemp("lora_run")
    code, _, err = train_in_process(*lora_args(tmp / "runs", tmp / "phantoms"))
    assert code == 0, err[-3000:]
    return tmp / "runs" / "lora", tmp / "phantoms"


def lora_args(runs: Path, phantoms: Path, *extra: str) -> list[str]:
    return ["--config", "lora_unet_demo", "--runs_dir", str(runs), "--run_name", "lora", "--data.init_args.root", str(phantoms),
            "--data.init_args.n_per_finding", "6", "--model.init_args.prior_preservation", "null", "--trainer.callbacks=[]",
            "--wandb_mode", "disabled", "--trainer.max_steps", "2", *extra]


@pytest.fixture
def lora_copy(lora_run, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the LoRA run, and the arguments that resume it to step 4."""
    run, phantoms = lora_run
    copy = tmp_path / "runs" / "lora"
    shutil.copytree(run, copy)
    return copy, lora_args(copy.parent, phantoms, "--trainer.max_steps", "4", "--ckpt_path", "last")


@pytest.mark.slow
def test_a_resume_refused_at_the_start_of_fit_records_nothing(lora_copy):
    """Refused by the monitor's calibration, after the resume checks passed: no configs/start-2.yaml, no second provenance
    record; the folder is byte-identical."""
    run, args = lora_copy
    before = files_of(run)
    code, _, err = train_in_process(*args, "--trainer.callbacks+=callbacks.memorization.MemorizationMonitor",
                                    "--trainer.callbacks.init_args.quantile", "0.99")
    assert code == 1 and "needs at least 200" in one_error_line(err)
    assert files_of(run) == before and sorted(p.name for p in (run / "configs").iterdir()) == ["start-1.yaml"]


# ---------------------------------------------------------------------------------------------- W-4: run names
@pytest.mark.parametrize("name", ["../../x", "../x", "a/b", "ABSOLUTE", "..", "."])
def test_a_run_name_that_leaves_the_runs_folder_is_refused(tmp_path, name):
    """Refused before anything is made, not even --runs_dir (the settings make a start that is not refused a short one)."""
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    runs = tmp_path / "deep" / "runs"
    code, _, err = train_in_process(*demo_args(tmp_path, "--runs_dir", str(runs), "--run_name", name, "--trainer.max_steps", "1",
                                               "--model.init_args.prior_preservation", "null", "--trainer.callbacks=[]",
                                               "--wandb_mode", "disabled"))
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"train.py: error: --run_name {name}: a run name is one folder name inside --runs_dir")
    assert "pass --runs_dir" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder anywhere, not even the runs folder


# ---------------------------------------------------------------------------------------------- W-8: monitor thresholds
@pytest.mark.parametrize("threshold", [5.0, -1.5, math.nan, math.inf])
def test_a_monitor_threshold_no_similarity_can_reach_is_refused(threshold):
    from callbacks.memorization import MemorizationMonitor, MemorizationMonitorError

    with pytest.raises(MemorizationMonitorError, match=rf"MemorizationMonitor: threshold {threshold}; expected a similarity "
                                                       r"in \[-1, 1\]"):
        MemorizationMonitor(threshold=threshold)
    assert MemorizationMonitor(threshold=-1.0).threshold == -1.0 and MemorizationMonitor(threshold=1.0).threshold == 1.0


def test_a_monitor_threshold_of_5_is_one_line_at_start(tmp_path):
    code, _, err = train_in_process(*demo_args(tmp_path, "--run_name", "m", "--trainer.max_steps", "1", "--trainer.callbacks=[]",
                                               "--trainer.callbacks+=callbacks.memorization.MemorizationMonitor",
                                               "--trainer.callbacks.init_args.threshold", "5.0"))
    assert code == 1 and "MemorizationMonitor: threshold 5.0; expected a similarity in [-1, 1]" in one_error_line(err)
    assert not (tmp_path / "runs" / "m").exists()


# ---------------------------------------------------------------------------------------------- W-9: the monitor's stop
def test_the_monitors_stop_is_kept_in_its_state_and_found_in_a_checkpoint():
    from callbacks.memorization import MemorizationMonitor, monitor_stop

    monitor = MemorizationMonitor(threshold=-1.0, stop_above=0.5)
    assert monitor.state_dict() == {} and monitor_stop({"callbacks": {"MemorizationMonitor": {}}}) is None
    monitor.stopped_at, monitor.stop_rate = 6, 1.0
    checkpoint = {"callbacks": {"LossLog": {"rows": 3}, monitor.state_key: monitor.state_dict()}}
    assert monitor_stop(checkpoint) == {"stopped_at": 6, "copy_rate": 1.0, "stop_above": 0.5}


@pytest.mark.slow
def test_a_run_the_monitor_stopped_exits_3_and_is_resumed_only_when_told(lora_run, tmp_path):
    """Every image a copy (threshold -1): the monitor stops at step 1 and the run exits 3 with last.ckpt saved. A requeue
    with --ckpt_path last is refused (one line naming --ignore_monitor_stop, nothing written); with the flag it trains
    on."""
    import train

    _, phantoms = lora_run
    monitor = ["--trainer.callbacks+=callbacks.memorization.MemorizationMonitor", "--trainer.callbacks.init_args.threshold",
               "-1.0", "--trainer.callbacks.init_args.stop_above", "0.5", "--trainer.callbacks.init_args.every_n_steps", "1",
               "--trainer.callbacks.init_args.n_per_prompt", "1", "--trainer.callbacks.init_args.steps", "2"]
    args = lora_args(tmp_path / "runs", phantoms, "--trainer.max_steps", "4", *monitor)
    code, _, err = train_in_process(*args)
    run = tmp_path / "runs" / "lora"
    assert code == 3 == train.EXIT_MONITOR_STOP and "stopped by the MemorizationMonitor at step 1 (exit 3)" in err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    before = files_of(run)
    code, _, err = train_in_process(*args, "--ckpt_path", "last")
    line = one_error_line(err)
    assert code == 1 and "the MemorizationMonitor stopped this run at step 1 (copy rate 1.000 above stop_above=0.5)" in line
    assert "Pass --ignore_monitor_stop" in line and files_of(run) == before
    code, _, err = train_in_process(*lora_args(tmp_path / "runs", phantoms, "--trainer.max_steps", "4", "--ckpt_path", "last",
                                               "--ignore_monitor_stop"))
    assert code == 0, err[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


# ---------------------------------------------------------------------------------------------- W-13: LoRA alpha
@pytest.mark.parametrize("alpha", [0, -4.0, math.nan])
def test_a_lora_alpha_of_zero_or_less_is_refused(alpha):
    from lightning_modules.lora import LoRAConfigError, LoRAFineTuning

    with pytest.raises(LoRAConfigError, match=rf"alpha: {alpha!r}; expected a positive scale \(or null: the rank\)"):
        LoRAFineTuning(model=PHANTOM, rank=4, alpha=alpha)


def test_only_an_unset_lora_alpha_means_the_rank(tmp_path):
    from lightning_modules.lora import LoRAFineTuning

    unset, given = LoRAFineTuning(model=PHANTOM, rank=4), LoRAFineTuning(model=PHANTOM, rank=4, alpha=0.5)
    assert unset.lora_alpha == 4 and given.lora_alpha == 0.5
    assert given.sd.unet.peft_config["default"].lora_alpha == 0.5  # not the rank, as `alpha or rank` made 0
    code, _, err = train_in_process(*demo_args(tmp_path, "--run_name", "a0", "--model.init_args.alpha", "0",
                                               config="lora_unet_demo"))
    assert code == 1 and "alpha: 0.0; expected a positive scale" in one_error_line(err)


# ---------------------------------------------------------------------------------------------- W-14, W-15: LoRA resume
def lora_checkpoint(module) -> dict:
    """What train.py's checkpoint of ``module`` holds for the resume checks: trained tensors and hyperparameters."""
    state = module.state_dict()
    keys = module.trained_state_keys()
    return {"state_dict": {k: state[k] for k in keys}, "trained_keys": keys, "hyper_parameters": dict(module.hparams)}


@pytest.fixture(scope="module")
def rank_4_checkpoint() -> dict:
    from lightning_modules.lora import LoRAFineTuning

    return lora_checkpoint(LoRAFineTuning(model=PHANTOM, rank=4))


@pytest.mark.parametrize("change, named", [({"rank": 8}, "rank 4 → 8; alpha 4 → 8"), ({"alpha": 16.0}, "alpha 4 → 16.0"),
                                           ({"dropout": 0.1}, "dropout 0.0 → 0.1"),
                                           ({"target_modules": ["to_q", "to_v"]}, "target_modules ['to_q', 'to_k', 'to_v', 'to_out.0'] → ['to_q', 'to_v']"),
                                           ({"alpha": 4}, None)])  # alpha unset is the rank: the same scale
def test_a_lora_checkpoint_resumed_with_other_adapter_settings_is_refused_naming_them(rank_4_checkpoint, change, named):
    from lightning_modules.base import TrainedStateMismatch
    from lightning_modules.lora import LoRAFineTuning

    module = LoRAFineTuning(model=PHANTOM, **{"rank": 4, **change})
    if named is None:
        module.check_resumable(rank_4_checkpoint)
        return
    with pytest.raises(TrainedStateMismatch) as err:
        module.check_resumable(rank_4_checkpoint)
    assert str(err.value).startswith("the checkpoint was trained with other LoRAFineTuning settings than this configuration "
                                     f"gives: {named}. A resumed run must keep them")
    assert "\n" not in str(err.value)


def test_trained_tensors_of_another_shape_are_refused_before_loading(rank_4_checkpoint):
    """A checkpoint without the settings (hyperparameters): the shapes still refuse it, naming one, not torch's
    size-mismatch traceback."""
    from lightning_modules.base import TrainedStateMismatch
    from lightning_modules.lora import LoRAFineTuning

    saved = {k: v for k, v in rank_4_checkpoint.items() if k != "hyper_parameters"}
    with pytest.raises(TrainedStateMismatch, match=r"the checkpoint's trained tensors have other shapes than this "
                                                   r"configuration's \(\d+ differ, e.g. sd\.unet\.\S+ \[4, \d+\] → \[8, \d+\]\)"):
        LoRAFineTuning(model=PHANTOM, rank=8).check_resumable(saved)


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [(["--model.init_args.rank", "8"], "rank 4 → 8; alpha 4 → 8"),
                                           (["--model.init_args.alpha", "16"], "alpha 4 → 16.0"),
                                           (["--model.init_args.dropout", "0.1"], "dropout 0.0 → 0.1")])
def test_a_lora_run_resumed_with_another_rank_alpha_or_dropout_is_one_line_and_writes_nothing(lora_copy, change, named):
    run, args = lora_copy
    before = files_of(run)
    code, _, err = train_in_process(*args, *change)
    assert code == 1 and f"other LoRAFineTuning settings than this configuration gives: {named}." in one_error_line(err)
    assert files_of(run) == before


# ---------------------------------------------------------------------------------------------- W-16: errors inside jsonargparse
@pytest.mark.parametrize("config, extra, message", [
    ("demo", ["--model.init_args.ema", "{decay: 1.5}"], "train.py: error: ema.decay: 1.5; expected a value in (0, 1]"),
    ("projection_demo", ["--model.init_args.ema", "{decay: 0.9}", "--model.init_args.projection", "none"],
     "train.py: error: ema: TextualProjection as configured trains nothing"),
])
def test_a_class_refusing_its_settings_inside_jsonargparse_is_one_line(tmp_path, config, extra, message):
    code, _, err = train_in_process("--config", config, "--runs_dir", str(tmp_path / "runs"), "--run_name", "e", *extra)
    assert code == 1 and one_error_line(err).startswith(message)
    assert not (tmp_path / "runs" / "e").exists()
