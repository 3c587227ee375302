"""train.py's reliability, second pass: the run-folder lock, checks before anything is written, Ctrl-C, a real full
disk, and one clear line for every error at start (issue 19). Each test reproduces the case as a user meets it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PYTHON, REPO, demo_args, run_train, train_and_signal, train_in_process


def snapshot(run: Path, records_only: bool = False) -> dict:
    """Every file of a run folder (but its lock and W&B folder) and its bytes; ``records_only``: only what describes the
    run (configs, data.json, provenance, W&B id), not what training adds to (checkpoints, losses)."""
    files = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
             if p.is_file() and p.name != ".lock" and "wandb" not in p.parts}
    if records_only:
        files = {k: v for k, v in files.items() if not k.startswith("checkpoints") and k != "losses.csv"}
    return files


def can_mount_in_a_user_namespace() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def in_small_filesystem(folder: Path, size: str, command: str, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run ``command`` (sh) with a real ``size`` tmpfs mounted at ``folder``, inside a user namespace (no root needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    remount = f" && mount -o remount,ro {folder}" if read_only else ""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {folder}{remount} && {command}"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=300)


namespaces = pytest.mark.skipif(not can_mount_in_a_user_namespace(), reason="this machine cannot mount a tmpfs in a user namespace")


@pytest.fixture
def ref_copy(reference_run, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the 24-step demo run as runs/ref, and the arguments that resume it."""
    run = tmp_path / "runs" / "ref"
    shutil.copytree(reference_run, run)
    return run, demo_args(tmp_path, "--run_name", "ref", "--trainer.max_steps", "30", "--ckpt_path", "last",
                          "--trainer.callbacks=[]", "--wandb_mode", "disabled")


