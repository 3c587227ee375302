"""Train one adaptation strategy: ``python train.py --config unet_prior.yaml [--ckpt_path last]``.

A bare config name resolves in ``configs/``. Every run lives in ``runs/<run_name>/`` (the name comes
from ``--run_name``, the config's ``run_name`` or the config file's name; :class:`core.run_folder.RunFolder`) with its
checkpoints, sample grids, W&B files, W&B run id, resolved config and provenance. ``--ckpt_path last`` continues
that folder and that W&B run; when the folder has no checkpoint yet it says so and starts fresh,
so a cluster requeue script can always pass it.

The run's callbacks (checkpoints, loss log, data manifest, progress bar, learning-rate monitor), its W&B logger and
the atomic checkpoint writer are added through LightningCLI's public hooks (``before_instantiate_classes``,
``instantiate_trainer``).
"""
from __future__ import annotations

import signal
import sys


def _interrupted_while_importing(signum, frame) -> None:
    print("train.py: interrupted before training started; nothing saved", file=sys.stderr, flush=True)
    raise SystemExit(130)


if __name__ == "__main__":
    # Ctrl-C is honoured from the first moment, before the imports, even where SIGINT came in ignored (a job started
    # in the background of a non-interactive shell) or blocked (a launcher's signal mask, which a child inherits);
    # train() then installs Python's own handler.
    signal.signal(signal.SIGINT, _interrupted_while_importing)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

import logging
import os
import warnings
from datetime import datetime
from pathlib import Path
from typing import Literal, Optional

from core.errors import UserError, run_main, writable_folder
from core.run_folder import RunFolder, RunLock

REPO = Path(__file__).resolve().parent
CONFIG_DIR = REPO / "configs"
# A run the MemorizationMonitor stopped: not 0 (a requeue loop would count it done), not 1/2 (errors), not 130/143 (a
# signal: reproduce.py's SLURM runner requeues 143, and a requeued `--ckpt_path last` would be refused by the stop).
EXIT_MONITOR_STOP = 3


def resolve_config_args(argv: list[str]) -> list[str]:
    """Let ``--config NAME`` (or ``NAME.yaml``) mean ``configs/NAME.yaml`` when NAME is not a file."""
    out = list(argv)
    for i, arg in enumerate(out):
        value, prefix = None, ""
        if arg == "--config" and i + 1 < len(out):
            value, target = out[i + 1], i + 1
        elif arg.startswith("--config="):
            value, target, prefix = arg.split("=", 1)[1], i, "--config="
        if value is None:
            continue
        if Path(value).exists():
            check_config_file(Path(value))
            continue
        for candidate in (CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml"):
            if candidate.is_file():
                out[target] = prefix + str(candidate)
                break
        else:
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise SystemExit(f"train.py: error: config {value!r} is neither a file nor a name in {CONFIG_DIR} ({known})")
    return out


def check_config_file(path: Path) -> None:
    """A config file must be a YAML mapping: an empty file or a list is refused naming the file (jsonargparse would say
    only "Unexpected config")."""
    import yaml

    from core.errors import read_text

    if path.is_dir():
        raise UserError(f"--config {path}: is a folder; expected a YAML file such as {CONFIG_DIR / 'demo.yaml'}")
    try:
        content = yaml.safe_load(read_text(path, "config"))
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(content, dict):
        what = "is empty" if content is None else f"holds a {type(content).__name__}, not a mapping of keys to values"
        raise UserError(f"--config {path}: {what}; expected a YAML mapping such as {CONFIG_DIR / 'demo.yaml'}")


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


def quiet_library_noise() -> None:
    """Warnings and tips that say nothing about this run."""
    # The frozen VAE/text encoder are kept in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning-internal deprecation noise, and a logging-interval warning that assumes epoch-based runs
    # (logging here counts optimizer steps across epochs).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
    # Lightning's advertisement for its cloud logger, printed at every Trainer start (whichever of Lightning's rank-zero
    # loggers is the one in use).
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())
    # Lightning warns on every mid-epoch resume unless the dataloader has state_dict/load_state_dict. Ours need none:
    # the suite's ResumableSampler (datamodules/sampling.py) derives the epoch and the position inside it from the
    # restored loop progress, so a resumed run sees exactly the batches an uninterrupted one would (tested bit-identical
    # in test_train_cli.py); the warning does not apply.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


