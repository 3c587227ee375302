"""Reproduce the paper with one command: ``python reproduce.py --mimic PATH --laion PATH --reports PATH --out results/``.

Runs, in order, every training run and study behind the paper's Tables 1-4 and Figures 1, 3 and 4
(the runbook, docs/reproduce.md, explains each step, its data, its cost and what it can be compared
with):

1. the base Stable Diffusion: samples of the paper's prompts (it also checks that the weights load);
2. textual projection: none, document level, token level;
3. textual inversion: object/style templates x "radiology"/"lung" initializer;
4. U-Net fine-tuning: no findings; no findings + effusion; the same with prior preservation;
5. the studies: VAE (Table 1, Figure 3), text encoders (Tables 2, 3), generation (Table 4, Figures 1, 4);

then writes ``summary.md`` (every table, linking every figure) and ``provenance.json`` into ``--out``.

Every step is resumable: a finished step is skipped (``--out/steps/<step>.json`` records its
command); an interrupted training run continues from its last checkpoint (``--ckpt_path last``).
``--dry-run`` prints the plan, ``--slurm`` writes a job-array script for clusters, ``--demo`` runs the
whole reproduction at tiny scale on a CPU (phantom data, tiny models).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from core.errors import UserError, run_main

REPO = Path(__file__).resolve().parent
CONFIG_DIR = REPO / "configs"
SD14 = "CompVis/stable-diffusion-v1-4"
CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"


@dataclass(frozen=True)
class Run:
    config: str     # configs/<config>.yaml; also the run's name
    family: str     # projection | textual_inversion | unet
    paper: str      # its row in the paper's Table 4, or what it adds beyond the paper
    cost: str       # expected time on one GPU (our estimate, see docs/reproduce.md)
    beyond: bool = False  # not in the paper: a later recipe, for comparison on the paper's data


RUNS = (
    Run("projection_none", "projection", "Textual projection: no projection", "~10 min (no training; caption MSE and grids)"),
    Run("projection_document", "projection", "Textual projection: document level", "~1 h (most of it encoding the 1M captions once)"),
    Run("projection_token", "projection", "Textual projection: token level", "~2-4 h (both encoders run every step)"),
    Run("textual_inversion_object_radiology", "textual_inversion", "Textual inversion: object, 'radiology'", "~30 min"),
    Run("textual_inversion_object_lung", "textual_inversion", "Textual inversion: object, 'lung'", "~30 min"),
    Run("textual_inversion_style_radiology", "textual_inversion", "Textual inversion: style, 'radiology'", "~30 min"),
    Run("textual_inversion_style_lung", "textual_inversion", "Textual inversion: style, 'lung'", "~30 min"),
    Run("unet_no_findings", "unet", "U-Net: trained on no findings", "~10 min"),
    Run("unet", "unet", "U-Net: no findings and abnormality", "~10 min"),
    Run("unet_prior", "unet", "U-Net: ... with prior", "~15 min (100 class images first)"),
    Run("unet_text_encoder", "unet", "Beyond the paper: U-Net + text encoder (RoentGen)", "~15 min", beyond=True),
    Run("lora_unet", "unet", "Beyond the paper: LoRA on the U-Net (rank 4)", "~10 min", beyond=True),
)
FIGURE1_RUN = "unet_prior"   # Figure 1: the base SD beside the model fine-tuned with prior preservation
# Demo: training steps per run (tiny models on a CPU: the plumbing and the tables, not the paper's numbers)
DEMO_STEPS = {"projection": 10, "textual_inversion": 8, "unet": 8}
DEMO_CLASSES = ("No Finding", "Pleural Effusion", "Cardiomegaly")


class ReproduceError(UserError, RuntimeError):
    """A problem with the driver's inputs or its results folder; the message says what and where."""


@dataclass
class Step:
    name: str                   # e.g. train/unet_prior
    title: str
    argv: list                  # the command after the interpreter
    produces: str               # what it makes, in the paper's terms
    output: str                 # where
    cost: str = ""
    needs: tuple = ()           # steps that must be done first
    env: dict = field(default_factory=dict)
    launcher: tuple = ()        # what starts the interpreter, e.g. ("srun",) in a SLURM job of several tasks

    @property
    def slug(self) -> str:
        return self.name.replace("/", "__")

    def command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        launcher = " ".join(shlex.quote(a) for a in self.launcher)
        return ((env + " " if env else "") + (launcher + " " if launcher else "") + "python "
                + " ".join(shlex.quote(str(a)) for a in self.argv))


# --------------------------------------------------------------------------------------------- plan
def selection_for(images: Optional[Path], sel, config: str) -> Optional[list[str]]:
    """The dicom_ids of ``sel`` (the reviewed image list ``images``) whose finding the run ``config`` trains on."""
    if sel is None:
        return None
    import yaml

    findings = yaml.safe_load((CONFIG_DIR / f"{config}.yaml").read_text())["data"]["init_args"]["findings"]
    ids = sel.loc[sel["finding"].isin(findings), "dicom_id"].tolist()
    if not ids:
        raise ReproduceError(f"{images}: no image for {findings} (run {config}); the file lists {sorted(set(sel['finding']))}")
    return ids


