"""Train one adaptation strategy: ``python train.py --config unet_prior.yaml [--ckpt_path last]``.

A bare config name resolves in ``configs/``. Every run lives in ``runs/<run_name>/`` (the name comes
from ``--run_name``, the config's ``run_name`` or the config file's name) with its checkpoints,
sample grids, W&B files, W&B run id, resolved config and provenance. ``--ckpt_path last`` continues
that folder and that W&B run; when the folder has no checkpoint yet it says so and starts fresh,
so a cluster requeue script can always pass it.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

from evaluation.provenance import git_commit, package_versions

REPO = Path(__file__).resolve().parent
CONFIG_DIR = REPO / "configs"
PACKAGES = (
    "torch", "lightning", "diffusers", "transformers", "torchmetrics", "wandb", "torchxrayvision",
    "datasets", "scikit-image", "jsonargparse", "numpy", "safetensors",
)


def resolve_config_args(argv: list[str]) -> list[str]:
    """Let ``--config NAME`` (or ``NAME.yaml``) mean ``configs/NAME.yaml`` when NAME is not a file."""
    out = list(argv)
    for i, arg in enumerate(out):
        value, prefix = None, ""
        if arg == "--config" and i + 1 < len(out):
            value, target = out[i + 1], i + 1
        elif arg.startswith("--config="):
            value, target, prefix = arg.split("=", 1)[1], i, "--config="
        if value is None or Path(value).exists():
            continue
        for candidate in (CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml"):
            if candidate.is_file():
                out[target] = prefix + str(candidate)
                break
        else:
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise SystemExit(f"train.py: error: config {value!r} is neither a file nor a name in {CONFIG_DIR} ({known})")
    return out


def config_stem(argv: list[str]) -> Optional[str]:
    stem = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            stem = Path(argv[i + 1]).stem
        elif arg.startswith("--config="):
            stem = Path(arg.split("=", 1)[1]).stem
    return stem


def wandb_is_online(mode: str) -> bool:
    if mode == "auto":
        return bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE", "") not in ("offline", "disabled")
    return mode == "online"


def main(argv: Optional[list[str]] = None) -> None:
    original_argv = list(sys.argv)
    argv = resolve_config_args(list(sys.argv[1:] if argv is None else argv))
    sys.argv = sys.argv[:1] + argv  # LightningCLI reads sys.argv; configs resolved above

    import warnings

    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import LightningCLI

    from callbacks.checkpointing import AtomicCheckpointIO, FinalCheckpoint, PeriodicCheckpoint, PreemptionCheckpoint
    from callbacks.loss_log import LossLog
    from callbacks.manifest import DataManifest
    from lightning_modules.base import DiffusionModule

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_name", type=Optional[str], default=None, help="run folder name (default: the config file's name)")
            parser.add_argument("--runs_dir", type=str, default="runs", help="parent folder of run folders")
            parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="'last' (resume this run) or a checkpoint path")
            parser.add_argument("--checkpoint_every_n_steps", type=int, default=100, help="how often last.ckpt is written")
            parser.add_argument("--wandb_project", type=str, default="cxr-diffusion")
            parser.add_argument("--wandb_entity", type=Optional[str], default=None)
            parser.add_argument(
                "--wandb_mode", type=Literal["auto", "online", "offline", "disabled"], default="auto",
                help="auto: online when WANDB_API_KEY is set, else offline (sync later with `wandb sync`)",
            )

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            cfg.run_name = cfg.run_name or config_stem(argv) or datetime.now().strftime("run-%Y%m%d-%H%M%S")
            self.run_dir = Path(cfg.runs_dir) / cfg.run_name
            self.ckpt_path = self._resolve_ckpt(cfg.ckpt_path)
            has_ckpt = any((self.run_dir / "checkpoints").glob("*.ckpt"))
            if has_ckpt and self.ckpt_path is None:
                raise SystemExit(
                    f"train.py: error: {self.run_dir} already holds checkpoints. Pass --ckpt_path last to resume it, "
                    "or --run_name NEW to start another run."
                )
            cfg.trainer.default_root_dir = str(self.run_dir)

        def _resolve_ckpt(self, value: Optional[str]) -> Optional[str]:
            if value is None:
                return None
            if value == "last":
                last = self.run_dir / "checkpoints" / "last.ckpt"
                if last.is_file():
                    print(f"resuming {self.run_dir} from {last}", flush=True)
                    return str(last)
                print(f"no checkpoint in {self.run_dir / 'checkpoints'}: starting fresh", flush=True)
                return None
            if not Path(value).is_file():
                raise SystemExit(f"train.py: error: --ckpt_path {value}: no such checkpoint file")
            return value

        def _instantiate_trainer(self, config, callbacks):
            cfg = self.config
            run_dir = self.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            callbacks = list(callbacks) + [
                PeriodicCheckpoint(
                    dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                    every_n_train_steps=cfg.checkpoint_every_n_steps,
                ),
                FinalCheckpoint(run_dir / "checkpoints" / "last.ckpt", every_n_steps=cfg.checkpoint_every_n_steps),
                PreemptionCheckpoint(run_dir / "checkpoints" / "last.ckpt"),
                LossLog(run_dir / "losses.csv"),
                DataManifest(run_dir / "data.json"),
            ]
            plugins = config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            config["plugins"] = plugins + [AtomicCheckpointIO()]  # a kill during a save never corrupts last.ckpt
            from lightning.pytorch.callbacks import ProgressBar

            from callbacks.progress import step_progress_bar

            if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
                callbacks.append(step_progress_bar())
            config["default_root_dir"] = str(run_dir)
            config["logger"] = self._logger(run_dir)
            if config["logger"]:
                callbacks.append(LearningRateMonitor(logging_interval="step"))
            return super()._instantiate_trainer(config, callbacks)

        def _logger(self, run_dir: Path):
            cfg = self.config
            if cfg.wandb_mode == "disabled":
                return False
            from lightning.pytorch.loggers import WandbLogger

            id_file = run_dir / "wandb_run_id.txt"
            if id_file.exists():
                run_id = id_file.read_text().strip()
            else:
                import uuid

                run_id = uuid.uuid4().hex[:12]
                id_file.write_text(run_id + "\n")
            online = wandb_is_online(cfg.wandb_mode)
            return WandbLogger(
                project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.run_name, id=run_id,
                save_dir=str(run_dir), offline=not online, resume="allow", log_model=False,
            )

    # The frozen VAE/text encoder are kept in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning-internal deprecation noise, and a logging-interval warning that assumes epoch-based runs
    # (logging here counts optimizer steps across epochs).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
    cli = TrainCLI(
        DiffusionModule,
        None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        seed_everything_default=0,
        save_config_callback=None,
        trainer_defaults={"use_distributed_sampler": False, "num_sanity_val_steps": 0, "log_every_n_steps": 10},
        parser_kwargs={"description": __doc__.split("\n")[0]},
    )
    if cli.trainer.is_global_zero:
        write_provenance(cli, original_argv)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks.checkpointing import CheckpointSaveError
    from lightning_modules.base import NonFiniteLossError

    last = cli.run_dir / "checkpoints" / "last.ckpt"
    preemption = next(c for c in cli.trainer.callbacks if isinstance(c, PreemptionCheckpoint))
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path, weights_only=True)
    except SIGTERMException:  # during validation or setup, under Lightning's own handler
        if cli.trainer.is_global_zero and preemption.saved_step is not None:
            print(f"train.py: received SIGTERM: saved {last} at step {preemption.saved_step}. Resume with the same command "
                  "and --ckpt_path last.", file=sys.stderr, flush=True)
        elif cli.trainer.is_global_zero:
            print(f"train.py: received SIGTERM before the first step ended: nothing new saved ({last} unchanged). "
                  "Resume with the same command and --ckpt_path last.", file=sys.stderr, flush=True)
        raise SystemExit(143)
    except (NonFiniteLossError, CheckpointSaveError) as err:
        print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    if preemption.saved_step is not None:
        if cli.trainer.is_global_zero:
            print(f"train.py: received SIGTERM: saved {last} at step {preemption.saved_step}. Resume with the same command "
                  "and --ckpt_path last.", file=sys.stderr, flush=True)
        raise SystemExit(143)
    if cli.trainer.is_global_zero:
        print(f"run folder: {cli.run_dir}", flush=True)


def write_provenance(cli, argv: list[str]) -> None:
    """Resolved config (no secrets: W&B keys come from the environment, never the config), commit, versions, seeds."""
    run_dir: Path = cli.run_dir
    cli.parser.save(cli.config, run_dir / "config.yaml", skip_unset=False, overwrite=True, multifile=False)
    record = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
        "resumed_from": cli.ckpt_path,
        "seed_everything": cli.config.seed_everything,
        "model_seed": getattr(cli.model.hparams, "seed", None),
        "data_seed": getattr(cli.datamodule, "seed", None),
        "git": git_commit(),
        "packages": package_versions(PACKAGES),
        "host": platform.node(),
    }
    path = run_dir / "provenance.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history.append(record)
    path.write_text(json.dumps(history, indent=1))


if __name__ == "__main__":
    main()