def launched_as_rank_zero() -> bool:
    """True in the process that owns the run folder: not a DDP child started by Lightning (``LOCAL_RANK``), not another
    node (``NODE_RANK``/``GROUP_RANK``), not another SLURM task or torchrun rank (``SLURM_PROCID``, ``RANK``)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))


# what train.py checks at parse time, before any folder is made: (where in the config, key, test, what is expected)
NUMBER_RULES = (
    ("data", "resolution", lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8 (the VAE's downsampling factor)"),
    ("data", "batch_size", lambda v: v >= 1, "at least 1"),
    ("data", "val_batch_size", lambda v: v >= 1, "at least 1 (or null: the batch size)"),
    ("data", "num_workers", lambda v: v >= 0, "0 or more"),
    ("trainer", "max_steps", lambda v: v >= 1 or v == -1, "at least 1, or -1 (no step limit)"),
    ("", "checkpoint_every_n_steps", lambda v: v >= 0, "0 (only at the end) or more"),
    ("data", "n_per_finding", lambda v: v >= 1, "at least 1"),
    ("data", "train_images_per_finding", lambda v: v >= 1, "at least 1 (or null: every image)"),
    ("data", "max_train_images", lambda v: v >= 1, "at least 1 (or null: no limit)"),
    ("model", "learning_rate", lambda v: v > 0, "positive"),
    ("model", "text_encoder_learning_rate", lambda v: v > 0, "positive (or null: the learning rate)"),
    ("model", "lr_warmup_steps", lambda v: v >= 0, "0 or more"),
)


def check_numbers(cfg) -> None:
    """Refuse impossible numbers at parse time, naming the key (not a ZeroDivisionError inside PIL after the weights load)."""
    for where, key, ok, expected in NUMBER_RULES:
        section = cfg if not where else cfg.get(where)
        if where in ("data", "model") and section is not None:
            section, flag = section.get("init_args"), f"--{where}.init_args.{key}"
        else:
            flag = f"--{where + '.' if where else ''}{key}"
        value = section.get(key) if section is not None else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise UserError(f"{flag} {value}: must be {expected}")


# Lightning's own FSDP names and class: its FSDPStrategy shards the whole module (frozen parts too), refuses CPUs and
# gathers checkpoints the suite does not read back; the denoiser's FSDP is lightning_modules/sharding.py's
LIGHTNING_FSDP = ("fsdp_cpu_offload", "lightning.pytorch.strategies.FSDPStrategy", "lightning.pytorch.strategies.fsdp.FSDPStrategy",
                  "pytorch_lightning.strategies.FSDPStrategy")


def strategy_choice(value):
    """``--trainer.strategy``: ``fsdp`` means the denoiser's FSDP (``fsdp_denoiser``, SHARD_GRAD_OP); Lightning's own FSDP
    strategy (by name or class path) is refused in one line, naming ours."""
    from lightning_modules.sharding import NAME

    if isinstance(value, str) and value == "fsdp":
        return NAME
    class_path = value if isinstance(value, str) else getattr(value, "class_path", None) if value is not None else None
    if class_path in LIGHTNING_FSDP:
        raise UserError(f"--trainer.strategy {class_path}: Lightning's own FSDP shards the frozen parts too and is not "
                        f"supported here; use --trainer.strategy {NAME} (or fsdp), which shards the denoiser (SHARD_GRAD_OP)")
    return value


def check_config(cfg) -> None:
    """What train.py checks in the parsed config before any class is built: the numbers, and the strategy's name."""
    check_numbers(cfg)
    if cfg.get("trainer") is not None:
        cfg.trainer.strategy = strategy_choice(cfg.trainer.get("strategy"))


def check_strategy(cli) -> None:
    """Under the denoiser's FSDP: the strategy trains the whole denoiser, no EMA, no callback that samples during
    training, fp32 master weights (:func:`lightning_modules.sharding.check_run`), before anything is written."""
    from lightning_modules.sharding import DenoiserFSDP, check_run

    if isinstance(cli.trainer.strategy, DenoiserFSDP):
        check_run(cli.model, cli.trainer)