def demo_config(run: Run, out: Path) -> Path:
    """The shipped config ``run.config`` at demo scale: tiny-phantom, CPU, phantom data, a few steps."""
    import yaml

    cfg = yaml.safe_load((CONFIG_DIR / f"{run.config}.yaml").read_text())
    steps = DEMO_STEPS[run.family]
    model = cfg["model"]["init_args"]
    model["model"] = {"pretrained": "tiny-phantom"}
    data = cfg["data"]["init_args"]
    if run.family == "projection":
        model["domain_encoder"]["pretrained"] = "tiny-bert"
        data.update(data_files=str(out / "data" / "laion"), max_captions=400, val_captions=40, batch_size=32, num_workers=0)
    else:
        data.update(root=str(out / "data" / "mimic"), resolution=64, batch_size=4, num_workers=0, max_val_images=8)
        if model.get("prior_preservation"):
            model["prior_preservation"].update(num_class_images=4, steps=5, scheduler="ddim")
    trainer = cfg["trainer"]
    trainer.update(accelerator="cpu", devices=1, precision=32, max_steps=steps, val_check_interval=steps,
                   accumulate_grad_batches=1, log_every_n_steps=5)
    for cb in trainer.get("callbacks") or []:
        if cb["class_path"].endswith("SampleGrid"):
            cb["init_args"].update(every_n_steps=steps, n_per_prompt=2, steps=5)
    # checkpoint_every_n_steps stays the config's (more than the demo's steps): the final step saves last.ckpt
    path = out / "configs" / f"{run.config}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {run.config}.yaml at demo scale, written by reproduce.py --demo (tiny-phantom, CPU, {steps} steps)\n"
            + yaml.safe_dump(cfg, sort_keys=False))
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def build_plan(args) -> list[Step]:
    out = Path(args.out)
    runs_dir = out / "runs"
    demo = args.demo
    sd = "tiny-phantom" if demo else args.sd
    mimic = str(out / "data" / "mimic") if demo else args.mimic
    images = Path(args.images) if args.images else None
    if images is not None:
        from datamodules.candidates import read_selection

        selection = read_selection(images)
    else:
        selection = None
    steps: list[Step] = []
    sample = ["--n", "4", "--steps", "5", "--scheduler", "ddim"] if demo else ["--n", "8", "--steps", "50", "--scheduler", "pndm"]
    steps.append(Step("base", "Base Stable Diffusion: the paper's prompts", ["generate.py", "--pretrained", sd, *sample,
                      "--out", str(out / "samples" / "base")], "Table 4 baseline (its samples)", str(out / "samples" / "base"),
                      "~2 min (weights download on first use)"))
    for run in RUNS:
        if demo:
            argv = ["train.py", "--config", str(demo_config(run, out))]
        else:
            argv = ["train.py", "--config", f"{run.config}.yaml", "--model.init_args.model.pretrained", sd]
            if run.family == "projection":
                argv += ["--data.init_args.data_files", args.laion, "--model.init_args.domain_encoder.pretrained", args.cxr_bert]
            else:
                argv += ["--data.init_args.root", mimic]
        if run.family != "projection":
            ids = selection_for(images, selection, run.config)
            if ids:
                argv += ["--data.init_args.dicom_ids", "[" + ", ".join(ids) + "]"]
        argv += ["--runs_dir", str(runs_dir), "--run_name", run.config, "--ckpt_path", "last", "--wandb_mode", args.wandb_mode]
        argv += training_processes(args)
        steps.append(Step(f"train/{run.config}", run.paper, argv, f"Table 4 row, Figure 4 row ({run.paper})",
                          str(runs_dir / run.config), run.cost))
    studies = out / "studies"
    if demo:
        vae = ["--n", "16", "--resolution", "64", "--classifier", "tiny-phantom", "--fid_features", "xrv", "--reader_pairs", "4"]
        text = ["--mimic_root", mimic, "--encoders", "tiny-bert", "tiny-cxr-bert", "tiny-phantom", "--classes", *DEMO_CLASSES,
                "--n_per_class", "6", "--k", "5", "--no_progress"]
        gen = ["--split", "all", "--n_per_prompt", "4", "--steps", "4", "--scheduler", "ddim", "--fid_features", "xrv",
               "--classifier", "tiny-phantom", "--n_boot", "10", "--batch_size", "12"]
    else:
        weights = []
        if args.xrv_cache_dir:
            weights += ["--xrv_cache_dir", args.xrv_cache_dir]
        vae = ["--n", "700"] + weights + (["--inception_weights", args.inception_weights] if args.inception_weights else [])
        text = (["--reports", args.reports, "--labels", str(Path(mimic) / "mimic-cxr-2.0.0-chexpert.csv.gz")] if args.reports
                else ["--mimic_root", mimic]) + (["--encoders", *args.text_encoders] if args.text_encoders else [])
        gen = ["--n_per_prompt", "100", "--kid"] + weights + (["--inception_weights", args.inception_weights] if args.inception_weights else [])
    steps.append(Step("study/vae", "VAE reconstruction study", ["evaluate.py", "vae", "--mimic_root", mimic, "--pretrained", sd,
                      *vae, "--out", str(studies / "vae")], "Table 1, Figure 3", str(studies / "vae"), "~10 min"))
    steps.append(Step("study/text-encoders", "Text-encoder CheXpert@k study", ["evaluate.py", "text-encoders", *text,
                      "--out", str(studies / "text_encoders")], "Tables 2 and 3", str(studies / "text_encoders"),
                      "~10 min (7 encoders download on first use)"))
    run_names = [f"train/{r.config}" for r in RUNS]
    steps.append(Step("study/generation", "Generation study", ["evaluate.py", "generation", "--mimic_root", mimic, "--base", sd,
                      "--runs", *[str(runs_dir / r.config) for r in RUNS], "--figure1", FIGURE1_RUN, *gen,
                      "--out", str(studies / "generation")], "Table 4, Figures 1 and 4", str(studies / "generation"),
                      "~1-2 h (11 models x 3 prompts x 100 images, 50 steps)", needs=tuple(run_names)))
    steps += beyond_paper_steps(args, sd, mimic, runs_dir, studies, run_names)
    if demo:
        cache = str(out / "cache")
        for s in steps:
            s.env = {"CXR_DIFFUSION_CACHE": cache}
            s.cost = ""  # seconds on a CPU; the GPU estimates are for the full-size steps
    if getattr(args, "srun", False):
        # in a SLURM job of several tasks: a training step runs on every task (one DDP process each, Lightning's
        # SLURMEnvironment), any other step on one task of one node
        for s in steps:
            s.launcher = ("srun",) if s.name.startswith("train/") else ("srun", "--nodes=1", "--ntasks=1")
    return steps


