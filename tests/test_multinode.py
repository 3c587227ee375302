"""Multi-node training as a cluster runs it, on one machine: two "nodes" of two CPU processes each, over gloo.

Two runs of the U-Net demo step that ``reproduce.py --demo`` plans (its config, data and image list), 8 steps each:

* **straight**: each node's ``train.py`` started by hand, as a launcher does (``MASTER_ADDR``, ``MASTER_PORT``,
  ``NODE_RANK``, ``WORLD_SIZE``; ``--trainer.num_nodes 2 --trainer.devices 2``): Lightning's ``LightningEnvironment``
  spawns each node's second process. One cache root shared by both nodes, W&B offline.
* **SLURM**: the job-array task that ``reproduce.py --slurm --slurm_nodes 2 --slurm_gpus_per_node 2`` writes, run
  under bash with a stand-in ``srun`` (one process per task with SLURM's variables: Lightning's ``SLURMEnvironment``)
  and ``scontrol`` on ``PATH``, both recording their calls. Each node has its own cache root (node-local disks). SIGTERM
  reaches every rank mid-run (what a time limit or ``scancel`` does), the task requeues itself, and the requeued task
  resumes to the straight run's final weights.

Every process of both runs carries :class:`RankLog` (``PYTHONPATH=tests``), which records what that rank saw.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from core.cache import RowBlocks

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PYTHON = sys.executable
NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
STEPS = 8  # the demo's U-Net steps (reproduce.DEMO_STEPS)


class RankLog(Callback):
    """In every process of a run: its ranks and cluster environment, the cache root and latent cache it used, its W&B
    run id, the batches it trained on and the checkpoint files it wrote itself, in ``<run>/ranks/rank<r>.json``
    (rewritten after every batch, so a test can also watch the run's progress)."""

    def __init__(self):
        self.record: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        from core.cache import cache_root

        saves: list = []
        io = trainer.strategy.checkpoint_io
        write = io.save_checkpoint

        def save(checkpoint, path, storage_options=None):  # only the process that writes the file calls this
            saves.append(str(path))
            write(checkpoint, path, storage_options)
            self._dump(trainer)

        io.save_checkpoint = save
        self.record = {"rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
                       "world": trainer.world_size, "pid": os.getpid(),
                       "environment": type(trainer.strategy.cluster_environment).__name__,
                       "cache_root": str(cache_root()), "wandb_id": trainer.logger.version if trainer.logger else None,
                       "latents": None, "batches": [], "saves": saves}

    def on_train_start(self, trainer, pl_module) -> None:
        latents = trainer.datamodule.prepared.latents
        self.record["latents"] = str(latents.directory) if latents is not None else None
        self._dump(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.record["batches"].append([trainer.global_step, list(batch["dicom_id"])])
        self._dump(trainer)

    def _dump(self, trainer) -> None:
        path = Path(trainer.default_root_dir) / "ranks" / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, path)


RANK_LOG = "--trainer.callbacks+=test_multinode.RankLog"
# Each image encoded alone into the latent cache, and one thread per process (clean_env): a cache built by 4 ranks
# (blocks of 3, 3, 2, 2 images) then holds the very floats of one built by 2 (5, 5), and both runs train alike; CPU
# convolutions round differently for other batch compositions and thread counts (by ~1e-6).
ONE_BY_ONE = ["--model.init_args.latent_cache_batch_size", "1"]

# SLURM's srun, as far as train.py and Lightning see it: "$@" once per task (--nodes x tasks per node, from the job's
# SLURM_NNODES and SLURM_NTASKS_PER_NODE or srun's own --nodes/--ntasks), each with the variables SLURMEnvironment
# reads; SIGTERM and SIGINT forwarded to every task; the exit status the first failing task's. Stand-in only: every
# node's CXR_DIFFUSION_CACHE is mapped to <it>/node<N> (a node-local disk under the same path on each node), and the
# arguments in SRUN_APPEND (JSON) are added to a train.py command. Each call is logged to SRUN_LOG, one JSON line
# when the tasks start and one when they end.
SRUN = r'''#!{python}
import json, os, signal, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes = int(opts.get("nodes", os.environ["SLURM_NNODES"]))
ntasks = int(opts.get("ntasks", nodes * int(os.environ["SLURM_NTASKS_PER_NODE"])))
if any(a.endswith("train.py") for a in args):
    args += json.loads(os.environ.get("SRUN_APPEND", "[]"))
procs = []
for task in range(ntasks):
    node = task // (ntasks // nodes)
    env = dict(os.environ, SLURM_NTASKS=str(ntasks), SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(ntasks // nodes),
               SLURM_PROCID=str(task), SLURM_LOCALID=str(task % (ntasks // nodes)), SLURM_NODEID=str(node))
    if env.get("CXR_DIFFUSION_CACHE"):
        env["CXR_DIFFUSION_CACHE"] = os.path.join(env["CXR_DIFFUSION_CACHE"], f"node{{node}}")
    procs.append(subprocess.Popen(args, env=env))
def forward(signum, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
log = os.environ["SRUN_LOG"]
with open(log, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "ntasks": ntasks, "pids": [p.pid for p in procs]}}) + "\n")
rcs = [p.wait() for p in procs]
rcs = [128 - rc if rc < 0 else rc for rc in rcs]
with open(log, "a") as fh:
    fh.write(json.dumps({{"rcs": rcs}}) + "\n")
sys.exit(next((rc for rc in rcs if rc), 0))
'''


def free_port(low: int = 15000, high: int = 25000) -> int:
    """A free TCP port in [low, high) (SLURMEnvironment's MASTER_PORT is 15000 + the job id's last four digits)."""
    for port in range(low + os.getpid() % 5000, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def clean_env(**extra: str) -> dict:
    """This process's environment without any cluster's variables (the tests may themselves run inside a SLURM job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK",
                                                       "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    return dict(env, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", **extra)


def rank_logs(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank*.json"))]


def wait_for(condition, procs: list, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise AssertionError(f"{what}: not seen (exits {[p.poll() for p in procs]})")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """``reproduce.py --demo --slurm --slurm_nodes 2 --slurm_gpus_per_node 2``: the demo data and configs, the SLURM
    scripts, and the U-Net step's training command on 2 x 2 processes, as the scripts' driver plans it."""
    import reproduce

    out = tmp_path_factory.mktemp("multinode") / "results"
    assert reproduce.main(["--demo", "--out", str(out), "--slurm", "--slurm_nodes", str(NODES),
                           "--slurm_gpus_per_node", str(PER_NODE)]) == 0
    args = reproduce.build_parser().parse_args(["--demo", "--out", str(out), "--images", str(out / "data" / "selected.csv"),
                                                "--train_nodes", str(NODES), "--train_devices", str(PER_NODE), "--srun"])
    reproduce.check_inputs(args, reproduce.build_parser())
    (step,) = [s for s in reproduce.build_plan(args) if s.name == "train/unet"]
    ids = step.argv[step.argv.index("--data.init_args.dicom_ids") + 1]  # "[id, id, ...]"
    return {"out": out, "step": step, "train_ids": sorted(ids.strip("[]").split(", "))}


@pytest.fixture(scope="module")
def straight(demo, tmp_path_factory) -> dict:
    """The U-Net demo step, uninterrupted, on two nodes started by hand (LightningEnvironment), one shared cache root,
    W&B offline; while it trains, a second lock on its run folder is attempted."""
    from core.run_folder import RunFolderLocked, RunLock

    tmp = tmp_path_factory.mktemp("straight")
    run = tmp / "runs" / "unet"
    command = [PYTHON, *map(str, demo["step"].argv), "--runs_dir", str(tmp / "runs"), "--wandb_mode", "offline", RANK_LOG,
               *ONE_BY_ONE]
    port = str(free_port())
    procs, logs = [], []
    for node in range(NODES):
        log = open(tmp / f"node{node}.log", "w")
        logs.append(log)
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), WORLD_SIZE=str(WORLD),
                        CXR_DIFFUSION_CACHE=str(tmp / "shared_cache"))
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        lock = run / ".lock"
        wait_for(lambda: lock.is_file() and lock.read_text().strip(), procs, "the run folder's lock")
        holder = json.loads(lock.read_text())
        try:
            RunLock(lock).acquire().release()
            refused = None
        except RunFolderLocked as err:
            refused = str(err)
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    output = [(tmp / f"node{node}.log").read_text() for node in range(NODES)]
    assert codes == [0] * NODES, "\n".join(o[-4000:] for o in output)
    return {"run": run, "cache": tmp / "shared_cache", "pids": [p.pid for p in procs], "holder": holder,
            "refused": refused, "output": output, "ranks": rank_logs(run)}


@pytest.mark.slow
def test_two_nodes_one_lock_holder_one_start_record_checkpoints_and_wandb_on_global_rank_zero(straight):
    run, ranks = straight["run"], straight["ranks"]
    assert [(r["rank"], r["node_rank"], r["local_rank"], r["world"]) for r in ranks] == \
        [(rank, rank // PER_NODE, rank % PER_NODE, WORLD) for rank in range(WORLD)]
    assert {r["environment"] for r in ranks} == {"LightningEnvironment"}
    # one lock holder: node 0's launcher; a second start is refused naming it, and no other rank ever asked
    assert straight["holder"]["pid"] == straight["pids"][0] == ranks[0]["pid"]
    assert straight["refused"] and f"PID {straight['pids'][0]}" in straight["refused"]
    # one start record, one config; checkpoints written by global rank 0 only, one file
    assert len(json.loads((run / "provenance.json").read_text())["records"]) == 1
    assert sorted(p.name for p in (run / "configs").iterdir()) == ["start-1.yaml"]
    assert ranks[0]["saves"] == [str(run / "checkpoints" / "last.ckpt")] and not any(r["saves"] for r in ranks[1:])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    # one W&B run, global rank 0's, under the id every rank was given and the run folder keeps for a resume
    wandb_id = (run / "wandb_run_id.txt").read_text().strip()
    assert {r["wandb_id"] for r in ranks} == {wandb_id}
    assert [p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")] == [wandb_id]


@pytest.mark.slow
def test_two_nodes_shard_the_data_by_global_rank_and_share_one_latent_cache_build(straight, demo):
    ranks, train_ids = straight["ranks"], demo["train_ids"]
    per_step = [[tuple(r["batches"][i][1]) for r in ranks] for i in range(STEPS)]
    assert all(len(r["batches"]) == STEPS for r in ranks)
    for shards in per_step:
        # every rank its own shard (the order padded to a multiple of 4, as DistributedSampler does): together every
        # training image, none twice but the padding's
        assert len(set(shards)) == WORLD
        seen = [i for shard in shards for i in shard]
        assert sorted(set(seen)) == train_ids and len(seen) == -(-len(train_ids) // WORLD) * WORLD
    assert sorted(d["dicom_id"] for d in json.loads((straight["run"] / "data.json").read_text())["train"]) == train_ids
    # a cache root both nodes see: one build, made by all four ranks together (a row block each)
    (entry,) = [p for p in (straight["cache"] / "latents").iterdir() if not p.name.startswith(".")]
    assert (entry / "ENTRY.json").is_file() and {r["latents"] for r in ranks} == {str(entry)}
    assert len(list(entry.glob("mean.*.npy"))) == WORLD
    assert not [p for p in (straight["cache"] / "latents").iterdir() if p.name.startswith(".")]  # no partial, no lock


def sbatch_env(script: Path, bin_dir: Path, port: int, **extra: str) -> dict:
    """What sbatch gives the batch shell of ``script``: the job's id, its array index, its nodes and tasks (read from
    the script's own #SBATCH lines)."""
    text = script.read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", text, re.M).group(1))
    return clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=str(port - 15000),
                     SLURM_JOB_NAME="cxr-reproduce", SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
                     SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(nodes * per_node),
                     SLURM_NODELIST="127.0.0.1", **extra)


@pytest.mark.slow
def test_slurm_task_on_two_nodes_sigterm_requeue_and_resume_to_the_straight_weights(demo, straight, tmp_path):
    """The array task of the U-Net step: SIGTERM to the batch shell (``--signal=B:TERM``) and to every rank at once
    (a time limit, ``scancel``): every rank saves-and-stops with 143, last.ckpt is complete, the task requeues itself;
    the requeued task resumes, with the same batches on every rank, to the straight run's final weights."""
    out = demo["out"]
    script = out / "slurm" / "array.sbatch"
    bin_dir, srun_log, scontrol_log = tmp_path / "bin", tmp_path / "srun.jsonl", tmp_path / "scontrol.txt"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN.format(python=PYTHON))
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {scontrol_log}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    steps = re.search(r"^STEPS=\((.*)\)$", script.read_text(), re.M).group(1).split()
    # StepDelay (it changes no number) keeps the run in training long enough to be signalled in mid-run
    delay = json.dumps({"class_path": "synthetic.testing.StepDelay", "init_args": {"seconds": 0.3}})
    env = sbatch_env(script, bin_dir, free_port(), SLURM_ARRAY_TASK_ID=str(steps.index("train/unet")),
                     SRUN_LOG=str(srun_log), SRUN_APPEND=json.dumps([RANK_LOG, f"--trainer.callbacks+={delay}", *ONE_BY_ONE]))
    run, cache = out / "runs" / "unet", out / "cache"

    first = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(rank_logs(run)) == WORLD and all(r["batches"] for r in rank_logs(run)), [first],
             "every rank training")
    tasks = json.loads(srun_log.read_text().splitlines()[0])["pids"]
    for pid in [first.pid, *tasks]:
        os.kill(pid, signal.SIGTERM)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 143, output[-3000:] + (out / "logs" / "train__unet.log").read_text()[-4000:]
    assert json.loads(srun_log.read_text().splitlines()[1])["rcs"] == [143] * WORLD  # every rank saved and stopped
    assert scontrol_log.read_text().split() == ["requeue", env["SLURM_JOB_ID"]] and "requeueing" in output
    stopped = rank_logs(run)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # complete: it loads
    assert 0 < saved["global_step"] < STEPS and all(len(r["batches"]) == saved["global_step"] for r in stopped)
    assert stopped[0]["saves"] == [str(run / "checkpoints" / "last.ckpt")] and not any(r["saves"] for r in stopped[1:])
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert {r["environment"] for r in stopped} == {"SLURMEnvironment"} and json.loads(run.joinpath(".lock").read_text())["pid"] == tasks[0]
    # each node its own cache root: one build per node, by that node's two ranks
    entries = {}
    for node in range(NODES):
        (entry,) = [p for p in (cache / f"node{node}" / "latents").iterdir() if not p.name.startswith(".")]
        assert len(list(entry.glob("mean.*.npy"))) == PER_NODE
        entries[node] = (entry, (entry / "ENTRY.json").stat().st_mtime_ns)
    assert [r["latents"] for r in stopped] == [str(entries[r // PER_NODE][0]) for r in range(WORLD)]
    assert entries[0][0].name == entries[1][0].name  # the same entry, built twice, to the same latents as the shared one
    (shared,) = [p for p in (straight["cache"] / "latents").iterdir() if not p.name.startswith(".")]
    for name in ("mean", "logvar"):
        rows = np.arange(len(RowBlocks(shared, name)))
        assert all(np.array_equal(RowBlocks(e, name)[rows], RowBlocks(shared, name)[rows]) for e, _ in entries.values())

    again = subprocess.run(["bash", str(script)], env=dict(env, SLURM_RESTART_COUNT="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=900)
    log = (out / "logs" / "train__unet.log").read_text()
    assert again.returncode == 0, again.stdout[-3000:] + log[-4000:]
    assert f"resuming {run} from {run / 'checkpoints' / 'last.ckpt'}" in log
    assert scontrol_log.read_text().split() == ["requeue", env["SLURM_JOB_ID"]]  # no second requeue
    assert (out / "steps" / "train__unet.json").is_file()
    resumed = rank_logs(run)
    for before, after, reference in zip(stopped, resumed, straight["ranks"]):  # no batch replayed or skipped
        assert before["batches"] + after["batches"] == reference["batches"]
    assert {node: (e, (e / "ENTRY.json").stat().st_mtime_ns) for node, (e, _) in entries.items()} == entries  # reused
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(straight["run"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == STEPS and final["state_dict"].keys() == reference["state_dict"].keys()
    # the same weights up to float rounding: the four gloo ranks' gradient sums round a little differently after a
    # restart (measured: 5e-4 of the update since the save, max 1.3e-6), where a batch replayed or skipped moves them by
    # a good part of one step's update (~0.1 of it)
    flat = lambda sd: torch.cat([sd[k].double().flatten() for k in sorted(sd)])  # noqa: E731
    update = (flat(reference["state_dict"]) - flat(saved["state_dict"])).norm()
    assert (flat(final["state_dict"]) - flat(reference["state_dict"])).norm() < 1e-2 * update


def test_every_process_of_a_run_gets_the_first_written_wandb_id(tmp_path, monkeypatch):
    """Every process of a multi-node run asks the run folder for its W&B id at about the same time (``wandb_logger`` in
    train.py, before any collective). A process that looked before another one wrote the id must still get the id in
    the file, not write its own over it: global rank 0 logs under its id, and a resume reads the file."""
    from core.run_folder import RunFolder

    run = RunFolder(tmp_path / "run")
    first = run.wandb_id()
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: False if self == run.wandb_id_file else is_file(self))
    assert run.wandb_id() == first  # a process that found no file yet
    assert run.wandb_id_file.read_text().strip() == first


def test_slurm_scripts_for_several_nodes_train_on_every_task_and_run_the_rest_on_one(tmp_path):
    """``--slurm_nodes 2 --slurm_gpus_per_node 4``: the scripts ask for 2 nodes of 4 tasks (one per GPU) and pass the
    driver the training processes and ``--srun``; the driver then starts each training step with ``srun`` on every task
    (``--trainer.num_nodes 2 --trainer.devices 4``, DDP) and every other step on one task. One node of one GPU writes
    the scripts as before: no srun, no trainer options."""
    import reproduce

    inputs = ["--out", str(tmp_path / "results"), "--mimic", str(tmp_path / "mimic"), "--laion", str(tmp_path / "laion")]

    def parsed(*extra: str):
        args = reproduce.build_parser().parse_args([*inputs, *extra])
        reproduce.absolute(args)
        return args

    args = parsed("--slurm", "--slurm_nodes", "2", "--slurm_gpus_per_node", "4")
    folder = reproduce.write_slurm(args, reproduce.build_plan(args))
    for name in ("array.sbatch", "final.sbatch"):
        text = (folder / name).read_text()
        assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=4\n#SBATCH --gres=gpu:4\n" in text
        assert " --train_nodes 2 --train_devices 4 --srun " in text
    for step in reproduce.build_plan(parsed("--train_nodes", "2", "--train_devices", "4", "--srun")):
        if step.name.startswith("train/"):
            assert step.launcher == ("srun",) and step.command().startswith("srun python train.py ")
            assert step.argv[-6:] == ["--trainer.num_nodes", "2", "--trainer.devices", "4", "--trainer.strategy", "ddp"]
        else:
            assert step.launcher == ("srun", "--nodes=1", "--ntasks=1") and "--trainer.num_nodes" not in step.argv

    single = parsed("--slurm")
    text = (reproduce.write_slurm(single, reproduce.build_plan(single)) / "array.sbatch").read_text()
    assert "--nodes" not in text and "--ntasks-per-node" not in text and "--srun" not in text and "#SBATCH --gres=gpu:1\n" in text
    assert all(not s.launcher and "--trainer.num_nodes" not in s.argv for s in reproduce.build_plan(single))
