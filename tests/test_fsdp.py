"""FSDP of the denoiser (``--trainer.strategy fsdp``: lightning_modules/sharding.py), on CPU: two gloo processes.

The two processes are started as a launcher starts them (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``) and
each runs this file as a script: ``train.py``'s ``main`` three times per base (tiny-random's U-Net, tiny-random-sana's
DiT): 4 steps straight, then 2 steps and a resume to 4 (``--ckpt_path last``). :class:`ShardLog` records what each rank
holds once the model is wrapped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PRESETS = ("tiny-random", "tiny-random-sana")
DENOISER = {"tiny-random": ("unet", "UNet2DConditionModel"), "tiny-random-sana": ("transformer", "SanaTransformer2DModel")}


class ShardLog(Callback):
    """What this rank holds after FSDP wrapped the module: the FSDP units (the classes they wrap and their sharding), the
    modules FSDP ignores, and the denoiser's and the frozen parts' local parameter counts, in ``<run>/shards/rank<r>.json``."""

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = trainer.strategy.model
        units = [m for m in root.modules() if isinstance(m, FSDP)]
        names = {id(m): n for n, m in pl_module.named_modules()}
        sd = pl_module.sd
        frozen = {n: sum(p.numel() for p in c.parameters()) for n, c in sd.named_children() if c is not sd.denoiser}
        record = {"units": sorted({type(u.module).__name__ for u in units if u is not root}),
                  "root": type(root.module).__name__, "sharding": sorted({u.sharding_strategy.name for u in units}),
                  "ignored": sorted(names.get(id(m), "?") for m in root._ignored_modules),  # with their submodules
                  "denoiser_local": sum(p.numel() for p in sd.denoiser.parameters()),
                  "denoiser_full": sum(int(torch.Size(s).numel()) for s in pl_module._sharded_shapes.values()),
                  "frozen": frozen, "frozen_dtype": str(next(sd.vae.parameters()).dtype)}
        path = Path(trainer.default_root_dir) / "shards" / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))


def common_args(root: Path, runs: Path, preset: str, model: str = "lightning_modules.unet.UNetFineTuning") -> list[str]:
    return ["--model", model, "--model.init_args.model.pretrained", preset,
            "--model.init_args.learning_rate", "1e-3", "--model.init_args.latent_cache_batch_size", "1",
            "--data", "datamodules.mimic_cxr.MIMICCXRDataModule", "--data.init_args.root", str(root),
            "--data.init_args.findings", "[No Finding, Pleural Effusion]", "--data.init_args.resolution", "64",
            "--data.init_args.batch_size", "2", "--data.init_args.max_val_images", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "fsdp",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--runs_dir", str(runs),
            "--wandb_mode", "disabled", "--checkpoint_every_n_steps", "0"]


def drive(root: Path, runs: Path) -> None:
    """In each of the two processes: for each base, straight 4 steps; 2 steps; resumed to 4."""
    import train

    for preset in PRESETS:
        args = common_args(root, runs, preset) + ["--trainer.callbacks+=test_fsdp.ShardLog"]
        for extra in (["--run_name", f"{preset}-straight", "--trainer.max_steps", "4"],
                      ["--run_name", f"{preset}-resumed", "--trainer.max_steps", "2"],
                      ["--run_name", f"{preset}-resumed", "--trainer.max_steps", "4", "--ckpt_path", "last"]):
            try:
                train.main(args + extra)
            except SystemExit as exc:
                if exc.code:
                    raise


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> Path:
    from synthetic.phantoms import write_phantom_mimic

    root = tmp_path_factory.mktemp("fsdp_mimic") / "mimic-cxr-jpg"
    write_phantom_mimic(root, n_per_finding={"No Finding": 4, "Pleural Effusion": 4}, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def fsdp_runs(mimic, tmp_path_factory) -> Path:
    from test_multinode import clean_env, free_port

    tmp = tmp_path_factory.mktemp("fsdp")
    runs, port = tmp / "runs", str(free_port())
    procs, logs = [], []
    for rank in range(2):
        log = open(tmp / f"rank{rank}.log", "w")
        logs.append(log)
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank),
                        CXR_DIFFUSION_CACHE=str(tmp / "cache"))
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])  # train.py, and this file's ShardLog
        procs.append(subprocess.Popen([sys.executable, __file__, str(mimic), str(runs)], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    assert codes == [0, 0], "\n".join((tmp / f"rank{r}.log").read_text()[-5000:] for r in range(2))
    return runs


def same(a, b) -> bool:
    """Nested checkpoint contents equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint(runs: Path, name: str, prev: bool = False) -> dict:
    return torch.load(runs / name / "checkpoints" / ("last.prev.ckpt" if prev else "last.ckpt"), weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp_stopped_and_resumed_run_ends_bit_identical_to_the_straight_run(fsdp_runs, preset):
    straight, resumed = checkpoint(fsdp_runs, f"{preset}-straight"), checkpoint(fsdp_runs, f"{preset}-resumed")
    half = checkpoint(fsdp_runs, f"{preset}-resumed", prev=True)
    assert straight["global_step"] == resumed["global_step"] == 4 and half["global_step"] == 2
    assert same(straight["state_dict"], resumed["state_dict"])
    # AdamW's moments and step counts too (on CPU PyTorch's gather aliased every moment to the last one: see
    # DenoiserFSDP.optimizer_state), and the scheduler's state
    assert same(straight["optimizer_states"], resumed["optimizer_states"])
    assert same(straight["lr_schedulers"], resumed["lr_schedulers"])
    moments = [s["exp_avg"] for s in straight["optimizer_states"][0]["state"].values()]
    squares = [s["exp_avg_sq"] for s in straight["optimizer_states"][0]["state"].values()]
    assert not all(torch.equal(m, q) for m, q in zip(moments, squares))
    # the same file DDP writes: the whole denoiser's trained tensors under their plain names, nothing frozen
    prefix = f"sd.{DENOISER[preset][0]}."
    assert straight["trained_keys"] == sorted(straight["state_dict"]) and all(k.startswith(prefix) for k in straight["trained_keys"])
    assert not any("_fsdp_wrapped_module" in k or "_flat_param" in k for k in straight["state_dict"])
    assert straight["sharding"] == "fsdp:SHARD_GRAD_OP" and straight["world_size"] == 2
    assert any(not torch.equal(straight["state_dict"][k], half["state_dict"][k]) for k in straight["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp_shards_the_denoisers_blocks_and_keeps_the_frozen_parts_whole_on_every_rank(fsdp_runs, preset):
    ranks = [json.loads((fsdp_runs / f"{preset}-straight" / "shards" / f"rank{r}.json").read_text()) for r in range(2)]
    from models.stable_diffusion import load_stable_diffusion

    _, cls = DENOISER[preset]
    blocks = {"tiny-random": ["CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                              "UpBlock2D"], "tiny-random-sana": ["SanaTransformerBlock"]}[preset]
    frozen = ["vae", "text_encoder"]
    for record in ranks:
        assert record["units"] == sorted(blocks + [cls]) and record["root"] == "UNetFineTuning"
        assert record["sharding"] == ["SHARD_GRAD_OP"]
        ignored = set(record["ignored"])  # the frozen parts and everything inside them: outside every FSDP unit
        assert {f"sd.{part}" for part in frozen} <= ignored
        assert all(any(n == f"sd.{part}" or n.startswith(f"sd.{part}.") for part in frozen) for n in ignored)
    full = ranks[0]["denoiser_full"]
    assert sum(r["denoiser_local"] for r in ranks) == full and all(r["denoiser_local"] < 0.6 * full for r in ranks)
    base = load_stable_diffusion(preset)  # every rank holds the whole of each frozen part
    assert ranks[0]["frozen"] == ranks[1]["frozen"] == {part: sum(p.numel() for p in getattr(base, part).parameters())
                                                        for part in frozen}


@pytest.mark.slow
def test_fsdp_checkpoint_exports_to_a_pipeline_plain_diffusers_loads(fsdp_runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    import export

    out = tmp_path / "export"
    export.main([str(fsdp_runs / "tiny-random-resumed"), str(out)])
    pipe = StableDiffusionPipeline.from_pretrained(out)
    trained = checkpoint(fsdp_runs, "tiny-random-resumed")["state_dict"]
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k[len("sd.unet."):]], v) for k, v in trained.items())


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def refusal(mimic, tmp_path_factory):
    from conftest import train_in_process

    runs = tmp_path_factory.mktemp("fsdp_refused")

    def refused(*extra: str, model: str = "lightning_modules.unet.UNetFineTuning") -> str:
        code, out, err = train_in_process(*common_args(mimic, runs, "tiny-random", model), *extra)
        assert code != 0, out + err
        assert not any(runs.iterdir())  # refused before anything was written
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    return refused


def test_fsdp_refuses_strategies_that_do_not_train_the_whole_denoiser(refusal):
    message = refusal(model="lightning_modules.lora.LoRAFineTuning")
    assert "LoRAFineTuning keeps" in message and "--trainer.strategy ddp" in message
    message = refusal(model="lightning_modules.textual_inversion.TextualInversion")
    assert "TextualInversion trains" in message and "outside the denoiser" in message and "ddp" in message


def test_fsdp_refuses_ema_prior_preservation_sampling_callbacks_and_16_bit_weights(refusal):
    assert "ema under FSDP" in refusal("--model.init_args.ema", "{decay: 0.9}")
    assert "prior_preservation under FSDP" in refusal("--model.init_args.prior_preservation", "{num_class_images: 2}")
    message = refusal("--trainer.callbacks+=callbacks.sample_grid.SampleGrid")
    assert "SampleGrid" in message and "--trainer.callbacks=[]" in message
    assert "use bf16-mixed" in refusal("--trainer.precision", "bf16-true")


def test_fsdp_refuses_lightnings_own_fsdp_and_other_sharding_modes(refusal):
    assert "use --trainer.strategy fsdp_denoiser" in refusal("--trainer.strategy", "lightning.pytorch.strategies.FSDPStrategy")
    message = refusal("--trainer.strategy", "lightning_modules.sharding.DenoiserFSDP",
                      "--trainer.strategy.sharding_strategy", "NO_SHARD")
    assert "'NO_SHARD' is not supported" in message and "ddp" in message


def test_a_checkpoint_resumes_only_under_the_sharding_it_was_written_with():
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_modules.base import TrainedStateMismatch
    from lightning_modules.sharding import DenoiserFSDP, sharding_mismatch, sharding_of
    from lightning_modules.unet import UNetFineTuning

    fsdp = DenoiserFSDP()
    assert sharding_of(fsdp) == "fsdp:SHARD_GRAD_OP" and sharding_of(DDPStrategy()) is None
    assert sharding_of(DenoiserFSDP(sharding_strategy="FULL_SHARD")) == "fsdp:FULL_SHARD"
    assert sharding_mismatch(None, None) is None and sharding_mismatch("fsdp:SHARD_GRAD_OP", "fsdp:SHARD_GRAD_OP") is None
    module = UNetFineTuning(model={"pretrained": "tiny-random"})
    saved = {"state_dict": {k: module.state_dict()[k] for k in module.trained_state_keys()},
             "trained_keys": module.trained_state_keys(), "world_size": 2}
    module.check_resumable(saved, world_size=2, strategy=DDPStrategy())  # a DDP checkpoint under DDP
    with pytest.raises(TrainedStateMismatch, match="written under an unsharded strategy .* this start uses --trainer.strategy "
                                                   "fsdp_denoiser"):
        module.check_resumable(saved, world_size=2, strategy=fsdp)
    with pytest.raises(TrainedStateMismatch, match="written under --trainer.strategy fsdp_denoiser"):
        module.check_resumable(dict(saved, sharding="fsdp:SHARD_GRAD_OP"), world_size=2, strategy=DDPStrategy())


if __name__ == "__main__":
    drive(Path(sys.argv[1]), Path(sys.argv[2]))
