"""Shared fixtures: tiny models, phantom MIMIC files written in the real format, one trained run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory):
    """No network, W&B offline, caches in a temporary folder (set before anything is imported)."""
    cache = tmp_path_factory.mktemp("cache")
    old = dict(os.environ)
    os.environ.update(
        WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        CXR_DIFFUSION_CACHE=str(cache), TOKENIZERS_PARALLELISM="false",
    )
    os.environ.pop("WANDB_API_KEY", None)
    yield
    os.environ.clear()
    os.environ.update(old)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    from datamodules.phantoms import write_phantom_mimic

    root = tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg"
    write_phantom_mimic(root, n_per_finding={"No Finding": 8, "Pleural Effusion": 8, "Cardiomegaly": 4}, size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_sd():
    from lightning_modules.stable_diffusion import load_stable_diffusion

    return load_stable_diffusion("tiny-random")


def run_train(*args: str, cwd: Path = REPO, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` in a subprocess (for tests of the CLI itself)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([PYTHON, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def demo_args(tmp: Path, *extra: str, config: str = "demo") -> list[str]:
    """A demo config on its own phantom folder and run folder, short and fast."""
    args = [
        "--config", config,
        "--runs_dir", str(tmp / "runs"),
        "--data.init_args.root", str(tmp / "phantoms"),
        "--data.init_args.n_per_finding", "6",
        "--trainer.val_check_interval", "10",
        "--trainer.log_every_n_steps", "1",
        "--checkpoint_every_n_steps", "5",
    ]
    if config == "demo":  # the U-Net demo uses prior preservation: fewer, cheaper class images
        args += ["--data.init_args.prior_preservation.num_class_images", "4", "--data.init_args.prior_preservation.steps", "2"]
    return args + list(extra)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted 24-step demo run (U-Net + prior preservation), reused by many tests."""
    tmp = tmp_path_factory.mktemp("reference")
    run_train(*demo_args(tmp, "--run_name", "ref", "--trainer.max_steps", "24",
                         "--trainer.callbacks.init_args.every_n_steps", "12", "--trainer.callbacks.init_args.steps", "2"))
    return tmp / "runs" / "ref"