# ---------------------------------------------------------------------------------------------- 1. the lock
@pytest.mark.slow
def test_a_second_start_into_a_busy_run_folder_is_refused_naming_the_holder(tmp_path):
    """Two real processes: the second start (another seed) is refused with the first one's PID and host and changes
    nothing; once the first is killed with SIGKILL, the kernel has freed the lock."""
    from core.run_folder import RunFolder

    args = demo_args(tmp_path, "--run_name", "X", "--trainer.max_steps", "200", "--wandb_mode", "disabled", "--trainer.callbacks=[]")
    run = tmp_path / "runs" / "X"
    first = subprocess.Popen([PYTHON, str(REPO / "train.py"), *args, "--trainer.callbacks+=synthetic.testing.StepDelay"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # training has started and its on_train_start records are written (losses.csv comes before data.json there)
        started = lambda: all((run / name).is_file() for name in ("losses.csv", "data.json", "provenance.json"))  # noqa: E731
        while not started() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the test could start a second one"
        before = snapshot(run, records_only=True)
        second = run_train(*args, "--seed_everything", "7", check=False)
        assert second.returncode == 1
        assert f"another training process is using this run folder (PID {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr and "--run_name NEW" in second.stderr
        assert snapshot(run, records_only=True) == before  # the first run's config, data and provenance untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    RunFolder(run).lock().release()  # SIGKILL released it


# ---------------------------------------------------------------------------------------------- 2, 3. checks before writing
@pytest.mark.slow
def test_a_refused_resume_writes_nothing(ref_copy):
    """A U-Net run resumed with the textual-inversion config: refused, and config.yaml, data.json, provenance and the
    checkpoints are byte-identical afterwards; no start config is added."""
    run, _ = ref_copy
    before = snapshot(run)
    code, _, err = train_in_process(*demo_args(run.parent.parent, "--run_name", "ref", "--ckpt_path", "last", "--wandb_mode",
                                               "disabled", config="textual_inversion_demo"))
    assert code == 1 and "train.py: error: the checkpoint does not match what this configuration trains" in err
    assert snapshot(run) == before


@pytest.mark.slow
def test_resume_on_another_base_model_is_refused_naming_both(ref_copy):
    run, args = ref_copy
    code, _, err = train_in_process(*args, "--model.init_args.model.pretrained", "tiny-random")
    assert code == 1
    assert "trained on base model 'tiny-phantom" in err and "this configuration loads 'tiny-random" in err
    assert "--model.init_args.model.pretrained tiny-phantom" in err


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [(["--data.init_args.batch_size", "2"], "batch_size 4 → 2"),
                                           (["--data.init_args.findings", "[Pleural Effusion]"], "findings"),
                                           (["--data.init_args.seed", "7"], "seed 0 → 7")])
def test_resume_with_another_batch_size_findings_or_data_seed_is_refused(ref_copy, change, named):
    run, args = ref_copy
    before = snapshot(run)
    code, _, err = train_in_process(*args, *change)
    assert code == 1 and "trained on other data than this configuration gives" in err and named in err
    assert snapshot(run) == before


@pytest.mark.slow
def test_resume_on_another_number_of_processes_is_refused_naming_both(ref_copy):
    """The epoch position is counted per process: a 1-process checkpoint resumed on 2 would replay or skip batches."""
    run, args = ref_copy
    before = snapshot(run)
    code, _, err = train_in_process(*args, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert code == 1 and "saved by a run on 1 process(es) (devices × nodes) and this start runs on 2" in err
    assert "resume on 1 process(es)" in err and snapshot(run) == before


@pytest.mark.slow
def test_every_start_keeps_its_own_config_and_config_yaml_is_never_overwritten(ref_copy):
    from core.run_folder import RunFolder

    run, args = ref_copy
    first = (run / "config.yaml").read_bytes()
    run_train(*args)
    assert (run / "config.yaml").read_bytes() == first
    starts = sorted(p.name for p in (run / "configs").glob("start-*.yaml"))
    assert starts == ["start-1.yaml", "start-2.yaml"]
    assert yaml.safe_load((run / "configs" / "start-2.yaml").read_text())["trainer"]["max_steps"] == 30
    assert RunFolder(run).config()["trainer"]["max_steps"] == 30  # export and generate read the latest start


@pytest.mark.slow
def test_a_truncated_last_checkpoint_is_named_with_the_one_before_it(ref_copy):
    run, args = ref_copy
    last = run / "checkpoints" / "last.ckpt"
    assert (run / "checkpoints" / "last.prev.ckpt").is_file()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    code, _, err = train_in_process(*args)
    assert code == 1 and f"{last}: unreadable checkpoint (truncated or corrupt" in err
    assert f"resume from it with --ckpt_path {run / 'checkpoints' / 'last.prev.ckpt'}" in err
    import export
    from core.errors import run_main

    last.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        run_main("export.py", export.main, [str(run), str(run.parent / "out")])
    assert exit_.value.code == 1  # export.py names the file and what is wrong with it too (stderr, one line)


# ---------------------------------------------------------------------------------------------- 5. Ctrl-C
@pytest.mark.slow
def test_ctrl_c_saves_at_the_batch_end_and_exits_130_and_a_second_aborts_at_once(tmp_path):
    args = demo_args(tmp_path, "--run_name", "c", "--trainer.max_steps", "200", "--wandb_mode", "disabled", "--trainer.callbacks=[]")
    run = tmp_path / "runs" / "c"
    code, _, err = train_and_signal(args, run / "losses.csv", signal.SIGINT, timeout=900)  # generous on a loaded machine
    assert code == 130, err[-2000:]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step >= 10 and f"received Ctrl-C (SIGINT): saved {run / 'checkpoints' / 'last.ckpt'} at step {step}" in err
    assert "Ctrl-C again to abort without saving" in err and "Traceback" not in err

    proc = subprocess.Popen([PYTHON, str(REPO / "train.py"), *args, "--ckpt_path", "last",
                             "--trainer.callbacks+=synthetic.testing.StepDelay", "--trainer.callbacks.init_args.seconds", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = len((run / "losses.csv").read_text().splitlines())
    while len((run / "losses.csv").read_text().splitlines()) <= rows and proc.poll() is None:
        time.sleep(0.05)  # losses.csv grows at the resumed run's first checkpoint
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err[-2000:]  # ended by the signal itself, not after a save
    torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # still a complete checkpoint


@pytest.mark.slow
def test_ctrl_c_before_training_stops_at_once_even_when_started_with_sigint_ignored(tmp_path):
    """A job started in the background of a script inherits SIGINT ignored; kill -INT during the imports still stops it."""
    proc = subprocess.Popen([PYTHON, str(REPO / "train.py"), *demo_args(tmp_path, "--run_name", "early")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a run that did not stop must not train on behind the suite
    # during the imports and model loading: stopped at once; if the signal lands in the trainer's setup (a loaded
    # machine): saved at the first batch end. Either way honoured, exit 130, never trained on
    stopped = "interrupted before training started; nothing saved" in err or "received Ctrl-C (SIGINT): saved" in err
    assert proc.returncode == 130 and stopped, err[-2000:]


def test_a_config_combination_refused_by_a_strategy_is_one_line(tmp_path):
    code, _, err = train_in_process(*demo_args(tmp_path, "--run_name", "ti", config="textual_inversion_demo"),
                                    "--model.init_args.prior_preservation.num_class_images", "4")
    assert code == 1 and "train.py: error: model.init_args.prior_preservation is set, but textual inversion" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------- 7. numbers at parse
@pytest.mark.parametrize("key, value, expected", [
    ("--trainer.max_steps", "-5", "at least 1, or -1"), ("--data.init_args.batch_size", "0", "at least 1"),
    ("--data.init_args.resolution", "0", "a positive multiple of 8"), ("--data.init_args.resolution", "100", "a positive multiple of 8"),
    ("--model.init_args.learning_rate", "-1.0", "positive"), ("--data.init_args.n_per_finding", "0", "at least 1"),
])
def test_impossible_numbers_are_refused_at_parse_naming_the_key(tmp_path, key, value, expected):
    code, _, err = train_in_process(*demo_args(tmp_path, "--run_name", "n", key, value))
    assert code == 1 and f"train.py: error: {key} {value}: must be {expected}" in err
    assert not (tmp_path / "runs" / "n").exists()  # no empty run folder left behind


# ---------------------------------------------------------------------------------------------- 8. a real full disk
CHECKPOINT_ON_A_FULL_DISK = """
import os, sys, torch
from callbacks.checkpointing import AtomicCheckpointIO, CheckpointSaveError
folder = sys.argv[1]; path = os.path.join(folder, "last.ckpt"); io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "w": torch.zeros(2**18)}, path)            # 1 MiB: fits
for margin in (AtomicCheckpointIO.MARGIN, -2**30):  # the second pass turns the free-space check off: torch's own failure
    io.MARGIN = margin
    try:
        io.save_checkpoint({"step": 2, "w": torch.zeros(2**23)}, path)  # 32 MiB on a 24 MiB file system
    except CheckpointSaveError as err:
        print("ERROR", err)
print("KEPT", torch.load(path, weights_only=True)["step"], sorted(os.listdir(folder)))
"""


@pytest.mark.slow
@namespaces
def test_disk_full_on_a_real_small_filesystem_is_one_clear_error(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(CHECKPOINT_ON_A_FULL_DISK)
    proc = in_small_filesystem(tmp_path / "disk", "24m", f"{PYTHON} {script} {tmp_path / 'disk'}")
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, proc.stdout + proc.stderr
    assert "not enough free space for the checkpoint" in errors[0] and "nothing written, the previous last.ckpt is intact" in errors[0]
    assert "could not write the checkpoint (torch's writer failed, most likely a full disk" in errors[1]
    assert "the previous last.ckpt is intact" in errors[1]
    assert "KEPT 1 ['last.ckpt']" in proc.stdout  # the earlier checkpoint survives, no partial file


def test_disk_full_reported_by_the_kernel_through_torch_is_one_clear_error(tmp_path):
    """Where no file system can be mounted: the same failure from /dev/full (the kernel's ENOSPC on every write)."""
    from callbacks.checkpointing import AtomicCheckpointIO, CheckpointSaveError

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    (tmp_path / f".last.ckpt.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(CheckpointSaveError, match="could not write the checkpoint .*the previous last.ckpt is intact"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1


# ---------------------------------------------------------------------------------------------- one line at start
def test_an_empty_config_file_is_named(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    code, _, err = train_in_process("--config", str(tmp_path / "empty.yaml"))
    assert code == 1 and f"--config {tmp_path / 'empty.yaml'}: is empty; expected a YAML mapping" in err


@pytest.mark.slow
@namespaces
def test_a_read_only_runs_dir_and_an_unwritable_cache_are_named(tmp_path):
    """A real read-only file system (root ignores permission bits, so chmod would prove nothing)."""
    ro = tmp_path / "ro"
    args = " ".join(demo_args(tmp_path, "--run_name", "r"))
    command = (f"{PYTHON} train.py {args.replace(str(tmp_path / 'runs'), str(ro / 'runs'))}; "
               f"CXR_DIFFUSION_CACHE={ro / 'cache'} {PYTHON} train.py {args}")
    proc = in_small_filesystem(ro, "1m", command, read_only=True)
    assert f"train.py: error: --runs_dir {ro / 'runs'} is not writable (Read-only file system)" in proc.stderr
    assert f"the cache folder CXR_DIFFUSION_CACHE = {ro / 'cache'} is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_online_wandb_without_network_is_named_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_MODE")
    started = time.monotonic()
    code, _, err = train_in_process(*demo_args(tmp_path, "--run_name", "w"))
    assert code == 1 and "127.0.0.1:9 cannot be reached" in err and "use --wandb_mode offline" in err
    assert time.monotonic() - started < 60 and not (tmp_path / "runs" / "w").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="must be at least 1"):
        import train

        argv = list(sys.argv)
        try:
            train.main([*demo_args(tmp_path), "--data.init_args.batch_size", "0", "--debug"])
        finally:
            sys.argv = argv


@pytest.mark.slow
def test_a_start_from_a_process_running_wandb_uses_its_own_wandb_service(tmp_path, monkeypatch):
    """W&B passes its service's address on to child processes (``WANDB_SERVICE``): a train.py started from a notebook
    or script that ran W&B, once that process ended, found a dead service and died in wandb.init with a traceback (or,
    with the service alive, found its own run id "in use" on a resume). Each train.py starts its own."""
    monkeypatch.setenv("WANDB_SERVICE", f"3-99999-unix-{tmp_path / 'gone' / 'socket'}")  # a service that has ended
    proc = run_train(*demo_args(tmp_path, "--run_name", "w", "--trainer.max_steps", "1", "--trainer.callbacks=[]",
                                "--wandb_mode", "offline"), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "w" / "wandb").is_dir()
