"""LAION-400M captions (text only) for training the textual projection.

Reads the real metadata parquet files (docs/formats.md §2)::

    laion400m-meta/part-000NN-5b54c5d5-...-c000.snappy.parquet
        SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW, similarity   (TEXT may be null)

Only ``TEXT`` (and ``NSFW`` when filtering on it) is read, through HF ``datasets``
(``load_dataset("parquet", ...)``), one file at a time and cast to strings on read, so the
HEIGHT/WIDTH dtype differences between re-uploads do not matter. Each file becomes a memory-mapped
Arrow file under the cache folder; the cleaned captions of each file are a second one (``Dataset.map``
with a fingerprint of the filters), so a second run reads nothing again and a million captions cost
no Python memory. Disk: the Arrow copy of TEXT is about 100 bytes per row; with ``max_captions`` only
as many files are read as it takes to get that many captions (in file order: LAION's part files are
not sorted by content, so a prefix is a fair sample).

Before ``datasets`` opens anything, every file's schema is read with ``pyarrow.parquet.read_schema``,
so a wrong file is an error naming it and its columns instead of an ``ArrowInvalid`` deep in ``datasets``.

Cleaning: null and empty/whitespace-only captions are dropped, captions are stripped; optionally
``NSFW == "NSFW"`` rows (``drop_nsfw: true``/``nsfw``) or ``NSFW`` and ``UNSURE`` rows
(``drop_nsfw: unsure``) are dropped (rows with a null NSFW tag are kept), and captions shorter than
``min_length`` or longer than ``max_length`` characters. A file that keeps no caption is an error.

Caption families (``caption_style``): ``object`` rewrites each caption as "a photo of a {caption}",
``style`` as "a photo in the style of {caption}", ``both`` picks the family per caption; each family
has lexical variants (``OBJECT_TEMPLATES``, ``STYLE_TEMPLATES``; the first is the paper's form). The
family and variant of a caption depend only on its index and the seed, never on the epoch, rank or
batch, so a caption's text (and any embedding cached for it) is stable.

Batches are dicts ``{"caption": list[str], "index": LongTensor}``; ``index`` is the caption's position
in the cleaned caption set (``0 .. num_captions-1``), the key of an embedding cache together with
:meth:`LAIONCaptionDataModule.caption_set_key`.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from core.cache import cache_root
from core.errors import UserError
from datamodules.contract import CaptionSet, Prepared
from datamodules.sampling import ResumableSampler, batches_per_epoch, resume_position

LAION_COLUMNS = ("SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity")
NSFW_TAGS = ("UNLIKELY", "UNSURE", "NSFW")
CAPTION_STYLES = ("none", "object", "style", "both")
# Lexical variants; the first of each is the paper's form.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a rendering of a {}",
    "a close-up photo of a {}",
    "a good photo of a {}",
)
STYLE_TEMPLATES = (
    "a photo in the style of {}",
    "a picture in the style of {}",
    "an image in the style of {}",
    "a rendering in the style of {}",
    "a painting in the style of {}",
)
_CLEAN_VERSION = "laion-clean-v1"  # bump when the cleaning rules change: invalidates cached captions
_STRING_TYPES = ("string", "large_string", "null", "string_view")

DataFiles = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class LAIONDataError(UserError, ValueError):
    """A LAION metadata file or folder is not as expected."""


# ---------------------------------------------------------------------- files and schemas
def resolve_files(data_files: DataFiles) -> list[Path]:
    """Parquet files named by a file, a folder (its ``*.parquet``, sorted), a glob, or a list of those."""
    entries = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not entries:
        raise LAIONDataError("data_files: empty list; expected parquet files, folders or globs")
    files: list[Path] = []
    for entry in entries:
        text = os.path.expanduser(str(entry))
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.parquet") if p.is_file())
            if not found:
                raise LAIONDataError(f"{path}: folder holds no *.parquet files (LAION-400M metadata: part-000NN-...-c000.snappy.parquet)")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise LAIONDataError(f"{text}: glob matches no files")
            files += found
        else:
            raise LAIONDataError(f"{path}: file not found")
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def check_schema(path: Path, need_nsfw: bool = False):
    """Read ``path``'s parquet schema and check it has a string TEXT column (and NSFW if needed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise LAIONDataError(f"{path}: cannot be read as a parquet file ({err})") from None
    names = list(schema.names)
    if "TEXT" not in names:
        raise LAIONDataError(
            f"{path}: no TEXT column; it has columns {names}. Expected LAION metadata columns {list(LAION_COLUMNS)}"
        )
    needed = ["TEXT"] + (["NSFW"] if need_nsfw else [])
    if need_nsfw and "NSFW" not in names:
        raise LAIONDataError(
            f"{path}: NSFW filtering was asked for (drop_nsfw) but the file has no NSFW column; it has columns {names}. "
            "Set drop_nsfw: false for files without NSFW tags."
        )
    for col in needed:
        typ = str(schema.field(col).type)
        if typ not in _STRING_TYPES:
            raise LAIONDataError(f"{path}: column {col!r} has type {typ}; expected string")
    return schema