def training_processes(args) -> list[str]:
    """The trainer options of ``--train_nodes`` x ``--train_devices`` processes (none for the default, one)."""
    nodes, devices = getattr(args, "train_nodes", 1), getattr(args, "train_devices", 1)
    if nodes * devices == 1:
        return []
    return ["--trainer.num_nodes", str(nodes), "--trainer.devices", str(devices), "--trainer.strategy", "ddp"]


def beyond_paper_steps(args, sd: str, mimic: str, runs_dir: Path, studies: Path, run_names: list) -> list[Step]:
    """The studies beyond the paper: memorization audit, report-conditioned generation, downstream utility."""
    demo, out, steps = args.demo, Path(args.out), []
    image_runs = [r for r in RUNS if r.family != "projection"]  # projection runs train on captions: no images to copy
    audit = (["--features", "pixel", "--quantile", "0.75", "--n_per_prompt", "2", "--steps", "4",
              "--heldout_root", str(out / "data" / "heldout")] if demo else
             ["--n_per_prompt", "16", "--max_heldout", "1000"] + (["--xrv_cache_dir", args.xrv_cache_dir] if args.xrv_cache_dir else []))
    steps.append(Step("study/memorization", "Memorization audit (beyond the paper)",
                      ["evaluate.py", "memorization", "--runs", *[str(runs_dir / r.config) for r in image_runs], "--base", sd,
                       *audit, "--out", str(studies / "memorization")],
                      "copy rates of every image-trained run and the base model", str(studies / "memorization"),
                      "~20 min (16 images per prompt per model, xrv features)", needs=tuple(f"train/{r.config}" for r in image_runs)))
    # beyond the paper: report-conditioned generation and downstream utility (issue 22)
    heldout = str(out / "data" / "heldout")  # the demo's own test split holds a handful of reports and images
    reports = (["--mimic_root", heldout, "--classifier", "tiny-phantom", "--n_reports_per_class", "3", "--steps", "4",
                "--scheduler", "ddim", "--n_boot", "10", "--batch_size", "12"] if demo else
               ["--mimic_root", mimic, "--n_reports_per_class", "50"] + (["--reports_root", args.reports] if args.reports else [])
               + (["--xrv_cache_dir", args.xrv_cache_dir] if args.xrv_cache_dir else []))
    steps.append(Step("study/generation-reports", "Report-conditioned generation (beyond the paper)",
                      ["evaluate.py", "generation", "--prompts", "reports", "--base", sd, "--runs",
                       *[str(runs_dir / r.config) for r in RUNS], *reports, "--out", str(studies / "generation_reports")],
                      "per-finding AUROC of every model prompted with test-split impressions", str(studies / "generation_reports"),
                      "~1 h (12 models x 150 impressions, 50 steps)", needs=tuple(run_names)))
    utility_runs = [FIGURE1_RUN] if demo else [r.config for r in RUNS]  # the demo: one run, to stay a few minutes
    utility = (["--mimic_root", heldout, "--classifier", "tiny-phantom", "--findings", "Pleural Effusion", "Cardiomegaly",
                "--steps", "10", "--batch_size", "8", "--seeds", "0", "--gen_steps", "4", "--max_real", "24", "--n_boot", "10"]
               if demo else ["--mimic_root", mimic, "--findings", "Pleural Effusion", "--max_real", "2000"]
               + (["--xrv_cache_dir", args.xrv_cache_dir] if args.xrv_cache_dir else []))
    steps.append(Step("study/utility", "Downstream utility of synthetic images (beyond the paper)",
                      ["evaluate.py", "utility", "--base", sd, "--runs", *[str(runs_dir / r) for r in utility_runs], *utility,
                       "--out", str(studies / "utility")],
                      "a classifier trained on real, synthetic, mixed and synthetic-then-real images", str(studies / "utility"),
                      "~2-4 h (a synthetic set per model, 4 arms x 3 seeds)", needs=tuple(f"train/{r}" for r in utility_runs)))
    return steps