def check_wandb_reachable(timeout: float = 5.0) -> None:
    """Online W&B on a machine without network would wait ~2 minutes and end in a traceback: say so at once."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"W&B is online (WANDB_API_KEY is set) but {host}:{port} cannot be reached ({err.strerror or err}); "
                        "use --wandb_mode offline and upload later with `wandb sync`") from None


def run_callbacks(run: RunFolder, every_n_steps: int, user_callbacks: list, progress_bar: bool, logger: bool,
                  model_summary: bool = False) -> list:
    """The callbacks every run has, after the config's own (``model_summary``: the one-line parameter summary)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    from callbacks.checkpointing import RunCheckpoint
    from callbacks.loss_log import LossLog
    from callbacks.manifest import DataManifest
    from callbacks.progress import step_progress_bar
    from callbacks.run_summary import ParameterSummary

    extra = [RunCheckpoint(run.last_checkpoint, every_n_steps), LossLog(run.losses_file), DataManifest(run)]
    if model_summary:
        extra.append(ParameterSummary())
    if progress_bar and not any(isinstance(c, ProgressBar) for c in user_callbacks):
        extra.append(step_progress_bar())
    if logger:
        extra.append(LearningRateMonitor(logging_interval="step"))
    return extra


def wandb_logger(run: RunFolder, mode: str, project: str, entity: Optional[str]):
    """Lightning's WandbLogger on the run's own W&B id (online only with a key; ``wandb sync`` uploads later)."""
    if mode == "disabled":
        return False
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    # quiet: when the run ends (finish_wandb), W&B's sparklines, summary table and `wandb sync` hint are left out: the
    # run's own summary (finished_summary) names the W&B run and the sync command. Its start lines and warnings stay.
    logger = WandbLogger(project=project, entity=entity, name=run.name, id=run.wandb_id(), save_dir=str(run.path),
                         offline=not wandb_is_online(mode), resume="allow", log_model=False,
                         settings=wandb.Settings(quiet=True))
    # Lightning 2.6 always passes anonymous=None to wandb.init, and wandb (0.19 on) warns "The anonymous setting has no
    # effect and will be removed" for any value passed, None included. We never log anonymously: leave the argument out.
    init_args = getattr(logger, "_wandb_init", {})
    if "anonymous" in init_args and init_args["anonymous"] is None:
        del init_args["anonymous"]
    return logger


def finish_wandb(mode: str) -> tuple[str, Optional[str]]:
    """End this process's W&B run now (quietly: see :func:`wandb_logger`), so that the run's summary is the last thing
    printed rather than W&B's exit-time footer; returns its mode (``disabled``, ``offline``, ``online``) and, online,
    its page."""
    if mode == "disabled":
        return "disabled", None
    online = wandb_is_online(mode)
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return ("online" if online else "offline"), None
    url = getattr(run, "url", None) if online else None
    run.finish()
    return ("online" if online else "offline"), url