def _nsfw_drop_set(drop_nsfw: Union[bool, str]) -> frozenset:
    if drop_nsfw is False or drop_nsfw is None or drop_nsfw == "none":
        return frozenset()
    if drop_nsfw is True or drop_nsfw == "nsfw":
        return frozenset({"NSFW"})
    if drop_nsfw == "unsure":
        return frozenset({"NSFW", "UNSURE"})
    raise LAIONDataError(
        f"drop_nsfw: {drop_nsfw!r}; expected false, true/'nsfw' (drop NSFW rows) or 'unsure' (drop NSFW and UNSURE rows)"
    )


def _check_lengths(min_length: Optional[int], max_length: Optional[int]) -> None:
    if min_length is not None and int(min_length) < 0:
        raise LAIONDataError(f"min_length: {min_length!r}; expected a non-negative number of characters")
    if max_length is not None and int(max_length) < 1:
        raise LAIONDataError(f"max_length: {max_length!r}; expected at least 1 character")
    if min_length is not None and max_length is not None and int(min_length) > int(max_length):
        raise LAIONDataError(f"min_length {min_length} is larger than max_length {max_length}: no caption could pass")


# ---------------------------------------------------------------------- reading
def _clean_batch(batch: dict, drop: frozenset, min_length: Optional[int], max_length: Optional[int]) -> dict:
    texts = batch["TEXT"]
    tags = batch["NSFW"] if drop else None
    out = []
    for i, text in enumerate(texts):
        if text is None:
            continue
        text = text.strip()
        if not text:
            continue
        if drop and tags[i] is not None and tags[i].strip().upper() in drop:
            continue
        if min_length is not None and len(text) < min_length:
            continue
        if max_length is not None and len(text) > max_length:
            continue
        out.append(text)
    return {"caption": out}