# --------------------------------------------------------------------------------------------- state
def marker_path(out: Path, step: Step) -> Path:
    return out / "steps" / f"{step.slug}.json"


def step_state(out: Path, step: Step) -> str:
    """``done``, ``changed`` (done with another command), ``started`` (a training run with a checkpoint) or ``todo``."""
    marker = marker_path(out, step)
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
        except ValueError:
            return "todo"
        return "done" if record.get("argv") == [str(a) for a in step.argv] else "changed"
    if step.name.startswith("train/") and (Path(step.output) / "checkpoints" / "last.ckpt").is_file():
        return "started"
    return "todo"


def print_plan(out: Path, steps: Sequence[Step], file=None) -> None:
    file = file or sys.stdout
    labels = {"done": "done, skipped", "changed": "DONE WITH ANOTHER COMMAND", "started": "resumes from last.ckpt", "todo": "to run"}
    print(f"Plan ({len(steps)} steps) into {out}:", file=file)
    for i, s in enumerate(steps, 1):
        print(f"\n{i:2d}. {s.name}  [{labels[step_state(out, s)]}]  {s.produces}", file=file)
        if s.cost:
            print(f"    cost on one GPU: {s.cost}", file=file)
        print(f"    $ {s.command()}", file=file)
    print(f"\nthen: {out / 'summary.md'} (tables, figures) and {out / 'provenance.json'}", file=file)