class Start:
    """This start's run folder and lock, and whether training has started: a start that ends before (refused by a
    check, the datamodule, a callback's setup, the fit-time preparation, or interrupted) has written no config and no
    provenance, and into a folder it made leaves no folder behind."""

    def __init__(self, argv: list[str]):
        self.argv = argv  # the command line as given, for provenance
        self.run: Optional[RunFolder] = None
        self.lock: Optional[RunLock] = None
        self.folder_existed = True
        self.training_started = False

    def take(self, run: RunFolder) -> None:
        self.run, self.folder_existed = run, run.path.exists()
        if launched_as_rank_zero():
            self.lock = run.lock()

    def training_starts(self, cli) -> None:
        """At ``on_train_start``, after everything that may still refuse the start: record it (global rank 0)."""
        if cli.trainer.is_global_zero:
            record_start(cli, self.argv)
        self.training_started = True

    def end(self) -> None:
        if not self.training_started and self.run is not None and not self.folder_existed and self.lock is not None:
            if end_wandb_run():  # W&B writes nothing more into the folder
                self.run.remove_if_unused()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def end_wandb_run() -> bool:
    """End this process's W&B run, if any, as failed (before training started); False if W&B could not end it."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    try:
        if run is not None:
            run.finish(exit_code=1)
    except Exception:  # the start's own error is the one to report; the folder then stays as W&B left it
        return False
    return True


def make_cli(argv: list[str], start: Start):
    from lightning.pytorch.cli import LightningCLI

    from lightning_modules.base import DiffusionModule  # (lightning_modules.sharding registers fsdp_denoiser)

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_name", type=Optional[str], default=None, help="run folder name (default: the config file's name)")
            parser.add_argument("--runs_dir", type=str, default="runs", help="parent folder of run folders")
            parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="'last' (resume this run) or a checkpoint path")
            parser.add_argument("--checkpoint_every_n_steps", type=int, default=100, help="how often last.ckpt is written")
            parser.add_argument("--ignore_monitor_stop", action="store_true",
                                help="resume a run its MemorizationMonitor stopped (refused without this flag)")
            parser.add_argument("--wandb_project", type=str, default="cxr-diffusion")
            parser.add_argument("--wandb_entity", type=Optional[str], default=None)
            parser.add_argument(
                "--wandb_mode", type=Literal["auto", "online", "offline", "disabled"], default="auto",
                help="auto: online when WANDB_API_KEY is set, else offline (sync later with `wandb sync`)",
            )

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            check_config(cfg)
            cfg.run_name = cfg.run_name or config_stem(argv) or datetime.now().strftime("run-%Y%m%d-%H%M%S")
            self.run = RunFolder.named(cfg.runs_dir, cfg.run_name)  # a name that leaves --runs_dir is refused here
            writable_folder(cfg.runs_dir, "--runs_dir")
            cache = os.environ.get("CXR_DIFFUSION_CACHE")
            if cache:
                writable_folder(cache, "the cache folder CXR_DIFFUSION_CACHE =")
            if wandb_is_online(cfg.wandb_mode):
                check_wandb_reachable()
            start.take(self.run)  # refused, naming the holder, while another process trains into this folder
            self.ckpt_path = self.run.resume_checkpoint(cfg.ckpt_path)
            if cfg.ckpt_path == "last":
                print(f"resuming {self.run.path} from {self.ckpt_path}" if self.ckpt_path else
                      f"no checkpoint in {self.run.checkpoints}: starting fresh", flush=True)
            if self.run.has_checkpoints() and self.ckpt_path is None:
                raise SystemExit(f"train.py: error: {self.run.path} already holds checkpoints. Pass --ckpt_path last to resume "
                                 "it, or --run_name NEW to start another run.")
            cfg.trainer.default_root_dir = str(self.run.path)

        def instantiate_trainer(self, **kwargs):
            from callbacks.checkpointing import AtomicCheckpointIO

            cfg, trainer_cfg = self.config, self.config_init.trainer
            self.run.path.mkdir(parents=True, exist_ok=True)
            user = list(trainer_cfg.callbacks or [])
            plugins = trainer_cfg.plugins or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            logger = wandb_logger(self.run, cfg.wandb_mode, cfg.wandb_project, cfg.wandb_entity)
            # Lightning's model-summary table has a FLOPs column that reads 0 without an example input (a diffusion step
            # has none): one line of parameter counts instead (callbacks/run_summary.py), unless the config adds its own
            # ModelSummary or turns the summary off
            from lightning.pytorch.callbacks import ModelSummary

            summary = trainer_cfg.enable_model_summary is not False and not any(isinstance(c, ModelSummary) for c in user)
            if summary:
                kwargs["enable_model_summary"] = False  # no default table beside ours
            from lightning.pytorch.callbacks import LambdaCallback

            # the start is recorded when training starts, after the config's callbacks' own on_train_start
            record = LambdaCallback(on_train_start=lambda trainer, module: start.training_starts(self))
            extra = [record] + run_callbacks(self.run, cfg.checkpoint_every_n_steps, user,
                                             trainer_cfg.enable_progress_bar is not False, bool(logger), model_summary=summary)
            # a kill during a save never corrupts last.ckpt
            return super().instantiate_trainer(callbacks=user + extra, logger=logger, plugins=plugins + [AtomicCheckpointIO()],
                                               **kwargs)

    return TrainCLI(
        DiffusionModule,
        None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        seed_everything_default=0,
        save_config_callback=None,
        trainer_defaults={"use_distributed_sampler": False, "num_sanity_val_steps": 0, "log_every_n_steps": 10,
                          "enable_checkpointing": False},
        parser_kwargs={"description": __doc__.split("\n")[0]},
    )


def make_cli_or_explain(argv: list[str], start: Start):
    """:func:`make_cli`; a suite error (:class:`~core.errors.UserError`) raised while jsonargparse builds the classes
    (e.g. textual inversion given prior_preservation, ``ema.decay`` 1.5, a MemorizationMonitor's stop_above 2) arrives
    wrapped in jsonargparse's own error ("Does not validate against any of the Union subtypes", the class's error as
    its cause), with a traceback: unwrap it to its one line, whatever the wrapper's type."""
    try:
        return make_cli(argv, start)
    except Exception as err:
        cause: Optional[BaseException] = err
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def check_resume(cli) -> None:
    """Before anything of this start is written: the checkpoint is readable and holds what this configuration trains,
    on the same base model, data, batch size and number of processes (:mod:`lightning_modules.resume`), and no
    MemorizationMonitor stopped it (unless ``--ignore_monitor_stop``)."""
    if cli.ckpt_path is None:
        return
    from callbacks.memorization import monitor_stop
    from lightning_modules.resume import read_checkpoint

    checkpoint = read_checkpoint(cli.ckpt_path)
    # the processes this start will run (the strategy's own world size is only set once they are launched)
    processes = int(cli.trainer.num_nodes) * int(cli.trainer.num_devices)
    cli.model.check_resumable(checkpoint, cli.datamodule, processes, strategy=cli.trainer.strategy)
    stop = monitor_stop(checkpoint)
    if stop is not None and not cli.config.ignore_monitor_stop:
        raise UserError(f"{cli.ckpt_path}: the MemorizationMonitor stopped this run at step {stop['stopped_at']} (copy rate "
                        f"{stop['copy_rate']:.3f} above stop_above={stop['stop_above']:g}); resuming would train on past "
                        "that stop. Pass --ignore_monitor_stop to resume anyway (the monitor checks again: raise its "
                        "stop_above or remove it to go on), or start a new run")