def _why_empty(raw, drop: frozenset) -> str:
    """A breakdown of a file's rows for the error message (only computed when the file kept nothing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = raw.data.column("TEXT")
    nulls = text.null_count
    stripped = pc.utf8_trim_whitespace(text)
    empty = int(pc.sum(pc.equal(pc.utf8_length(stripped), 0)).as_py() or 0)
    parts = [f"{len(raw)} rows", f"{nulls} null TEXT", f"{empty} empty TEXT"]
    if drop:
        tags = pc.utf8_upper(pc.utf8_trim_whitespace(raw.data.column("NSFW")))
        tagged = int(pc.sum(pc.is_in(tags, value_set=pa.array(sorted(drop)))).as_py() or 0)
        parts.append(f"{tagged} tagged {'/'.join(sorted(drop))}")
    return ", ".join(parts)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if not enabled and not was_disabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            datasets.enable_progress_bars()


def read_captions(
    files: DataFiles,
    *,
    drop_nsfw: Union[bool, Literal["nsfw", "unsure"]] = False,
    min_length: Optional[int] = None,
    max_length: Optional[int] = None,
    max_captions: Optional[int] = None,
    cache_dir: Optional[str] = None,
):
    """The cleaned captions of LAION metadata parquet files, as a memory-mapped ``datasets.Dataset``.

    The dataset has one string column, ``caption``, in file order. See the module docstring for the
    rules. Raises :class:`LAIONDataError` naming the file for a missing file, a file without TEXT
    (listing its columns), a file without NSFW when ``drop_nsfw`` asks for it, and files that keep
    no caption (with a breakdown of why).
    """
    import datasets

    drop = _nsfw_drop_set(drop_nsfw)
    _check_lengths(min_length, max_length)
    if max_captions is not None and int(max_captions) < 1:
        raise LAIONDataError(f"max_captions: {max_captions!r}; expected at least 1 (or null for all)")
    paths = resolve_files(files)
    for path in paths:
        check_schema(path, need_nsfw=bool(drop))
    columns = ["TEXT"] + (["NSFW"] if drop else [])
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    cache = str(Path(cache_dir).expanduser() if cache_dir else cache_root() / "hf_datasets")
    big = sum(p.stat().st_size for p in paths) > 64 * 2**20
    parts, empty, total = [], [], 0
    with _progress_bars(big):
        for path in paths:
            raw = datasets.load_dataset(
                "parquet",
                data_files={"train": [str(path)]},
                split="train",
                columns=columns,
                features=features,
                batch_size=100_000,
                cache_dir=cache,
            )
            key = json.dumps([raw._fingerprint, sorted(drop), min_length, max_length, _CLEAN_VERSION])
            clean = raw.map(
                functools.partial(_clean_batch, drop=drop, min_length=min_length, max_length=max_length),
                batched=True,
                batch_size=10_000,
                remove_columns=columns,
                features=datasets.Features({"caption": datasets.Value("string")}),
                new_fingerprint=hashlib.sha1(key.encode()).hexdigest()[:32],
                load_from_cache_file=True,
                desc=f"cleaning {path.name}",
            )
            if len(clean) == 0:
                empty.append(f"{path} ({_why_empty(raw, drop)})")
                continue
            parts.append(clean)
            total += len(clean)
            if max_captions is not None and total >= max_captions:
                break
    if empty:
        rules = ["null or empty TEXT dropped"]
        if drop:
            rules.append(f"NSFW tags {sorted(drop)} dropped")
        if min_length is not None or max_length is not None:
            rules.append(f"length limits {min_length}..{max_length} characters")
        raise LAIONDataError(f"no usable caption ({'; '.join(rules)}) in {len(empty)} file(s): " + "; ".join(empty))
    captions = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if max_captions is not None and len(captions) > max_captions:
        captions = captions.select(range(int(max_captions)))
    return captions


# ---------------------------------------------------------------------- caption families
def _mix(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): a stable, well-spread integer per caption."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _strip_indefinite_article(caption: str) -> str:
    lower = caption[:3].lower()
    if lower.startswith("a ") and len(caption) > 2:
        return caption[2:].lstrip()
    if lower == "an " and len(caption) > 3:
        return caption[3:].lstrip()
    return caption


def style_caption(caption: str, index: int, style: str = "none", seed: int = 0) -> str:
    """``caption`` rewritten into its family (``object``/``style``/``both``; ``none`` returns it unchanged).

    The template is chosen from ``(seed, index)`` only. A leading "a"/"an" of the caption is dropped
    before a template that ends in "a {}" ("a photo of a dog", not "a photo of a a dog").
    """
    if style == "none":
        return caption
    if style not in CAPTION_STYLES:
        raise LAIONDataError(f"caption_style: {style!r}; expected one of {', '.join(CAPTION_STYLES)}")
    h = _mix(seed, index)
    if style == "both":
        family = OBJECT_TEMPLATES if h & 1 == 0 else STYLE_TEMPLATES
        h >>= 1
    else:
        family = OBJECT_TEMPLATES if style == "object" else STYLE_TEMPLATES
    template = family[h % len(family)]
    if template.endswith((" a {}", " an {}")):
        caption = _strip_indefinite_article(caption)
    return template.format(caption)


# ---------------------------------------------------------------------- torch dataset
class CaptionDataset(Dataset):
    """Captions at ``indices`` of a caption set, rewritten by ``caption_style``.

    Item ``k`` (or ``epoch * len + k``, as :class:`ResumableSampler` yields) is
    ``{"caption": str, "index": int}`` with ``index = indices[k]``, the position in the caption set.
    """

    def __init__(self, captions, indices: Optional[np.ndarray] = None, caption_style: str = "none", seed: int = 0):
        if caption_style not in CAPTION_STYLES:
            raise LAIONDataError(f"caption_style: {caption_style!r}; expected one of {', '.join(CAPTION_STYLES)}")
        self.captions = captions
        self.indices = np.arange(len(captions), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        self.caption_style = caption_style
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Batched fetch (one Arrow read per batch; the DataLoader uses it when present)."""
        n = len(self.indices)
        rows = self.indices[np.asarray(indices, dtype=np.int64) % n]
        texts = self.captions[rows.tolist()]["caption"]
        return [
            {"caption": style_caption(t, int(r), self.caption_style, self.seed), "index": int(r)}
            for t, r in zip(texts, rows)
        ]