# --------------------------------------------------------------------------------------------- run
class Job:
    """One step running in a subprocess; its output goes to ``OUT/logs/<step>.log`` (and the terminal if ``echo``)."""

    def __init__(self, step: Step, out: Path, echo: bool, extra_env: dict):
        import threading

        self.step, self.t0 = step, time.time()
        self.begun = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.log_path = out / "logs" / f"{step.slug}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.log.write(f"\n=== {self.begun} $ {step.command()}\n".encode())
        self.log.flush()
        env = dict(os.environ, **step.env, **extra_env, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([*step.launcher, sys.executable, *map(str, step.argv)], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.echo = echo
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self.log.write(chunk)
            if self.echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()

    def poll(self) -> Optional[int]:
        rc = self.proc.poll()
        if rc is not None:
            self.thread.join()
            self.log.close()
        return rc


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def select_pending(args, steps: list[Step], out: Path) -> tuple[list[Step], set, dict]:
    """``(pending steps, names done, state of every step)`` after checking ``--only`` and ``--redo`` (and redoing)."""
    names = [s.name for s in steps]
    only = set(args.only or names)
    unknown = sorted(only - set(names))
    if unknown:
        raise ReproduceError(f"--only: unknown step(s) {unknown}; the steps are {names}")
    for name in args.redo or []:
        if name not in names:
            raise ReproduceError(f"--redo: unknown step {name!r}; the steps are {names}")
    by_name = {s.name: s for s in steps}
    for name in args.redo or []:
        redo(out, by_name[name])
    state = {s.name: step_state(out, s) for s in steps}  # read once; finished steps are added to `done` later
    done = {name for name, st in state.items() if st == "done"}
    changed = [s.name for s in steps if s.name in only and state[s.name] == "changed"]
    if changed:
        raise ReproduceError(
            f"{', '.join(changed)}: finished earlier with a different command (see {out / 'steps'}). Pass --redo "
            f"{' '.join(changed)} to run it again (a training run's folder is kept aside as <name>.old-<time>), "
            "or use another --out.")
    pending = []
    for i, step in enumerate(steps, 1):
        if step.name in only and step.name in done:
            print(f"[{i}/{len(steps)}] {step.name}: done, skipped", flush=True)
        elif step.name in only:
            pending.append(step)
    waiting = {p.name for p in pending}
    for step in pending:
        missing = [n for n in step.needs if n not in waiting and n not in done]
        if missing:
            raise ReproduceError(f"{step.name} needs {missing} to be done first")
    return pending, done, state


class Scheduler:
    """Runs pending steps as subprocesses, ``jobs`` at once (one GPU each with ``gpus``), each once what it needs is done;
    on SIGTERM every running step is asked to save and stop, and nothing new starts."""

    def __init__(self, args, steps: list[Step], pending: list[Step], done: set, state: dict):
        self.out, self.steps, self.pending, self.done, self.state = Path(args.out), steps, pending, done, state
        self.index = {s.name: i for i, s in enumerate(steps, 1)}
        self.jobs = max(1, int(getattr(args, "jobs", 1) or 1))
        self.gpus = list(getattr(args, "gpus", None) or [])
        self.free_gpus = list(self.gpus)
        if self.jobs > 1:  # steps nothing else needs and that need nothing (base samples, VAE and text studies) go first:
            # they are short, and the last step (the generation study) then starts alone with every core
            needed = {n for s in steps for n in s.needs}
            self.pending.sort(key=lambda s: (bool(s.needs) or s.name in needed))
        self.share_cores = self.jobs > 1 and not self.gpus and "OMP_NUM_THREADS" not in os.environ
        self.echo = not args.quiet and self.jobs == 1
        self.running: dict[str, tuple[Job, Optional[str]]] = {}
        self.failures: list[tuple[Step, int]] = []
        self.received: list[int] = []

    def on_signal(self, signum, _frame) -> None:
        self.received.append(signum)
        # SIGTERM (SLURM pre-emption, time limit, kill): each running step saves at the end of its batch, then stops.
        # SIGINT (Ctrl-C) already reached the children from the terminal: sending it twice would abort their saves.
        if signum == signal.SIGTERM:
            for job, _ in self.running.values():
                if job.proc.poll() is None:
                    job.proc.send_signal(signal.SIGTERM)

    def run(self) -> None:
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.pending or self.running:
                if not self.failures and not self.received:
                    self.start_ready()
                self.collect_finished()
                if self.pending and (self.failures or self.received) and not self.running:
                    break
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start_ready(self) -> None:
        for step in list(self.pending):
            if len(self.running) >= self.jobs:
                break
            if any(n not in self.done for n in step.needs):
                continue
            gpu = self.free_gpus.pop(0) if self.gpus else None
            extra = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
            if self.share_cores:  # CPU runs: torch threads split between the steps that run side by side
                startable = sum(1 for p in self.pending if p is not step and all(n in self.done for n in p.needs))
                extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // min(self.jobs, len(self.running) + 1 + startable)))
            note = " (resuming from its last checkpoint)" if self.state[step.name] == "started" else ""
            where = f" on GPU {gpu}" if gpu is not None else ""
            print(f"[{self.index[step.name]}/{len(self.steps)}] {step.name}: {step.title}{note}{where}\n    $ {step.command()}\n"
                  f"    log: {self.out / 'logs' / (step.slug + '.log')}", flush=True)
            self.running[step.name] = (Job(step, self.out, self.echo, extra), gpu)
            self.pending.remove(step)
        if self.pending and not self.running and not self.failures and not self.received:
            raise ReproduceError(f"cannot start {[s.name for s in self.pending]}: what they need is not done")

    def collect_finished(self) -> None:
        for name, (job, gpu) in list(self.running.items()):
            rc = job.poll()
            if rc is None:
                continue
            del self.running[name]
            if gpu is not None:
                self.free_gpus.append(gpu)
            step = job.step
            if rc == 0:
                record = {"step": step.name, "argv": [str(a) for a in step.argv], "env": step.env, "started": job.begun,
                          "seconds": round(time.time() - job.t0, 1), "exit": rc, "output": step.output}
                marker = marker_path(self.out, step)
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps(record, indent=1) + "\n")
                self.done.add(step.name)
                print(f"    {step.name}: done in {time.time() - job.t0:.0f} s", flush=True)
            elif not self.received:
                self.failures.append((step, rc))
                print(f"reproduce.py: error: step {step.name} failed (exit {rc}). Last lines of {job.log_path}:\n"
                      f"{tail(job.log_path)}", file=sys.stderr, flush=True)
                if self.running:
                    print(f"reproduce.py: waiting for {sorted(self.running)} to finish; nothing new starts", file=sys.stderr, flush=True)


def execute(args, steps: list[Step], on_done=None) -> int:
    """Run the steps not done yet (``args.jobs`` at once, each when its needs are done); ``on_done(out, steps,
    started)`` (the summary) once every step is done. Returns the exit code: 0, 1 (a step failed), 143 (SIGTERM)."""
    out = Path(args.out)
    pending, done, state = select_pending(args, steps, out)
    started = time.time()
    scheduler = Scheduler(args, steps, pending, done, state)
    scheduler.run()
    if scheduler.received:
        print(f"reproduce.py: interrupted by {signal.Signals(scheduler.received[0]).name}. Run the same command again to "
              "continue (finished steps are skipped, training resumes from its last checkpoint).", file=sys.stderr, flush=True)
        return 143
    if scheduler.failures:
        # a step stopped by SIGTERM sent to it directly (a scheduler signals every process of the job): resumable
        return 143 if any(rc in (143, -signal.SIGTERM) for _, rc in scheduler.failures) else 1
    if len(done) == len(steps):
        path = on_done(out, steps, started) if on_done else None
        print(f"all {len(steps)} steps done" + (f": {path}" if path else ""), flush=True)
    else:
        print(f"steps not done yet: {[s.name for s in steps if s.name not in done]}", flush=True)
    return 0


def redo(out: Path, step: Step) -> None:
    marker_path(out, step).unlink(missing_ok=True)
    target = Path(step.output)
    if target.exists():
        aside = target.with_name(f"{target.name}.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        target.rename(aside)
        print(f"--redo {step.name}: moved {target} to {aside}", flush=True)


# --------------------------------------------------------------------------------------------- slurm
# The end of each SLURM script: run "$@" (the driver) in the background so that the batch shell can pass SIGTERM on
# (--signal=B:TERM@300), wait until it has really exited (a trapped signal interrupts `wait`), and requeue the job when
# the driver stopped for a signal (exit 143): the requeued task resumes with --ckpt_path last.
SLURM_RUNNER = (
    '"$@" &\nPID=$!\ntrap \'kill -TERM $PID 2>/dev/null\' TERM INT\n'
    'wait $PID; RC=$?\nwhile kill -0 $PID 2>/dev/null; do wait $PID; RC=$?; done\n'
    'if [ "$RC" -eq 143 ]; then\n'
    '  echo "pre-empted or out of time: requeueing (training resumes from its last checkpoint)"\n'
    '  scontrol requeue "$SLURM_JOB_ID" || true\nfi\nexit $RC\n'
)


def driver_args(args) -> list[str]:
    """The driver's own arguments, paths absolute: what a SLURM task runs from the repository root. A job of several
    tasks (``--slurm_nodes`` x ``--slurm_gpus_per_node``) trains on all of them: each training step is started with
    ``srun``, one DDP process per task."""
    out = ["--out", args.out]
    if args.slurm_nodes * args.slurm_gpus_per_node > 1:
        out += ["--train_nodes", str(args.slurm_nodes), "--train_devices", str(args.slurm_gpus_per_node), "--srun"]
    for opt in ("mimic", "laion", "reports", "images", "sd", "cxr_bert", "xrv_cache_dir", "inception_weights", "wandb_mode"):
        value = getattr(args, opt)
        if value and not (args.demo and opt == "images"):
            out += [f"--{opt}", str(value)]
    if args.text_encoders:
        out += ["--text_encoders", *args.text_encoders]
    return out + (["--demo"] if args.demo else [])


def write_slurm(args, steps: list[Step]) -> Path:
    """``array.sbatch`` (one task per independent step, requeued on pre-emption), ``final.sbatch`` and ``submit.sh``."""
    out = Path(args.out).resolve()
    folder = out / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    driver = "python " + " ".join(shlex.quote(a) for a in [str(REPO / "reproduce.py"), *driver_args(args), "--quiet"])
    independent = [s.name for s in steps if not s.needs]
    extra = "".join(f"#SBATCH --{opt}\n" for opt in args.slurm_opt or [])
    nodes, gpus = args.slurm_nodes, args.slurm_gpus_per_node
    # one task per GPU: Lightning's SLURMEnvironment takes each task as one DDP process (--trainer.devices = tasks per
    # node, --trainer.num_nodes = nodes)
    tasks = f"#SBATCH --nodes={nodes}\n#SBATCH --ntasks-per-node={gpus}\n" if nodes * gpus > 1 else ""
    header = ("#!/bin/bash\n" + tasks +
              f"#SBATCH --gres=gpu:{gpus}\n#SBATCH --cpus-per-task=8\n#SBATCH --mem=64G\n#SBATCH --time={{time}}\n"
              "#SBATCH --requeue\n#SBATCH --signal=B:TERM@300\n" + extra)
    runner = SLURM_RUNNER
    array = (header.format(time=args.slurm_time) +
             f"#SBATCH --job-name=cxr-reproduce\n#SBATCH --array=0-{len(independent) - 1}\n"
             f"#SBATCH --output={folder}/logs/%x_%A_%a.out\n"
             "# One task per step that needs no other; each task resumes its own run (--ckpt_path last).\n"
             f"cd {shlex.quote(str(REPO))}\n"
             "STEPS=(" + " ".join(shlex.quote(n) for n in independent) + ")\n"
             'STEP=${STEPS[$SLURM_ARRAY_TASK_ID]}\n'
             'set -- ' + driver + ' --only "$STEP"\n' + runner)
    final = (header.format(time=args.slurm_time) +
             f"#SBATCH --job-name=cxr-reproduce-final\n#SBATCH --output={folder}/logs/%x_%j.out\n"
             "# Everything left (the generation study), then summary.md: finished steps are skipped.\n"
             f"cd {shlex.quote(str(REPO))}\n"
             "set -- " + driver + "\n" + runner)
    (folder / "array.sbatch").write_text(array)
    (folder / "final.sbatch").write_text(final)
    submit = (f"#!/bin/bash\nset -euo pipefail\ncd {shlex.quote(str(folder))}\n"
              "ARRAY=$(sbatch --parsable array.sbatch)\n"
              "FINAL=$(sbatch --parsable --dependency=afterok:${ARRAY%%;*} final.sbatch)\n"
              'echo "submitted array job $ARRAY (' + str(len(independent)) + ' steps) and final job $FINAL"\n')
    (folder / "submit.sh").write_text(submit)
    (folder / "submit.sh").chmod(0o755)
    return folder


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The runbook: docs/reproduce.md")
    p.add_argument("--out", required=True, help="results folder (runs, studies, summary.md, provenance.json)")
    p.add_argument("--mimic", help="MIMIC-CXR-JPG v2.0.0 root (holds mimic-cxr-2.0.0-metadata.csv.gz and files/)")
    p.add_argument("--laion", help="folder (or glob) of LAION-400M metadata parquet files, for the projection runs")
    p.add_argument("--reports", help="the unpacked mimic-cxr-reports.zip (files/pXX/pSUBJECT/sSTUDY.txt), for the text-encoder study "
                   "(default: MIMIC/mimic-cxr-reports)")
    p.add_argument("--images", help="a reviewed selected.csv (dicom_id, finding) of hand-picked training images for the U-Net and "
                   "textual-inversion runs; write candidates with `python -m datamodules.candidates` (default: 5 per finding, "
                   "sampled with the seed)")
    p.add_argument("--sd", default=SD14, help=f"Stable Diffusion v1.4: hub id or local folder (default {SD14})")
    p.add_argument("--cxr_bert", default=CXR_BERT, help=f"the projection runs' domain encoder: hub id or folder (default {CXR_BERT})")
    p.add_argument("--text_encoders", nargs="+", metavar="ENC", help="the text-encoder study's encoders (default: the paper's "
                   "seven from the hub); KEY=FOLDER for local copies, e.g. cxr-bert-specialized=/models/cxr-bert")
    p.add_argument("--xrv_cache_dir", help="folder holding torchxrayvision's DenseNet weights (default: xrv's own cache)")
    p.add_argument("--inception_weights", help="FID Inception weights file (default: torch.hub cache)")
    p.add_argument("--wandb_mode", default="auto", choices=("auto", "online", "offline", "disabled"),
                   help="for the training runs (default auto: online when WANDB_API_KEY is set; --demo: disabled)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the plan (commands, state, cost) and stop")
    mode.add_argument("--slurm", action="store_true", help="write a SLURM job-array script into OUT/slurm and stop")
    p.add_argument("--demo", action="store_true", help="the whole reproduction at tiny scale on a CPU: phantom data, tiny models")
    p.add_argument("--jobs", type=int, default=None, help="steps run at once (default 1, or one per --gpus); a step starts "
                   "once what it needs is done; with several, step output goes to OUT/logs/ only")
    p.add_argument("--gpus", type=lambda v: [g.strip() for g in v.split(",") if g.strip()], default=None, metavar="0,1,...",
                   help="GPUs to spread the steps over: each running step sees one (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (names as in --dry-run)")
    p.add_argument("--redo", nargs="+", metavar="STEP", help="run these finished steps again (a run folder is kept aside)")
    p.add_argument("--slurm_time", default="08:00:00", help="per-task time limit in the SLURM scripts (default 08:00:00)")
    p.add_argument("--slurm_opt", action="append", metavar="KEY=VALUE", help="an extra #SBATCH option, e.g. partition=gpu (repeatable)")
    p.add_argument("--slurm_nodes", type=int, default=1, help="nodes per SLURM task: each training run is one DDP run over "
                   "all of them, started with srun (default 1); the run folder must be on a file system every node sees")
    p.add_argument("--slurm_gpus_per_node", type=int, default=1, help="GPUs (one srun task, one DDP process each) per node "
                   "in the SLURM scripts (default 1)")
    p.add_argument("--train_nodes", type=int, default=1, help="nodes of each training run (--trainer.num_nodes; default 1)")
    p.add_argument("--train_devices", type=int, default=1, help="processes per node of each training run (--trainer.devices, "
                   "DDP when more than one process in all; default 1)")
    p.add_argument("--srun", action="store_true", help="start every step with srun (what the SLURM scripts of several "
                   "tasks pass): a training step on every task, any other on one")
    p.add_argument("--quiet", action="store_true", help="send step output only to OUT/logs/, not the terminal")
    return p


def check_inputs(args, p: argparse.ArgumentParser) -> None:
    if args.jobs is None:  # the demo: one step per core (up to 4), each step's torch on the cores left to it
        args.jobs = len(args.gpus) if args.gpus else (min(4, os.cpu_count() or 1) if args.demo else 1)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected 1 or more")
    for opt in ("slurm_nodes", "slurm_gpus_per_node", "train_nodes", "train_devices"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt} {getattr(args, opt)}: expected 1 or more")
    if args.gpus and args.jobs > len(args.gpus):
        p.error(f"--jobs {args.jobs} with --gpus {','.join(args.gpus)}: at most one step per GPU ({len(args.gpus)})")
    if args.demo:
        for opt in ("mimic", "laion", "reports", "text_encoders"):
            if getattr(args, opt):
                p.error(f"--demo writes its own data and uses tiny models; --{opt} is not used with it")
        if args.wandb_mode == "auto":
            args.wandb_mode = "disabled"
        return
    missing = [f"--{o}" for o in ("mimic", "laion") if not getattr(args, o)]
    if missing:
        p.error(f"{' and '.join(missing)} required (or --demo for the tiny CPU reproduction)")
    mimic = Path(args.mimic).expanduser()
    if not (mimic / "mimic-cxr-2.0.0-metadata.csv.gz").is_file():
        p.error(f"--mimic {mimic}: not a MIMIC-CXR-JPG v2.0.0 root (no mimic-cxr-2.0.0-metadata.csv.gz there)")
    from datamodules.laion import LAIONDataError, resolve_files

    try:
        resolve_files(args.laion)
    except LAIONDataError as err:
        p.error(f"--laion {err}")
    if args.reports is None:
        default = mimic / "mimic-cxr-reports"
        if not default.is_dir():
            p.error(f"--reports required: the text-encoder study reads the MIMIC-CXR reports (unpack mimic-cxr-reports.zip "
                    f"and pass that folder, or place it at {default})")
        args.reports = str(default)
    elif not Path(args.reports).expanduser().is_dir():
        p.error(f"--reports {args.reports}: no such folder")
    if args.images and not Path(args.images).is_file():
        p.error(f"--images {args.images}: no such file (write candidates with `python -m datamodules.candidates`)")


def absolute(args) -> None:
    """Paths absolute: every step runs from the repository root, wherever the driver was started."""
    for opt in ("out", "mimic", "laion", "reports", "images", "xrv_cache_dir", "inception_weights"):
        value = getattr(args, opt)
        if value:
            setattr(args, opt, str(Path(value).expanduser().resolve()))
    for opt in ("sd", "cxr_bert"):  # a hub id stays an id; an existing folder becomes absolute
        value = getattr(args, opt)
        if Path(value).expanduser().exists():
            setattr(args, opt, str(Path(value).expanduser().resolve()))


def prepare_demo(args) -> None:
    """Phantom MIMIC-CXR-JPG data, synthetic LAION parquet files and the proposed hand-picked images, into OUT/data.

    The demo data come from the ``synthetic`` package, which the production code never imports: it is run as
    ``python -m synthetic.demo_data``."""
    data = Path(args.out) / "data"
    command = [sys.executable, "-m", "synthetic.demo_data", str(data), "--findings", *DEMO_CLASSES]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise ReproduceError(f"writing the demo data failed ({shlex.join(command)}):\n{done.stderr[-2000:]}")
    if not args.images:
        args.images = str(data / "selected.csv")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    check_inputs(args, p)
    args.argv = ["reproduce.py", *argv]
    absolute(args)
    out = Path(args.out)
    try:
        if args.demo:
            prepare_demo(args)
        steps = build_plan(args)
        if args.dry_run:
            print_plan(out, steps)
            return 0
        if args.slurm:
            folder = write_slurm(args, steps)
            print(f"wrote {folder}/array.sbatch ({sum(not s.needs for s in steps)} tasks), final.sbatch and submit.sh. "
                  f"Review the #SBATCH lines (partition, time, GPUs), then run: bash {folder}/submit.sh")
            return 0
        out.mkdir(parents=True, exist_ok=True)
        from evaluation.reproduction_summary import write_summary

        return execute(args, steps, on_done=lambda out_, steps_, started: write_summary(out_, steps_, RUNS, args, started))
    except (ReproduceError, FileNotFoundError) as err:
        print(f"reproduce.py: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad files read while planning (image list, configs): the message names them
        print(f"reproduce.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(run_main("reproduce.py", main))
