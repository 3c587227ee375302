"""The run folder: everything one training run leaves, behind one object.

::

    runs/<name>/
      checkpoints/last.ckpt    what was trained, the optimizer and the loop state (resume point)
      checkpoints/last.prev.ckpt  the checkpoint before it (a fall-back should last.ckpt ever be unreadable)
      config.yaml              the first start's resolved configuration (never overwritten)
      configs/start-N.yaml     each start's resolved configuration
      .lock                    held by the training process using the folder (see :class:`RunLock`)
      provenance.json          one record per start (core.provenance)
      data.json                the ids the run trains and validates on
      wandb_run_id.txt, wandb/ the W&B run (one id for every start of the run)
      losses.csv, samples/, fid.csv

:class:`RunFolder` owns the name, checkpoint resolution (``last``), the W&B id, ``data.json`` and provenance;
``train.py``, ``export.py``, ``generate.py``, the studies and ``reproduce.py`` all go through it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from core import provenance
from core.cache import atomic_write, lock_holder
from core.errors import UserError

DATA_SCHEMA = "cxr-diffusion/data/1"


class RunFolderError(UserError, FileNotFoundError):
    """A run folder, or a file it should hold, is missing or unreadable."""


class RunFolderLocked(UserError, RuntimeError):
    """Another process is training into this run folder."""


class RunNameError(UserError, ValueError):
    """A run name that is not one folder name inside the runs folder."""


# what a start writes into a new run folder before training starts: its lock and the W&B run (Lightning starts W&B in
# the trainer's setup, before the datamodule, the callbacks and the fit-time preparation may still refuse the start)
BEFORE_TRAINING = frozenset({".lock", "wandb_run_id.txt", "wandb"})


def check_run_name(name: str) -> str:
    """``name`` if it is one folder name: ``../x``, ``/abs/path`` or ``..`` would put the run outside ``--runs_dir`` (or
    make the runs folder, or what holds it, the run folder)."""
    if "/" in name or name in (".", ".."):  # an absolute path starts with '/'
        raise RunNameError(f"--run_name {name}: a run name is one folder name inside --runs_dir (no '/', '.' or '..'); "
                           "to keep runs in another folder, pass --runs_dir THAT_FOLDER")
    return name


class RunLock:
    """An exclusive lock on a run folder for the life of one process: a POSIX record lock (``fcntl.lockf``) on
    ``<run>/.lock``, which also records the holder's PID, host and start time.

    The kernel releases the lock whenever the process ends, SIGKILL included; the file stays and is simply locked again
    by the next start. On a local disk this is exact. On shared file systems it is as strong as their POSIX locks: NFSv4
    (and v3 with lockd), GPFS and BeeGFS with global locks enforce it across machines (if the holder's machine dies, the
    server frees the lock when its lease expires, about 90 s on NFSv4); Lustre does only when mounted with ``-o flock``
    (with ``localflock``, only between processes on one node). Where the file system refuses locks altogether, the run
    goes on with a warning that two starts would not be refused.
    """

    UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def holder(self) -> str:
        return lock_holder(self.path)

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise RunFolderLocked(f"{self.path.parent}: another training process is using this run folder ({self.holder()}). "
                                      "Wait for it to end, or use --run_name NEW for a separate run") from None
            if err.errno in self.UNSUPPORTED:
                print(f"warning: the file system under {self.path.parent} does not support file locks ({err.strerror}); "
                      "a second start into this run folder would not be refused", file=sys.stderr, flush=True)
                return self
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the lock
            self._fd = None


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def named(cls, runs_dir: str | Path, name: str) -> "RunFolder":
        """``runs_dir/name``; a name that is not one folder name is refused (:func:`check_run_name`)."""
        return cls(Path(runs_dir) / check_run_name(name))

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ files
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    def lock(self) -> RunLock:
        """Create the folder and hold its :class:`RunLock` (refused, naming the holder, while another process has it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return RunLock(self.lock_file).acquire()

    def remove_if_unused(self) -> bool:
        """Remove the folder if it holds nothing but what a start writes before training starts (:data:`BEFORE_TRAINING`):
        for a start, into a folder it made, that was refused before it trained. Anything else keeps the folder."""
        if not self.path.is_dir() or any(p.name not in BEFORE_TRAINING for p in self.path.iterdir()):
            return False
        shutil.rmtree(self.path)
        return True

    @property
    def start_configs(self) -> Path:
        return self.path / "configs"

    def next_start_config(self) -> Path:
        """``configs/start-N.yaml`` for this start (N counts the starts, from 1)."""
        done = [int(p.stem.split("-")[1]) for p in self.start_configs.glob("start-*.yaml") if p.stem.split("-")[1].isdigit()]
        return self.start_configs / f"start-{max(done, default=0) + 1}.yaml"

    def latest_config_file(self) -> Path:
        """The newest start's configuration, or ``config.yaml`` in a run folder written before per-start configs."""
        starts = sorted(self.start_configs.glob("start-*.yaml"), key=lambda p: int(p.stem.split("-")[1]) if p.stem.split("-")[1].isdigit() else 0)
        return starts[-1] if starts else self.config_file

    @property
    def losses_file(self) -> Path:
        return self.path / "losses.csv"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def data_file(self) -> Path:
        return self.path / "data.json"

    @property
    def provenance_file(self) -> Path:
        return self.path / "provenance.json"

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.ckpt"))

    # ------------------------------------------------------------------ checkpoints
    def resume_checkpoint(self, ckpt: Optional[str]) -> Optional[Path]:
        """What ``--ckpt_path`` means for training: ``None`` (fresh), ``last`` (this run's last.ckpt, or None when the
        run has none yet, so a requeue script can always pass it) or a checkpoint file."""
        if ckpt is None:
            return None
        if ckpt == "last":
            return self.last_checkpoint if self.last_checkpoint.is_file() else None
        path = Path(ckpt)
        if not path.is_file():
            raise RunFolderError(f"--ckpt_path {ckpt}: no such checkpoint file")
        return path

    def checkpoint(self, ckpt: Optional[str] = "last") -> Path:
        """An existing checkpoint of this run, for loading its weights: ``last``, ``best`` (``checkpoints/best.ckpt``, kept by
        ``BestCheckpoint``) or a file name or path."""
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: no such run folder")
        if ckpt in (None, "last"):
            if not self.last_checkpoint.is_file():
                raise RunFolderError(f"{self.path}: no checkpoint ({self.last_checkpoint} is missing); train the run first")
            return self.last_checkpoint
        if ckpt == "best":
            best = self.checkpoints / "best.ckpt"
            if not best.is_file():
                why = ("no validation met its copy-rate limit (see best.json)" if (self.path / "best.json").is_file()
                       else "the run has no BestCheckpoint callback")
                raise RunFolderError(f"{self.path}: no best.ckpt: {why}; export --ckpt last, or train with a "
                                     "callbacks.best_checkpoint.BestCheckpoint")
            return best
        path = Path(ckpt)
        if not path.is_file():
            path = self.checkpoints / ckpt
        if not path.is_file():
            raise RunFolderError(f"{ckpt}: no such checkpoint (looked in {self.checkpoints})")
        return path

    def config(self) -> dict:
        """The run's resolved configuration as of its latest start (``configs/start-N.yaml``, else ``config.yaml``)."""
        import yaml

        path = self.latest_config_file()
        if not path.is_file():
            raise RunFolderError(f"{self.config_file}: missing; every run folder written by train.py has one")
        return yaml.safe_load(path.read_text())

    # ------------------------------------------------------------------ W&B
    @property
    def wandb_id_file(self) -> Path:
        return self.path / "wandb_run_id.txt"

    def wandb_id(self) -> str:
        """The run's W&B id: read from ``wandb_run_id.txt``, or made and written there on first use.

        The first process to write it wins: every process of a multi-node run asks at about the same time, and each must
        get the id global rank 0 logs under (a later writer replacing the file would send a resume to another W&B run)."""
        id_file = self.wandb_id_file
        if id_file.is_file():
            return id_file.read_text().strip()
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = id_file.with_name(f".{id_file.name}.tmp-{os.getpid()}")
        tmp.write_text(uuid.uuid4().hex[:12] + "\n")
        try:
            os.link(tmp, id_file)  # atomic, complete once visible, and refused when the file exists
        except FileExistsError:
            pass  # another process wrote it first: its id is the run's
        except OSError:  # a file system without hard links: a rename (the last writer wins there)
            os.replace(tmp, id_file)
        finally:
            tmp.unlink(missing_ok=True)
        return id_file.read_text().strip()

    # ------------------------------------------------------------------ data and provenance
    def write_data(self, manifest: dict) -> Path:
        """``data.json``: what the run trains and validates on (ids only: no pixels, no report text)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.data_file, (json.dumps({"schema": DATA_SCHEMA, **manifest}, indent=1, default=str) + "\n").encode())
        return self.data_file

    def data(self) -> dict:
        if not self.data_file.is_file():
            raise RunFolderError(f"{self.data_file}: missing; train.py writes it when a run starts")
        return json.loads(self.data_file.read_text())

    def record_start(self, settings: dict, inputs: dict, argv=None) -> Path:
        """Append this start's provenance record (``what: train``)."""
        return provenance.write(self.provenance_file, provenance.record("train", settings, inputs, argv), append=True)

    def starts(self) -> list[dict]:
        return provenance.read(self.provenance_file)