def collate_captions(items: list[dict]) -> dict:
    return {
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


# ---------------------------------------------------------------------- datamodule
class LAIONCaptionDataModule(LightningDataModule):
    """LAION-400M captions for the textual projection.

    Args:
        data_files: a parquet file, a folder (its ``*.parquet``), a glob, or a list of those.
        batch_size: captions per training batch (per rank).
        val_batch_size: captions per validation batch (default: ``batch_size``).
        num_workers: DataLoader workers.
        shuffle: shuffle the training captions every epoch (seeded).
        seed: seed of the validation hold-out, the training order and the caption-family variants.
        drop_nsfw: ``false``; ``true`` or ``nsfw`` drops rows tagged NSFW; ``unsure`` also drops UNSURE.
        min_length, max_length: caption length limits in characters (after stripping whitespace).
        max_captions: use only the first N cleaned captions (in file order), e.g. the paper's 1M.
        val_captions: hold out N captions (the last N of a seeded shuffle) for validation.
        caption_style: ``none`` (captions as they are), ``object``, ``style`` or ``both`` (module docstring).
        cache_dir: where ``datasets`` keeps its Arrow files (default ``$CXR_DIFFUSION_CACHE/hf_datasets``).

    Under DDP every rank gets ``1/world_size`` of the training captions and no caption is seen by two
    ranks in an epoch: the training set is cut to a multiple of the world size (at most
    ``world_size - 1`` seeded-random captions left out) so that the sampler never pads by repeating.
    """

    def __init__(
        self,
        data_files: Union[str, list[str]],
        batch_size: int = 64,
        val_batch_size: Optional[int] = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_nsfw: Union[bool, Literal["nsfw", "unsure"]] = False,
        min_length: Optional[int] = None,
        max_length: Optional[int] = None,
        max_captions: Optional[int] = None,
        val_captions: int = 0,
        caption_style: Literal["none", "object", "style", "both"] = "none",
        cache_dir: Optional[str] = None,
    ):
        super().__init__()
        _nsfw_drop_set(drop_nsfw)
        _check_lengths(min_length, max_length)
        if caption_style not in CAPTION_STYLES:
            raise LAIONDataError(f"caption_style: {caption_style!r}; expected one of {', '.join(CAPTION_STYLES)}")
        if int(batch_size) < 1:
            raise LAIONDataError(f"batch_size: {batch_size!r}; expected at least 1")
        if int(val_captions) < 0:
            raise LAIONDataError(f"val_captions: {val_captions!r}; expected 0 or more")
        if max_captions is not None and int(max_captions) < 1:
            raise LAIONDataError(f"max_captions: {max_captions!r}; expected at least 1 (or null for all)")
        self.data_files = data_files
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.drop_nsfw = drop_nsfw
        self.min_length, self.max_length = min_length, max_length
        self.max_captions = max_captions
        self.val_captions = int(val_captions)
        self.caption_style = caption_style
        self.cache_dir = cache_dir
        self.captions = None  # datasets.Dataset with one column "caption", set by setup()
        self._train_order: Optional[np.ndarray] = None  # training caption indices in seeded-random order
        self.val_indices: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ caption set
    def _read(self):
        return read_captions(
            self.data_files,
            drop_nsfw=self.drop_nsfw,
            min_length=self.min_length,
            max_length=self.max_length,
            max_captions=self.max_captions,
            cache_dir=self.cache_dir,
        )

    def caption_set_key(self) -> str:
        """A short stable hash of what decides the caption at each index: the files (name, size, mtime),
        the filters, ``max_captions`` and the caption style (with its seed). For embedding-cache keys."""
        files = []
        for path in resolve_files(self.data_files):
            st = path.stat()
            files.append([path.name, st.st_size, st.st_mtime_ns])
        drop = sorted(_nsfw_drop_set(self.drop_nsfw))
        style = [self.caption_style] + ([self.seed] if self.caption_style != "none" else [])
        parts = [_CLEAN_VERSION, files, drop, self.min_length, self.max_length, self.max_captions, style]
        return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]

    @property
    def num_captions(self) -> int:
        self.setup()
        return len(self.captions)

    @property
    def train_indices(self) -> np.ndarray:
        """Caption-set indices of the training captions, sorted (before the world-size cut)."""
        self.setup()
        return np.sort(self._train_order)

    def manifest(self) -> dict:
        """What this run trains on, for the run folder's ``data.json``: files, counts and the caption-set key."""
        self.setup()
        return {
            "dataset": "LAION captions", "files": [str(p) for p in resolve_files(self.data_files)],
            "captions": len(self.captions), "train_captions": int(len(self._train_order)),
            "validation_indices": [int(i) for i in self.val_indices], "max_captions": self.max_captions,
            "drop_nsfw": self.drop_nsfw, "caption_style": self.caption_style, "seed": self.seed,
            "caption_set_key": self.caption_set_key(),
        }

    # ------------------------------------------------------------------ TrainingData (datamodules.contract)
    def training_prompts(self) -> list[str]:
        return []  # captions are not prompts of the text encoder being conditioned; a million are not scanned

    def training_findings(self) -> list[str]:
        return []

    def training_images(self) -> None:
        return None

    def training_captions(self) -> CaptionSet:
        """Every caption of the cleaned set (rows ``0 .. num_captions-1``), for the document-embedding cache."""
        captions = self.caption_dataset()
        return CaptionSet(self.caption_set_key(), self.num_captions,
                          lambda rows: [item["caption"] for item in captions.__getitems__([int(r) for r in rows])])

    def use_prepared(self, prepared: Prepared) -> None:
        """Nothing to serve: document embeddings are looked up by the strategy (by each batch's ``index``)."""

    def prepare_data(self) -> None:
        self._read()  # builds the Arrow caches once per node

    def setup(self, stage: Optional[str] = None) -> None:
        if self.captions is not None:
            return
        captions = self._read()
        n = len(captions)
        if self.val_captions >= n:
            raise LAIONDataError(
                f"val_captions={self.val_captions} leaves no training caption: the caption set has {n} caption(s)"
            )
        order = np.random.default_rng(self.seed).permutation(n).astype(np.int64)
        self._train_order = order[: n - self.val_captions]
        self.val_indices = np.sort(order[n - self.val_captions :])
        self.captions = captions
        rank_zero_info(
            f"LAION: {n} captions ({len(self._train_order)} training, {len(self.val_indices)} validation), "
            f"caption set {self.caption_set_key()}"
        )

    def caption_dataset(self, indices: Optional[Iterable[int]] = None) -> CaptionDataset:
        """The (styled) captions at ``indices`` of the caption set, all of them in order by default."""
        self.setup()
        idx = None if indices is None else np.fromiter(indices, dtype=np.int64)
        return CaptionDataset(self.captions, idx, self.caption_style, self.seed)

    # ------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=self.seed, rank=rank, world_size=world)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_captions,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        _, world = self._rank_world()
        keep = len(self._train_order) - len(self._train_order) % world
        if keep == 0:
            raise LAIONDataError(f"{len(self._train_order)} training caption(s) cannot be shared by {world} ranks")
        dataset = CaptionDataset(self.captions, np.sort(self._train_order[:keep]), self.caption_style, self.seed)
        loader = self._loader(dataset, self.batch_size, self.shuffle)
        position = resume_position(self.trainer, [batches_per_epoch(len(loader.sampler), self.batch_size)])
        if position is not None:
            epoch, pos = position
            loader.sampler.resume(epoch, pos * self.batch_size)
        return loader

    def val_dataloader(self):
        self.setup()
        if len(self.val_indices) == 0:
            return []
        dataset = CaptionDataset(self.captions, self.val_indices, self.caption_style, self.seed)
        return self._loader(dataset, self.val_batch_size, shuffle=False)
