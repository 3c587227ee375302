"""One cache for everything the suite computes once and reuses: resized images, VAE posteriors, class images,
document embeddings.

* **One root**: ``$CXR_DIFFUSION_CACHE``, default ``~/.cache/cxr-diffusion`` (:func:`cache_root`); every datamodule and
  strategy takes an optional ``cache_dir`` that replaces it.
* **One key rule**: an entry lives in ``<root>/<kind>/<key>``, where ``key`` is the first 16 hex digits of the SHA-1 of
  the JSON of its *parts* (sorted keys): everything its contents depend on (weights, preprocessing, resolution, the
  image list, ...). Change a part and a new entry is built; a stale one is never read.
* **One rule for "complete"**: a complete entry folder holds ``ENTRY.json`` (its parts), written last. It is built in
  a hidden sibling folder (``.<key>.partial``) and renamed into place, which is atomic on a POSIX file system: a build
  killed half-way is never read. Entries of many small files that grow one file at a time (the resized-image cache)
  write each file to a temporary name and rename it (:func:`atomic_write`).

A build can be shared by several processes (DDP ranks, each filling its share of the partial folder): rank 0
:meth:`~CacheEntry.begin`\\ s it, every rank writes, rank 0 :meth:`~CacheEntry.commit`\\ s it, with barriers between.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

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
    def begin(self, keep_partial: bool = False) -> Path:
        """Start (or, with ``keep_partial``, continue) a build; returns the partial folder to write into.

        A partial folder left by an interrupted build for the same parts is kept with ``keep_partial`` (its finished
        files are reused), otherwise it is emptied.
        """
        partial = self.partial
        same = (partial / PARTS_FILE).is_file() and json.loads((partial / PARTS_FILE).read_text()) == json.loads(
            json.dumps(self.parts, default=str))
        if partial.exists() and not (keep_partial and same):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        (partial / PARTS_FILE).write_text(json.dumps(self.parts, indent=1, default=str))
        return partial

    def commit(self, **extra) -> Path:
        """Write ``ENTRY.json`` into the partial folder and rename it into place; returns the entry's folder.

        If another process completed the same entry first, its copy is kept and this one discarded. An empty folder
        the user created in advance is replaced; a non-empty folder that is not a complete entry is an error.
        """
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
        return target

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    @contextmanager
    def build(self, keep_partial: bool = False, **extra) -> Iterator[Path]:
        """``with entry.build() as folder:`` write the files; the entry is committed when the block ends normally.

        An exception discards the partial folder, except with ``keep_partial`` (the next build continues it)."""
        folder = self.begin(keep_partial)
        try:
            yield folder
        except BaseException:
            if not keep_partial:
                self.abort()
            raise
        self.commit(**extra)