def record_start(cli, argv: list[str]) -> None:
    """The resolved config (no secrets: W&B keys come from the environment, never the config) and a provenance record,
    written when training starts (:meth:`Start.training_starts`). Each start keeps its own ``configs/start-N.yaml``;
    ``config.yaml`` is the first start's that trained and is never overwritten."""
    run = cli.run
    start_config = run.next_start_config()
    start_config.parent.mkdir(parents=True, exist_ok=True)
    cli.parser.save(cli.config, start_config, skip_unset=False, overwrite=False, multifile=False)
    if not run.config_file.exists():
        cli.parser.save(cli.config, run.config_file, skip_unset=False, overwrite=False, multifile=False)
    settings = {"seed_everything": cli.config.seed_everything, "model_seed": cli.model.hparams.get("seed"),
                "data_seed": getattr(cli.datamodule, "seed", None), "config": str(start_config)}
    inputs = {"resumed_from": str(cli.ckpt_path) if cli.ckpt_path else None, "base_model": cli.model.spec.cache_key()}
    cli.run.record_start(settings, inputs, argv)


def fit(cli) -> int:
    """Train; the exit status: 0 done, :data:`EXIT_MONITOR_STOP` stopped by a MemorizationMonitor, 143/130 stopped by
    SIGTERM/SIGINT, each after saving (errors propagate)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks.checkpointing import RunCheckpoint
    from callbacks.memorization import MemorizationMonitor

    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, RunCheckpoint))
    zero = cli.trainer.is_global_zero
    # From here Ctrl-C and SIGTERM only set RunCheckpoint's flag (the run saves at the first batch end and stops): a
    # KeyboardInterrupt raised inside Lightning's or W&B's setup (wandb.init) is swallowed there or turned into
    # Lightning's "graceful shutdown" with exit 1.
    checkpoint.setup(cli.trainer, cli.model, "fit")
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path, weights_only=True)
    except SIGTERMException:  # during validation or setup, under Lightning's own handler
        if zero:
            print(preempted_message(cli.run, checkpoint.preempted_step, "SIGTERM"), file=sys.stderr, flush=True)
        return 143
    monitor = next((c for c in cli.trainer.callbacks if isinstance(c, MemorizationMonitor) and c.stopped_at is not None), None)
    if monitor is not None:  # its last.ckpt holds the stop: a resume is refused past it
        if zero:
            print(finished_summary(cli), flush=True)
            print(f"train.py: stopped by the MemorizationMonitor at step {monitor.stopped_at} (exit {EXIT_MONITOR_STOP}); "
                  f"{cli.run.last_checkpoint} is saved. --ckpt_path last refuses to train on past the stop unless "
                  "--ignore_monitor_stop", file=sys.stderr, flush=True)
        return EXIT_MONITOR_STOP
    if checkpoint.preempted_step is not None:
        if zero:
            print(preempted_message(cli.run, checkpoint.preempted_step, checkpoint.stopped_by), file=sys.stderr, flush=True)
        return 130 if checkpoint.stopped_by == "SIGINT" else 143
    if zero:
        print(finished_summary(cli), flush=True)
    return 0


def finished_summary(cli) -> str:
    """The end of a finished run: where its checkpoint, grids, fid.csv, losses and W&B run are, the last FID per prompt
    and the commands that come next (:func:`callbacks.run_summary.end_of_run_summary`). It never fails the run: what
    cannot be read is "n/a"."""
    from callbacks.run_summary import end_of_run_summary

    try:
        mode, url = finish_wandb(cli.config.wandb_mode)
    except Exception as err:  # the run itself is done and saved
        print(f"train.py: warning: W&B did not end its run cleanly ({type(err).__name__}: {err})", file=sys.stderr, flush=True)
        mode, url = ("online" if wandb_is_online(cli.config.wandb_mode) else "offline"), None
    try:
        subject = cli.model.generator_options().get("subject")
    except Exception:
        subject = None
    return end_of_run_summary(cli.run, wandb_mode=mode, wandb_url=url, subject=subject)


def preempted_message(run: RunFolder, step: Optional[int], signal_name: Optional[str]) -> str:
    what = "Ctrl-C (SIGINT)" if signal_name == "SIGINT" else "SIGTERM"
    if step is None:
        return (f"train.py: received {what} before the first step ended: nothing new saved ({run.last_checkpoint} unchanged). "
                "Resume with the same command and --ckpt_path last.")
    return (f"train.py: received {what}: saved {run.last_checkpoint} at step {step}. Resume with the same command "
            "and --ckpt_path last.")


def train(argv: list[str]) -> int:
    """Parse, check, lock, build, check the resume, fit; the start is recorded once training starts: a start refused
    before (at parse, by the resume checks, or in the trainer's, datamodule's and callbacks' setup) records nothing."""
    original_argv = sys.argv[:1] + list(argv)
    argv = resolve_config_args(list(argv))
    sys.argv = sys.argv[:1] + argv  # LightningCLI reads sys.argv; configs resolved above
    quiet_library_noise()
    # Ctrl-C is honoured from the first moment even where SIGINT came in ignored (a job started in the background of a
    # non-interactive shell): before training it stops at once, during training RunCheckpoint saves first.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # W&B finds its service through WANDB_SERVICE, which a parent that ran W&B (a notebook, a script, a test) passes on:
    # this run would then log through that process's service (dead once it exits: a traceback; alive: it may hold this
    # run's id, "run ID ... is in use" on a resume). Every train.py starts its own.
    os.environ.pop("WANDB_SERVICE", None)
    start = Start(original_argv)
    try:
        cli = make_cli_or_explain(argv, start)
        check_strategy(cli)
        check_resume(cli)
        return fit(cli)
    except KeyboardInterrupt:
        print("train.py: interrupted before training started; nothing saved", file=sys.stderr, flush=True)
        return 130
    finally:
        start.end()


def main(argv: Optional[list[str]] = None) -> None:
    """``python train.py ...``: errors the user can fix are one line (``--debug`` for the traceback)."""
    code = run_main("train.py", train, argv)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
