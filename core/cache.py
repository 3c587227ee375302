"""One cache for everything the suite computes once and reuses: resized images, VAE posteriors, class images,
document embeddings, text-encoder outputs (one file per prompt: :class:`GrowingEntry`).

* **One root**: ``$CXR_DIFFUSION_CACHE``, default ``~/.cache/cxr-diffusion`` (:func:`cache_root`); every datamodule and
  strategy takes an optional ``cache_dir`` that replaces it.
* **One key rule**: an entry lives in ``<root>/<kind>/<key>``, where ``key`` is the first 16 hex digits of the SHA-1 of
  the JSON of its *parts* (sorted keys): everything its contents depend on (weights, preprocessing, resolution, the
  image list, ...). Change a part and a new entry is built; a stale one is never read.
* **One rule for "complete"**: a complete entry folder holds ``ENTRY.json`` (its parts), written last. It is built in
  a hidden sibling folder (``.<key>.partial``) and renamed into place, which is atomic on a POSIX file system: a build
  killed half-way is never read. Entries of many small files that grow one file at a time (the resized-image cache)
  write each file to a temporary name and rename it (:func:`atomic_write`).
* **One builder at a time**: an entry's build holds a cross-process lock (:class:`EntryLock`, ``fcntl.flock`` on
  ``.<key>.lock`` beside the entry) from :meth:`~CacheEntry.begin` to :meth:`~CacheEntry.commit` (or
  :meth:`~CacheEntry.abort`). Runs started together with the same data (``reproduce.py --jobs``, a SLURM array, several
  configs sharing one latent cache) therefore never build into one partial folder at once: the second waits, saying so
  on stderr, then finds the entry complete (:meth:`~CacheEntry.lock` and a second :meth:`~CacheEntry.is_complete`). A
  builder that dies loses its lock with its process (the kernel releases it), so the next one takes over and starts its
  partial folder over; a stale partial folder is only ever removed by the lock's holder.

A build can be shared by several processes (DDP ranks, each filling its share of the partial folder): one of them
(the leader) takes the lock and :meth:`~CacheEntry.begin`\\ s it, every rank writes its own files, the leader
:meth:`~CacheEntry.commit`\\ s it, with barriers between. Large arrays are split into row blocks, one file per writer
(:func:`create_row_block`, read back as one array by :class:`RowBlocks`), so no two processes ever write one page of a
file: on NFS a client writes back whole pages, and rows interleaved across machines could be lost.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from core.errors import UserError

ENTRY_FILE = "ENTRY.json"
PARTS_FILE = "PARTS.json"  # in a partial folder: what it is being built for
ENV_VAR = "CXR_DIFFUSION_CACHE"


class CacheError(UserError, ValueError):
    """A cache folder holds something other than what is asked for."""


def cache_root(override: Optional[str | Path] = None) -> Path:
    """``override``, else ``$CXR_DIFFUSION_CACHE``, else ``~/.cache/cxr-diffusion``."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "cxr-diffusion").expanduser()


def cache_key(parts: dict) -> str:
    """The key of an entry: 16 hex digits of the SHA-1 of its parts as sorted JSON."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: readers see all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock_holder(path: Path) -> str:
    """Who holds a lock file, as its holder recorded itself (PID, host, since when), for the message of one who waits."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that has not recorded itself yet"
    return f"PID {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"


