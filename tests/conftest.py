"""Shared fixtures: tiny models, phantom MIMIC files written in the real format, one trained run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Session fixtures that run train.py in a subprocess (see below): a test that takes one pays for a demo run, so it is
# an end-to-end test and belongs to the slow tier even if nobody marked it (docs/tests.md: the two tiers).
TRAINED_RUN_FIXTURES = frozenset({"reference_run", "ti_run"})


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the marks
def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that takes a trained-run fixture, so ``-m "not slow"`` never starts a demo run."""
    for item in items:
        if TRAINED_RUN_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


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
    from synthetic.phantoms import write_phantom_mimic

    root = tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg"
    write_phantom_mimic(root, n_per_finding={"No Finding": 8, "Pleural Effusion": 8, "Cardiomegaly": 4}, size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_sd():
    from models.stable_diffusion import load_stable_diffusion

    return load_stable_diffusion("tiny-random")


def run_train(*args: str, cwd: Path = REPO, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` in a subprocess (for tests of the CLI itself)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([PYTHON, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_in_process(*args: str) -> tuple[int, str, str]:
    """``train.py ARGS`` in this process, for runs that stop before training (errors at start, --print_config):
    the same code without a fresh interpreter's ~8 s of imports. Returns ``(exit code, stdout, stderr)``."""
    import contextlib
    import io

    import train

    out, err, argv = io.StringIO(), io.StringIO(), list(sys.argv)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train.main(list(args))
            except SystemExit as exc:  # a string code is the message Python would print on exit
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    err.write(exc.code + "\n")
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def train_and_signal(args: list[str], losses_csv: Path, sig: int, after_rows: int = 10, env: dict | None = None,
                     timeout: float = 300) -> tuple[int, str, str]:
    """Start ``python train.py ARGS``, send ``sig`` once ``losses_csv`` holds ``after_rows`` rows (it is flushed
    at each checkpoint), wait for the exit; return ``(returncode, stdout, stderr)``. Fails if the run ended first."""
    import signal as _signal
    import time

    out_path, err_path = losses_csv.parent.parent / f"signal-{sig}.out", losses_csv.parent.parent / f"signal-{sig}.err"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([PYTHON, str(REPO / "train.py"), *args, "--trainer.callbacks+=synthetic.testing.StepDelay"],
                                cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        sent = False
        while proc.poll() is None and time.monotonic() < deadline:
            if losses_csv.is_file() and len(losses_csv.read_text().splitlines()) - 1 >= after_rows:
                proc.send_signal(sig)
                sent = True
                break
            time.sleep(0.02)
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(_signal.SIGKILL)
            raise
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert sent, f"train.py ended (exit {proc.returncode}) before {after_rows} steps were logged:\n{stderr[-3000:]}"
    return proc.returncode, stdout, stderr


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
        args += ["--model.init_args.prior_preservation.num_class_images", "4", "--model.init_args.prior_preservation.steps", "2"]
    return args + list(extra)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted 24-step demo run (U-Net + prior preservation), reused by many tests."""
    tmp = tmp_path_factory.mktemp("reference")
    run_train(*demo_args(tmp, "--run_name", "ref", "--trainer.max_steps", "24",
                         "--trainer.callbacks.init_args.every_n_steps", "12", "--trainer.callbacks.init_args.steps", "2"))
    return tmp / "runs" / "ref"


@pytest.fixture(scope="session")
def reference_export(reference_run, tmp_path_factory) -> Path:
    """The reference run exported through the API (``load_run(run).export``), shared by the tests that read an export
    of it (generate.py's ``--export``, the memorization audit): built once, never written to by them."""
    from lightning_modules.runs import load_run

    return load_run(reference_run)[0].export(tmp_path_factory.mktemp("reference_export") / "export")


@pytest.fixture(scope="session")
def ti_run(tmp_path_factory) -> Path:
    """One uninterrupted 20-step textual-inversion demo run (token ``<lung-xray>``), reused by many tests."""
    tmp = tmp_path_factory.mktemp("ti_reference")
    run_train(*demo_args(tmp, "--run_name", "ref", "--trainer.max_steps", "20", "--trainer.callbacks.init_args.every_n_steps", "20",
                         "--trainer.callbacks.init_args.steps", "2", "--trainer.callbacks.init_args.n_per_prompt", "2",
                         config="textual_inversion_demo"))
    return tmp / "runs" / "ref"


def phantom_dm(root, tmp_path):
    """The phantom MIMIC-CXR files as a two-finding datamodule at 64 px, batches of 2, no validation."""
    from datamodules.mimic_cxr import MIMICCXRDataModule
    return MIMICCXRDataModule(root=str(root), findings=["No Finding", "Pleural Effusion"], resolution=64, batch_size=2,
                              max_val_images=0, cache_dir=str(tmp_path / "cache"))


def quiet_trainer(steps: int, **kwargs):
    """A CPU Trainer for `steps` steps without logging, progress bars, checkpoints or validation."""
    from lightning.pytorch import Trainer
    return Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                   **kwargs)


def straight_and_resumed(fresh, root, tmp_path, steps: int = 4, stop_at: int = 2):
    """Train `fresh()` straight for `steps` steps, and again stopping at `stop_at` (checkpointed as train.py does) then
    resuming to `steps`; returns (straight, resumed, the checkpoint path)."""
    from callbacks.checkpointing import RunCheckpoint
    straight = fresh()
    quiet_trainer(steps).fit(straight, datamodule=phantom_dm(root, tmp_path))
    half = tmp_path / "half.ckpt"
    quiet_trainer(stop_at, callbacks=[RunCheckpoint(half, every_n_steps=0)]).fit(fresh(), datamodule=phantom_dm(root, tmp_path))
    resumed = fresh()
    quiet_trainer(steps).fit(resumed, datamodule=phantom_dm(root, tmp_path), ckpt_path=str(half))
    return straight, resumed, half


def whole_denoiser_resumes_exactly(model: dict, root, tmp_path, **settings):
    """The base families' shared check: the whole denoiser of ``model`` with EMA and prior preservation (2 class images)
    trained straight and stopped-and-resumed gives the same weights and EMA bit for bit; only the transformer trains
    (the text encoders and the autoencoder stay bit-identical) and it moved. Returns the straight module."""
    import torch

    from lightning_modules.unet import UNetFineTuning

    def fresh():
        return UNetFineTuning(model=model, learning_rate=1e-3, ema={"decay": 0.9}, **settings,
                              prior_preservation={"num_class_images": 2, "steps": 2, "class_images_dir": str(tmp_path / "class")})

    base = {k: v.clone() for k, v in fresh().state_dict().items()}
    straight, resumed, _ = straight_and_resumed(fresh, root, tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(straight.ema.model.shadow_params, resumed.ema.model.shadow_params))
    trained = straight.trained_state_keys()
    assert trained and all(k.startswith("sd.transformer.") for k in trained)
    assert any(not torch.equal(a[k], base[k]) for k in trained)
    assert all(torch.equal(a[k], base[k]) for k in a if k not in trained)
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    return straight


def export_samples_as_the_suite_does(module, out, plain_pipeline, prompt: str, guidance: float, **call):
    """``module``'s pipeline export in ``out``: plain diffusers (``plain_pipeline`` class) and the suite's ``load_export``
    sample the image the module samples (seed 0, 3 steps); returns ``export.json``."""
    import json

    import torch

    from models.exports import load_export

    out = module.export(out)
    pipe = plain_pipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=3, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
                 output_type="pt", **call).images
    ours = load_export(out).generate([prompt], seeds=[0], steps=3, guidance=guidance)
    torch.testing.assert_close(ours, image.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(module.generate([prompt], seeds=[0], steps=3, guidance=guidance), ours, rtol=0, atol=1e-5)
    return json.loads((out / "export.json").read_text())


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A random 2-layer DINOv2 (RAD-DINO's architecture, microsoft/rad-dino's processor settings) saved as a Hugging
    Face folder: the image-encoder feature path without a download."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2") / "tiny-rad-dino"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                             patch_size=8)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      image_mean=[0.5307, 0.5307, 0.5307], image_std=[0.2583, 0.2583, 0.2583]).save_pretrained(folder)
    return folder