class EntryLock:
    """The cross-process lock of one cache entry: ``fcntl.flock`` on ``<parent>/.<name>.lock``, which also records its
    holder (PID, host, since when) for the message of a process that waits.

    Re-entrant within a process (a depth count): :meth:`CacheEntry.lock` around :meth:`~CacheEntry.begin` ...
    :meth:`~CacheEntry.commit` takes it once. The holder removes the file when it releases the lock, so no lock files
    pile up beside the entries; a process that was waiting on a file removed meanwhile sees that (its inode is no
    longer the path's) and locks the new one. A process that dies holding the lock loses it (the kernel releases it
    with its descriptors); its file stays and is simply locked again by the next builder.

    As strong as the file system's locks, like the run folder's lock (:class:`core.run_folder.RunLock`): exact on a local
    disk; across machines on NFS (Linux emulates ``flock`` with POSIX locks there), GPFS and BeeGFS; on Lustre only with
    ``-o flock``. Where the file system refuses locks, the build goes on without one, with a warning.
    """

    UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
    _held: dict = {}  # lock path -> [pid, descriptor or None, depth]: the locks this process holds

    def __init__(self, path: str | Path, what: str = ""):
        self.path = Path(path)
        self.what = what or str(self.path)

    def holder(self) -> str:
        return lock_holder(self.path)

    @property
    def held(self) -> bool:
        """True while this process holds the lock."""
        state = self._held.get(str(self.path))
        return bool(state) and state[0] == os.getpid()

    def acquire(self) -> "EntryLock":
        """Take the lock, waiting as long as another process holds it (saying so once on stderr)."""
        import fcntl

        key = str(self.path)
        if self.held:
            self._held[key][2] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        said = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not said:
                        # written to descriptor 2 itself: the message must reach the process's stderr even where
                        # sys.stderr has been replaced (test capture, progress bars)
                        os.write(2, f"waiting for another process ({self.holder()}) to finish building {self.what} ...\n".encode())
                        said = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                os.close(fd)
                if err.errno not in self.UNSUPPORTED:
                    raise
                print(f"warning: the file system under {self.path.parent} does not support file locks ({err.strerror}); "
                      f"two processes building {self.what} at once would not wait for each other", file=sys.stderr, flush=True)
                self._held[key] = [os.getpid(), None, 1]
                return self
            try:
                now = os.stat(self.path)
                same = (now.st_ino, now.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder we waited for removed this file on release: lock the current one
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._held[key] = [os.getpid(), fd, 1]
        return self

    def release(self) -> None:
        """Give the lock back (the outermost release of a re-entrant hold removes the file and unlocks it)."""
        if not self.held:
            return
        state = self._held[str(self.path)]
        state[2] -= 1
        if state[2] > 0:
            return
        del self._held[str(self.path)]
        if state[1] is not None:
            try:
                os.unlink(self.path)  # while still locked: a waiter then sees the file is gone and locks a new one
            except FileNotFoundError:
                pass
            os.close(state[1])  # closing the descriptor releases the lock

    def __enter__(self) -> "EntryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def block_bounds(count: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of block ``index`` when ``count`` rows are split into ``parts`` contiguous blocks (the first
    ``count % parts`` blocks one row longer, as ``np.array_split``)."""
    size, extra = divmod(count, parts)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def row_block_path(folder: Path, name: str, start: int) -> Path:
    """The file of the rows of array ``name`` from row ``start`` on: ``<name>.<start, 10 digits>.npy`` (names sort in
    row order)."""
    return Path(folder) / f"{name}.{start:010d}.npy"


def create_row_block(folder: Path, name: str, start: int, shape: Sequence[int], dtype=np.float32) -> np.memmap:
    """A new ``.npy`` file for rows ``start .. start + shape[0] - 1`` of array ``name``, memory-mapped for writing.

    One writer per file: a DDP rank writes only its own block, so no page of any file is written by two processes."""
    return np.lib.format.open_memmap(row_block_path(folder, name, start), mode="w+", dtype=dtype, shape=tuple(shape))


class RowBlocks:
    """The row blocks of array ``name`` in ``folder``, read as one array, memory-mapped: ``blocks[rows]``, ``len``.

    A folder with ``<name>.npy`` and no blocks (the single-file layout of earlier versions) reads as one block."""

    def __init__(self, folder: Path, name: str):
        folder = Path(folder)
        paths = sorted(folder.glob(f"{name}.*.npy")) or [folder / f"{name}.npy"]
        self.blocks = [np.load(p, mmap_mode="r") for p in paths]
        self.starts = np.cumsum([0] + [len(b) for b in self.blocks])
        for path, start in zip(paths, self.starts):
            if path.name != f"{name}.npy" and path.name != row_block_path(folder, name, int(start)).name:
                raise CacheError(f"{folder}: the row blocks of {name} do not follow each other ({path.name} does not start "
                                 f"at row {int(start)}); delete the folder to build it again")

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.blocks[0].shape[1:])

    def __getitem__(self, rows) -> np.ndarray:
        """Rows (an int or an integer array, any order) as a new array."""
        if np.ndim(rows) == 0:
            row = int(rows)
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} of {len(self)}")
            b = int(np.searchsorted(self.starts, row, side="right")) - 1
            return np.array(self.blocks[b][row - self.starts[b]])
        rows = np.asarray(rows, dtype=np.int64)
        if len(self.blocks) == 1:
            return np.ascontiguousarray(self.blocks[0][rows])
        out = np.empty((len(rows), *self.blocks[0].shape[1:]), dtype=self.blocks[0].dtype)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for b in np.unique(which):
            mask = which == b
            out[mask] = self.blocks[b][rows[mask] - self.starts[b]]
        return out


@dataclass(frozen=True)
class CacheEntry:
    """One cache entry: ``<root>/<kind>/<key of parts>``, or a folder the user chose (``directory``).

    In a folder the user chose, a complete entry made from other parts is an error naming what differs (a hashed
    folder cannot differ: other parts give another key).
    """

    kind: str
    parts: dict
    root: Path = field(default_factory=cache_root)
    directory: Optional[Path] = None

    @property
    def key(self) -> str:
        return cache_key(self.parts)

    @property
    def path(self) -> Path:
        return Path(self.directory).expanduser() if self.directory else Path(self.root) / self.kind / self.key

    @property
    def partial(self) -> Path:
        return self.path.parent / f".{self.path.name}.partial"

    # ------------------------------------------------------------------ reading
    def is_complete(self) -> bool:
        """True when the entry exists, complete, with these parts (an entry with other parts raises CacheError)."""
        marker = self.path / ENTRY_FILE
        if not marker.is_file():
            return False
        found = json.loads(marker.read_text()).get("parts", {})
        if found != json.loads(json.dumps(self.parts, default=str)):
            changed = {k: (found.get(k), self.parts.get(k)) for k in sorted(set(found) | set(self.parts))
                       if found.get(k) != self.parts.get(k)}
            raise CacheError(
                f"{self.path}: these {self.kind.replace('_', ' ')} were made with other settings "
                f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in changed.items())}). "
                "Point the folder elsewhere or delete it."
            )
        return True

    def info(self) -> dict:
        """What ``ENTRY.json`` holds: ``{"kind", "parts", ...extra}``."""
        return json.loads((self.path / ENTRY_FILE).read_text())

    # ------------------------------------------------------------------ building
    @property
    def lock_file(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    def lock(self) -> EntryLock:
        """This entry's cross-process lock: ``with entry.lock(): if not entry.is_complete(): build`` builds once however
        many processes ask at the same time (the others wait, then find it complete)."""
        return EntryLock(self.lock_file, f"{self.kind.replace('_', ' ')} {self.path}")

    def begin(self, keep_partial: bool = False) -> Path:
        """Start (or, with ``keep_partial``, continue) a build; returns the partial folder to write into.

        Takes the entry's lock first (waiting while another process builds it) and holds it until :meth:`commit` or
        :meth:`abort`. A partial folder left by an interrupted build for the same parts is kept with ``keep_partial``
        (its finished files are reused), otherwise it is emptied: only ever by the lock's holder, so never the folder
        of a build still running.
        """
        lock = self.lock().acquire()
        try:
            partial = self.partial
            same = (partial / PARTS_FILE).is_file() and json.loads((partial / PARTS_FILE).read_text()) == json.loads(
                json.dumps(self.parts, default=str))
            if partial.exists() and not (keep_partial and same):
                shutil.rmtree(partial)
            partial.mkdir(parents=True, exist_ok=True)
            (partial / PARTS_FILE).write_text(json.dumps(self.parts, indent=1, default=str))
        except BaseException:
            lock.release()
            raise
        return partial

    def commit(self, **extra) -> Path:
        """Write ``ENTRY.json`` into the partial folder and rename it into place; returns the entry's folder. Gives
        back the lock :meth:`begin` took.

        If another process completed the same entry first (one that does not lock), its copy is kept and this one
        discarded. An empty folder the user created in advance is replaced; a non-empty folder that is not a complete
        entry is an error.
        """
        try:
            partial, target = self.partial, self.path
            (partial / PARTS_FILE).unlink(missing_ok=True)
            (partial / ENTRY_FILE).write_text(json.dumps({"kind": self.kind, "parts": self.parts, **extra}, indent=1, default=str))
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            try:
                os.replace(partial, target)
            except OSError:
                if not (target / ENTRY_FILE).is_file():
                    raise CacheError(f"{target}: exists but is not a complete {self.kind.replace('_', ' ')} entry; "
                                     "delete it or choose another folder") from None
                shutil.rmtree(partial, ignore_errors=True)
        finally:
            self.lock().release()
        return target

    def abort(self) -> None:
        """Discard the partial folder and give back the lock :meth:`begin` took."""
        try:
            shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self.lock().release()

    @contextmanager
    def build(self, keep_partial: bool = False, **extra) -> Iterator[Path]:
        """``with entry.build() as folder:`` write the files; the entry is committed when the block ends normally.

        An exception discards the partial folder, except with ``keep_partial`` (the next build continues it)."""
        folder = self.begin(keep_partial)
        try:
            yield folder
        except BaseException:
            if keep_partial:
                self.lock().release()
            else:
                self.abort()
            raise
        self.commit(**extra)


class GrowingEntry:
    """An entry that grows one file per item (text conditions: one file per prompt), never "complete" as a whole.

    ``<root>/<kind>/<key of parts>/`` holds ``ENTRY.json`` (its kind and parts, written atomically when the folder is
    made: a folder made from other parts is refused by :meth:`CacheEntry.is_complete`) and one file per item, named by
    the SHA-1 of the item's name (``<40 hex digits><suffix>``), each written whole through a temporary name and a
    rename (:func:`atomic_write`), as the resized-image cache grows: a reader sees a file whole or not at all, a build
    killed half-way leaves only whole files, and two processes writing one item write the same bytes, the last rename
    wins. No lock is needed: nothing is ever rewritten in place."""

    def __init__(self, kind: str, parts: dict, root: Optional[str | Path] = None):
        self.entry = CacheEntry(kind, parts, root=cache_root(root))
        self._ready = False

    @property
    def path(self) -> Path:
        return self.entry.path

    def file(self, name: str, suffix: str = "") -> Path:
        """The file of item ``name`` (named by its SHA-1: any text, any length, is a valid file name)."""
        return self.path / f"{hashlib.sha1(name.encode()).hexdigest()}{suffix}"

    def open(self) -> "GrowingEntry":
        """Make the folder and its ``ENTRY.json`` if they are not there; a folder of other parts raises CacheError."""
        if self._ready:
            return self
        if not self.entry.is_complete():
            self.path.mkdir(parents=True, exist_ok=True)
            record = {"kind": self.entry.kind, "parts": self.entry.parts, "grows": "one file per item, each written whole"}
            atomic_write(self.path / ENTRY_FILE, json.dumps(record, indent=1, default=str).encode())
        self._ready = True
        return self

    def read(self, name: str, suffix: str = "") -> Optional[Path]:
        """The file of ``name`` if it was written, else None."""
        if not (self.path / ENTRY_FILE).is_file():
            return None
        self.open()
        path = self.file(name, suffix)
        return path if path.is_file() else None

    def write(self, name: str, data: bytes, suffix: str = "") -> Path:
        path = self.open().file(name, suffix)
        atomic_write(path, data)
        return path
