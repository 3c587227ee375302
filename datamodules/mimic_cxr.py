"""MIMIC-CXR-JPG v2.0.0 image–prompt pairs for fine-tuning Stable Diffusion.

Reads the real layout (docs/formats.md §1)::

    ROOT/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ..., ViewPosition, ...
    ROOT/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, <14 CheXpert columns>
    ROOT/mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split
    ROOT/files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg
    REPORTS/files/pXX/pSUBJECT/sSTUDY.txt  (only for prompt_source="impression")

Selection: frontal views (ViewPosition PA or AP), studies positive (1.0) for any of ``findings``
(uncertain -1.0 handled by ``uncertain``), the official split, or an explicit list of dicom_ids.
Each CSV's key must be unique (``dicom_id`` in the metadata and split files, ``(subject_id, study_id)``
in the label file): a repeated row would silently serve an image twice.
Images are converted to grayscale, resized (shorter side) and centre-cropped once, cached as PNG,
and served as 3-channel tensors in [-1, 1]. Each cached PNG records the size, modification time
(ns) and a digest of the first and last KiB of the JPEG it was made from; a JPEG that changed since
(replaced, truncated, deleted, or overwritten with as many bytes and its modification time restored, as
``rsync -a`` and ``cp -p`` do) is read again, so a now-corrupt file is reported (or skipped) instead of
served from the cache. No horizontal flips unless asked: a flipped chest X-ray puts the heart on the
wrong side.

Batches are dicts ``{"pixel_values", "prompt", "finding", "labels", "dicom_id"}`` (``finding``: the
selected CheXpert class the image was chosen for; ``labels``: the 14 CheXpert values, 1 positive,
0 negative or not mentioned, -1 uncertain); with prior preservation
the training batch is ``{"instance": <batch>, "prior": <batch of class images>}``.

The datamodule implements the fit-time contract (:mod:`datamodules.contract`): ``TrainingData`` (its prompts,
findings and images; it serves the latents and class images the strategy prepared) and ``RealImages`` (validation
images for the FID callback, real examples for ``SampleGrid(log_real_images=True)``).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from torch.utils.data import DataLoader, Dataset

from core.cache import atomic_write, cache_key, cache_root
from core.errors import UserError
from datamodules.contract import ClassImages, ImageSet, Prepared
from datamodules.prompts import FINDING_PROMPTS
from datamodules.reports import DEID_SETTINGS, extract_impression, report_path, scrub_deid_markers
from datamodules.sampling import ResumableSampler, batches_per_epoch, resume_position

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT_CLASSES = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
REQUIRED_COLUMNS = {
    METADATA_CSV: ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    CHEXPERT_CSV: ("subject_id", "study_id") + CHEXPERT_CLASSES,
    SPLIT_CSV: ("dicom_id", "study_id", "subject_id", "split"),
}
# The key of each file: no two rows may share it (a repeated row would double its images).
UNIQUE_KEYS = {METADATA_CSV: ("dicom_id",), CHEXPERT_CSV: ("subject_id", "study_id"), SPLIT_CSV: ("dicom_id",)}
FRONTAL_VIEWS = ("PA", "AP")
SPLITS = ("train", "validate", "test")
# The paper's prompts (section 2.1 / Table 4); other findings get "... with <finding>".
DEFAULT_TEMPLATES = dict(FINDING_PROMPTS)  # the paper's prompts (datamodules/prompts.py)


class MIMICDataError(UserError, ValueError):
    """The MIMIC-CXR folder or one of its files is not as expected."""


def check_patient_disjoint(train: pd.DataFrame, other: pd.DataFrame, what: str) -> None:
    """Refuse two image sets that share a patient (``subject_id``), naming the first shared subjects: images of one
    patient on both sides would make validation, reference statistics or a memorization audit look better than they are."""
    if not len(train) or not len(other):
        return
    shared = sorted(set(train["subject_id"].tolist()) & set(other["subject_id"].tolist()))
    if shared:
        raise MIMICDataError(f"{what} share {len(shared)} patient(s), subject_id {shared[:5]}{' ...' if len(shared) > 5 else ''}; "
                             "they must come from different patients (check the split CSV or the dicom_ids given)")


def image_path(root: Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    sid = str(int(subject_id))
    return Path(root) / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{int(study_id)}" / f"{dicom_id}.jpg"


def read_csv_checked(root: Path, name: str) -> pd.DataFrame:
    """``root/name`` (one of the three MIMIC-CXR-JPG CSVs), read and checked; see :func:`read_mimic_csv`."""
    path = Path(root) / name
    if not path.exists():
        raise MIMICDataError(
            f"{path}: file not found. A MIMIC-CXR-JPG v2.0.0 root holds {METADATA_CSV}, {CHEXPERT_CSV}, "
            f"{SPLIT_CSV} and files/ (https://physionet.org/content/mimic-cxr-jpg/2.0.0/, credentialed access)."
        )
    return read_mimic_csv(path, name)


def read_mimic_csv(path: Path, kind: str) -> pd.DataFrame:
    """Read a MIMIC-CXR CSV at any ``path`` as the file ``kind`` (``mimic-cxr-2.0.0-chexpert.csv.gz``, ...).

    Checks the columns that file must have, integer ids, label values in {1.0, 0.0, -1.0, empty} and split
    names; each problem is a :class:`MIMICDataError` naming the file, the column and a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise MIMICDataError(f"{path}: file not found (expected the {kind} file of MIMIC-CXR v2.0.0)")
    try:
        df = pd.read_csv(path, dtype={"dicom_id": str})
    except Exception as err:  # pandas raises many types for a broken file
        raise MIMICDataError(f"{path}: cannot be read as a CSV ({err})") from None
    missing = [c for c in REQUIRED_COLUMNS[kind] if c not in df.columns]
    if missing:
        raise MIMICDataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    for col in ("subject_id", "study_id"):
        bad = pd.to_numeric(df[col], errors="coerce").isna()
        if bad.any():
            raise MIMICDataError(f"{path}: column {col!r} has non-integer values, e.g. {df.loc[bad, col].iloc[0]!r}")
        df[col] = df[col].astype("int64")
    if kind == CHEXPERT_CSV:
        for col in CHEXPERT_CLASSES:
            values = pd.to_numeric(df[col], errors="coerce")
            bad = ~(values.isna() | values.isin([1.0, 0.0, -1.0])) | (values.isna() & df[col].notna())
            if bad.any():
                raise MIMICDataError(
                    f"{path}: column {col!r} has value {df.loc[bad, col].iloc[0]!r}; expected 1.0, 0.0, -1.0 or empty"
                )
            df[col] = values
    if kind == SPLIT_CSV:
        bad = ~df["split"].isin(SPLITS)
        if bad.any():
            raise MIMICDataError(f"{path}: column 'split' has value {df.loc[bad, 'split'].iloc[0]!r}; expected one of {SPLITS}")
    check_unique(df, path, UNIQUE_KEYS[kind])
    return df


def check_unique(df: pd.DataFrame, path: Path, key: tuple[str, ...], shown: int = 5) -> None:
    """Refuse a file in which two rows share ``key``, naming the file and the first ``shown`` repeated keys."""
    repeated = df.loc[df.duplicated(list(key), keep="first"), list(key)].drop_duplicates()
    if len(repeated):
        name = key[0] if len(key) == 1 else f"({', '.join(key)})"
        examples = [str(v[0]) if len(key) == 1 else f"({', '.join(map(str, v))})" for v in repeated.itertuples(index=False)]
        raise MIMICDataError(f"{path}: {len(repeated)} {name} value(s) appear on more than one row, e.g. "
                             f"{', '.join(examples[:shown])}{' ...' if len(examples) > shown else ''}; "
                             f"each {name} must appear once (remove the repeated rows)")


def load_grayscale(path: Path, size: int) -> np.ndarray:
    """Decode ``path`` to uint8 grayscale, resize the shorter side to ``size`` and centre-crop.

    8-bit L/RGB are converted; 16-bit images are scaled to 8 bits; RGBA is composited on black.
    Raises ``OSError``/``ValueError`` naming the path when the file cannot be decoded.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("L", (size * 2, size * 2))  # decode big JPEGs at a reduced scale: much faster
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
            elif img.mode in ("RGBA", "LA", "PA"):
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, img.convert("RGBA")).convert("L")
            elif img.mode != "L":
                img = img.convert("L")
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.LANCZOS)
            w, h = img.size
            left, top_ = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top_, left + size, top_ + size))
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise OSError(f"{path}: cannot read image ({err})") from None


class CXRImageDataset(Dataset):
    """Cached grayscale images as 3-channel tensors in [-1, 1] with their prompts and labels."""

    def __init__(self, records: pd.DataFrame, cache_dir: Path, hflip_probability: float = 0.0, seed: int = 0, latents=None):
        self.records = records.reset_index(drop=True)
        self.cache_dir = Path(cache_dir)
        self.hflip_probability = hflip_probability
        self.seed = seed
        self.latents = latents  # cached VAE posteriors: served instead of pixels
        self.labels = torch.tensor(self.records[list(CHEXPERT_CLASSES)].fillna(0.0).to_numpy(np.float32))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(int(index), len(self.records))
        row = self.records.iloc[i]
        if self.latents is not None:
            return {"latent_dist": self.latents.get(row.dicom_id), "prompt": row.prompt, "finding": row.finding,
                    "labels": self.labels[i], "dicom_id": row.dicom_id}
        x = _pixels(_read_png(self.cache_dir / f"{row.dicom_id}.png"))
        if self.hflip_probability > 0 and random.Random(hash((self.seed, epoch, i))).random() < self.hflip_probability:
            x = x.flip(-1)
        return {
            "pixel_values": x,
            "prompt": row.prompt,
            "finding": row.finding,
            "labels": self.labels[i],
            "dicom_id": row.dicom_id,
        }


PREPROCESSING_ID = "gray-to-3ch/shorter-side-resize/center-crop/[-1,1]/v1"  # change when the pixels change
SOURCE_STAMP = "cxr-diffusion-source"  # PNG text chunk of a cached image: its JPEG's source_stamp
# How much of each end of a JPEG the stamp digests. Size and mtime miss a file overwritten with as many bytes whose
# mtime was restored (rsync -a, cp -p); another JPEG differs in its header tables (first KiB) and its last entropy-coded
# bytes (last KiB). Reading 2 KiB keeps the check of a fresh cache cheap; a change only in the middle goes unseen.
STAMP_EDGE_BYTES = 1024


def source_stamp(path: Path) -> Optional[str]:
    """``"v2:<size>:<mtime in ns>:<SHA-1 of the first and last KiB, 16 hex digits>"`` of an image file, or None when
    it cannot be opened: what a cached copy is valid for. Copies cached with the earlier ``"<size>:<mtime>"`` stamp
    never match it, so they are made again once."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            digest.update(fh.read(STAMP_EDGE_BYTES))
            if st.st_size > STAMP_EDGE_BYTES:
                fh.seek(max(STAMP_EDGE_BYTES, st.st_size - STAMP_EDGE_BYTES))
                digest.update(fh.read(STAMP_EDGE_BYTES))
    except OSError:
        return None
    return f"v2:{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()[:16]}"


def cached_stamp(png: Path) -> Optional[str]:
    """The source stamp a cached PNG was made for (its header only), or None (no such file, none recorded)."""
    try:
        with Image.open(png) as img:
            return img.info.get(SOURCE_STAMP)
    except (OSError, ValueError, SyntaxError):
        return None


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img, dtype=np.uint8)


def _pixels(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W]`` grayscale -> ``[3, H, W]`` float in [-1, 1], as the datasets serve it."""
    return torch.from_numpy(arr).float().div(127.5).sub(1.0).unsqueeze(0).expand(3, -1, -1).contiguous()


class ClassImageDataset(Dataset):
    """Prior-preservation class images (or their cached latents), with the class prompt."""

    def __init__(self, images: ClassImages, latents=None):
        self.images = images
        self.latents = latents

    def __len__(self) -> int:
        return self.images.count

    def __getitem__(self, index: int) -> dict:
        i = int(index) % self.images.count
        path = self.images.path(i)
        item = {"prompt": self.images.prompt, "finding": "", "labels": torch.zeros(len(CHEXPERT_CLASSES)), "dicom_id": path.stem}
        if self.latents is not None:
            return {"latent_dist": self.latents.get(ClassImages.image_id(i)), **item}
        return {"pixel_values": _pixels(load_grayscale(path, self.images.resolution)), **item}


class MIMICCXRDataModule(LightningDataModule):
    """MIMIC-CXR-JPG image–prompt pairs.

    Args:
        root: MIMIC-CXR-JPG v2.0.0 root (holds the three ``.csv.gz`` files and ``files/``).
        findings: CheXpert classes to select; an image is used if its study is positive for any.
        uncertain: how an uncertain (-1.0) label of a selected finding counts: ``exclude`` (the image
            is not used at all), ``positive`` (it counts as that finding) or ``negative`` (it counts
            as absent, so the image may still be selected for another finding).
        dicom_ids: an explicit list of training images (e.g. the paper's hand-picked 5 + 5); they
            must be frontal; the split is then not used for training.
        prompt_source: ``template`` (``prompt_templates[finding]``) or ``impression`` (the report's
            impression section; prompts longer than the text encoder's window are counted and
            warned about by the model).
        prompt_templates: finding -> prompt. An image takes the template of the first finding in
            ``findings`` it is positive for.
        reports_root: folder holding ``files/pXX/pSUBJECT/sSTUDY.txt`` (default: ``root``).
        deid_markers: ``remove`` (default) drops MIMIC-CXR's de-identification markers (``___``) from report-derived
            prompts and collapses the spaces left behind (:func:`datamodules.reports.scrub_deid_markers`; they are the
            most memorized prompt tokens and name no finding); ``keep`` leaves the impressions as written. The count
            removed is in ``data.json``. Template prompts are never changed.
        resolution: square training size; images are resized on the shorter side and centre-cropped.
        hflip_probability: horizontal flip probability (default 0: flips put the heart on the right).
        on_bad_image: ``fail`` (raise, naming the file) or ``skip`` (warn with the count and paths).
        max_train_images, max_val_images: cap the sets (a seeded random subset).
        train_images_per_finding: a seeded random sample of this many training images per finding
            (e.g. 5, like the paper's 5 + 5, when no explicit ``dicom_ids`` are given).
        cache_dir: the cache root for resized images (default ``$CXR_DIFFUSION_CACHE`` or ``~/.cache/cxr-diffusion``).

    Prior preservation is the strategy's setting (``model.init_args.prior_preservation``); its class images are
    served beside each training batch once prepared.
    """

    def __init__(
        self,
        root: str,
        findings: list[str] = ["No Finding"],
        uncertain: Literal["exclude", "positive", "negative"] = "exclude",
        dicom_ids: Optional[list[str]] = None,
        train_split: str = "train",
        val_split: str = "validate",
        prompt_source: Literal["template", "impression"] = "template",
        prompt_templates: dict[str, str] = DEFAULT_TEMPLATES,
        reports_root: Optional[str] = None,
        deid_markers: Literal["remove", "keep"] = "remove",
        resolution: int = 512,
        batch_size: int = 1,
        val_batch_size: Optional[int] = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        hflip_probability: float = 0.0,
        on_bad_image: Literal["fail", "skip"] = "fail",
        max_train_images: Optional[int] = None,
        max_val_images: Optional[int] = None,
        train_images_per_finding: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ):
        super().__init__()
        unknown = [f for f in findings if f not in CHEXPERT_CLASSES]
        if unknown:
            raise MIMICDataError(f"findings: unknown CheXpert class(es) {unknown}; expected some of {list(CHEXPERT_CLASSES)}")
        for name, split in (("train_split", train_split), ("val_split", val_split)):
            if split not in SPLITS:
                raise MIMICDataError(f"{name}: {split!r}; expected one of {list(SPLITS)}")
        if prompt_source == "template":
            no_template = [f for f in findings if f not in prompt_templates]
            if no_template:
                raise MIMICDataError(f"prompt_templates has no prompt for finding(s) {no_template}")
            empty = [f for f in findings if not str(prompt_templates[f]).strip()]
            if empty:
                raise MIMICDataError(f"prompt_templates: the prompt for {empty} is empty; every selected finding needs a prompt")
        self.root = Path(root).expanduser()
        self.findings = list(findings)
        self.uncertain = uncertain
        self.dicom_ids = list(dicom_ids) if dicom_ids else None
        self.train_split, self.val_split = train_split, val_split
        self.prompt_source = prompt_source
        self.prompt_templates = dict(prompt_templates)
        self.reports_root = Path(reports_root).expanduser() if reports_root else self.root
        if deid_markers not in DEID_SETTINGS:
            raise MIMICDataError(f"deid_markers: {deid_markers!r}; expected one of {', '.join(DEID_SETTINGS)}")
        self.deid_markers = deid_markers
        self.deid_removed: dict[str, dict[str, int]] = {}  # part -> markers removed and prompts changed
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.hflip_probability = hflip_probability
        self.on_bad_image = on_bad_image
        self.max_train_images, self.max_val_images = max_train_images, max_val_images
        self.train_images_per_finding = train_images_per_finding
        self.cache_root = cache_root(cache_dir)
        self.train_records: Optional[pd.DataFrame] = None
        self.val_records: Optional[pd.DataFrame] = None
        self.prepared = Prepared()

    # ------------------------------------------------------------------ records
    @property
    def image_key_parts(self) -> dict:
        """What the served pixels depend on (the key of the resized-image cache and of latent caches)."""
        return {"root": str(self.root.resolve()), "resolution": self.resolution, "preprocessing": PREPROCESSING_ID}

    @property
    def image_cache_dir(self) -> Path:
        """The resized-image cache (core.cache): one PNG per image, each written whole (atomic rename)."""
        return self.cache_root / "images" / cache_key(self.image_key_parts)

    def _ensure_data(self) -> None:
        """Hook for subclasses that create their data on first use."""

    def _selected_positive(self, df: pd.DataFrame, finding: str) -> pd.Series:
        value = df[finding]
        if self.uncertain == "positive":
            return value.isin([1.0, -1.0])
        return value == 1.0

    def build_records(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Training and validation records: one row per frontal image with its prompt and labels."""
        self._ensure_data()
        if not self.root.is_dir():
            raise MIMICDataError(
                f"{self.root}: MIMIC-CXR-JPG root not found. Download MIMIC-CXR-JPG v2.0.0 "
                "(https://physionet.org/content/mimic-cxr-jpg/2.0.0/, credentialed access) or use the phantom demo data."
            )
        meta = read_csv_checked(self.root, METADATA_CSV)
        labels = read_csv_checked(self.root, CHEXPERT_CSV)
        split = read_csv_checked(self.root, SPLIT_CSV)
        df = meta[meta["ViewPosition"].isin(FRONTAL_VIEWS)][["dicom_id", "subject_id", "study_id", "ViewPosition"]]
        df = df.merge(labels, on=["subject_id", "study_id"], how="inner")
        df = df.merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
        df["finding"] = None
        for finding in reversed(self.findings):  # the first listed finding wins
            df.loc[self._selected_positive(df, finding), "finding"] = finding
        if self.uncertain == "exclude":
            # an image uncertain for any selected finding is neither positive nor a clean negative
            df.loc[(df[self.findings] == -1.0).any(axis=1), "finding"] = None
        if self.dicom_ids:
            frontal_ids = set(meta.loc[meta["ViewPosition"].isin(FRONTAL_VIEWS), "dicom_id"])
            missing = [d for d in self.dicom_ids if d not in set(meta["dicom_id"])]
            if missing:
                raise MIMICDataError(f"dicom_ids: {missing} not in {self.root / METADATA_CSV}")
            lateral = [d for d in self.dicom_ids if d not in frontal_ids]
            if lateral:
                raise MIMICDataError(f"dicom_ids: {lateral} are not frontal (ViewPosition PA/AP)")
            train = df[df["dicom_id"].isin(self.dicom_ids)].copy()
            unlabeled = train[train["finding"].isna()]["dicom_id"].tolist()
            if unlabeled:
                raise MIMICDataError(f"dicom_ids: {unlabeled} are not positive for any of {self.findings}")
            val = df[(df["split"] == self.val_split) & df["finding"].notna() & ~df["dicom_id"].isin(self.dicom_ids)].copy()
        else:
            selected = df[df["finding"].notna()]
            train = selected[selected["split"] == self.train_split].copy()
            if self.train_images_per_finding is not None:
                train = pd.concat(
                    [self._cap(part, self.train_images_per_finding) for _, part in train.groupby("finding", sort=True)]
                )
            val = selected[selected["split"] == self.val_split].copy()
        train = self._cap(train, self.max_train_images)
        val = self._cap(val, self.max_val_images)
        if len(train) == 0:
            raise MIMICDataError(
                f"{self.root}: no frontal {self.train_split!r} images positive for {self.findings} (uncertain={self.uncertain})"
            )
        for name, part in (("train", train), ("validation", val)):
            part["prompt"] = self._prompts(part, name)
        return train.reset_index(drop=True), val.reset_index(drop=True)

    def _cap(self, df: pd.DataFrame, n: Optional[int]) -> pd.DataFrame:
        df = df.sort_values("dicom_id")
        if n is not None and len(df) > n:
            df = df.sample(n=n, random_state=self.seed).sort_values("dicom_id")
        return df

    def _prompts(self, df: pd.DataFrame, part: str = "train") -> list[str]:
        if self.prompt_source == "template":
            return [self.prompt_templates[f] for f in df["finding"]]
        prompts, removed = [], {"markers": 0, "prompts": 0}
        for row in df.itertuples():
            path = report_path(self.reports_root, row.subject_id, row.study_id)
            if not path.exists():
                raise MIMICDataError(f"{path}: report not found (prompt_source='impression'; set reports_root)")
            _, text = extract_impression(path.read_text(encoding="utf-8", errors="replace"))
            if not text:
                raise MIMICDataError(f"{path}: no impression, findings or last paragraph to use as the prompt")
            if self.deid_markers == "remove":
                text, count = scrub_deid_markers(text)
                removed["markers"] += count
                removed["prompts"] += bool(count)
                if not text:
                    raise MIMICDataError(f"{path}: the prompt is nothing but de-identification markers (___); set "
                                         "deid_markers: keep to train on it as written, or leave the study out")
            prompts.append(text)
        self.deid_removed[part] = removed
        return prompts

    # ------------------------------------------------------------------ cache
    def _build_cache(self, records: pd.DataFrame) -> list[str]:
        """Resize each image into the cache once, and again whenever its JPEG changed (its :func:`source_stamp`);
        returns the paths that could not be read (their stale copies are removed, never served)."""
        out = self.image_cache_dir
        out.mkdir(parents=True, exist_ok=True)
        todo = []
        for r in records.itertuples():
            path = image_path(self.root, r.subject_id, r.study_id, r.dicom_id)
            stamp = source_stamp(path)
            if stamp is None or cached_stamp(out / f"{r.dicom_id}.png") != stamp:
                todo.append((r.dicom_id, path, stamp))
        bad: list[str] = []
        if todo:
            from tqdm.auto import tqdm

            for dicom_id, path, stamp in tqdm(todo, desc=f"caching {len(todo)} images at {self.resolution}px", disable=len(todo) < 50):
                try:
                    arr = load_grayscale(path, self.resolution)
                except OSError as err:
                    (out / f"{dicom_id}.png").unlink(missing_ok=True)
                    if self.on_bad_image == "fail":
                        raise MIMICDataError(f"{err}. Set on_bad_image: skip to leave such images out.") from None
                    bad.append(str(path))
                    continue
                info = PngInfo()
                info.add_text(SOURCE_STAMP, stamp)
                png = io.BytesIO()
                Image.fromarray(arr, mode="L").save(png, format="PNG", pnginfo=info)
                atomic_write(out / f"{dicom_id}.png", png.getvalue())
        return bad

    def prepare_data(self) -> None:
        train, val = self.build_records()
        bad = self._build_cache(pd.concat([train, val]))
        if bad:
            rank_zero_warn(f"skipped {len(bad)} unreadable image(s) (on_bad_image=skip): {bad[:5]}{' ...' if len(bad) > 5 else ''}")

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_records is not None:
            return
        train, val = self.build_records()
        cache = self.image_cache_dir
        # a boolean Series, not a list: an empty list would select no columns and leave a frame without "dicom_id"
        cached = lambda df: df[df["dicom_id"].map(lambda d: (cache / f"{d}.png").exists()).astype(bool)].reset_index(drop=True)
        # prepare_data runs on one process per node; a process that did not run it (or a cache that was deleted, or
        # JPEGs that changed since) builds what is missing or stale itself. A fresh cache costs a stat and a PNG header.
        self._build_cache(pd.concat([train, val]))
        self.train_records, self.val_records = cached(train), cached(val)
        if len(self.train_records) == 0:
            raise MIMICDataError(f"{self.root}: every selected training image was unreadable")
        if self.val_split != self.train_split:  # val_split == train_split: validating on training data, on purpose
            check_patient_disjoint(self.train_records, self.val_records, f"{self.root}: the training and validation images")
        counts = self.train_records["finding"].value_counts().to_dict()
        rank_zero_info(f"MIMIC-CXR: {len(self.train_records)} training images {counts}, {len(self.val_records)} validation images")

    def manifest(self) -> dict:
        """What this run trains and validates on, for the run folder's ``data.json`` (ids only, no pixels or report text)."""
        self.setup()
        class_images = self.prepared.class_images
        return {
            "dataset": "MIMIC-CXR-JPG", "root": str(self.root), "findings": list(self.findings),
            "selection": self._selection(),
            "uncertain": self.uncertain, "resolution": self.resolution,
            "train": self.train_records[["dicom_id", "subject_id", "study_id", "finding"]].to_dict("records"),
            "train_subjects": sorted(int(s) for s in self.train_records["subject_id"].unique()),
            "validation_dicom_ids": self.val_records["dicom_id"].tolist(),
            "prompts": self._prompt_record(),
            "class_prompt": class_images.prompt if class_images else None,
            "num_class_images": class_images.count if class_images else 0,
            "class_images": str(class_images.directory) if class_images else None,
        }

    def _prompt_record(self) -> dict:
        """Where the prompts come from and what the de-identification scrub removed (counts only, no report text)."""
        record = {"source": self.prompt_source}
        if self.prompt_source == "impression":
            record["deid_markers"] = self.deid_markers
            if self.deid_markers == "remove":
                record["deid_markers_removed"] = {part: dict(counts) for part, counts in self.deid_removed.items()}
        return record

    def _selection(self) -> str:
        """How the training images were chosen, in words (for data.json)."""
        if self.dicom_ids:
            return "explicit dicom_ids"
        how = (f"sampled: {self.train_images_per_finding} per finding, seed {self.seed}" if self.train_images_per_finding
               else f"every frontal {self.train_split!r} image positive for a finding")
        return how + (f", at most {self.max_train_images} (seed {self.seed})" if self.max_train_images else "")

    # ------------------------------------------------------------------ TrainingData (datamodules.contract)
    def training_prompts(self) -> list[str]:
        self.setup()
        return list(self.train_records["prompt"])

    def training_findings(self) -> list[str]:
        return list(self.findings)

    def training_images(self) -> Optional[ImageSet]:
        """The training images, or None when caching them cannot be exact (random flips change the pixels)."""
        if self.hflip_probability > 0:
            rank_zero_warn(f"cache_latents is off: hflip_probability={self.hflip_probability} changes the images every epoch; "
                           "and flipped chest X-rays put the heart on the wrong side")
            return None
        self.setup()
        cache_dir = self.image_cache_dir
        # what is made from these images (VAE latents) is rebuilt when one of their JPEGs changed, like the resized copy
        stamps = "\n".join(f"{r.dicom_id} {source_stamp(image_path(self.root, r.subject_id, r.study_id, r.dicom_id))}"
                           for r in self.train_records.itertuples())
        key_parts = {**self.image_key_parts, "sources_sha1": hashlib.sha1(stamps.encode()).hexdigest()}
        return ImageSet(tuple(self.train_records["dicom_id"]), lambda d: _pixels(_read_png(cache_dir / f"{d}.png")),
                        key_parts, self.resolution, self.cache_root)

    def training_captions(self) -> None:
        return None

    def use_prepared(self, prepared: Prepared) -> None:
        """Serve ``latent_dist`` (cached posteriors) instead of ``pixel_values``, and class images beside each batch."""
        self.prepared = prepared

    @property
    def latent_cache(self):
        return self.prepared.latents

    # ------------------------------------------------------------------ RealImages (datamodules.contract)
    def validation_images(self, finding: str, limit: int) -> list[str]:
        self.setup()
        return self.val_records.loc[self.val_records["finding"] == finding, "dicom_id"].head(int(limit)).tolist()

    def read_images(self, ids) -> np.ndarray:
        return np.stack([_read_png(self.image_cache_dir / f"{d}.png") for d in ids]) if len(ids) else np.zeros((0, 1, 1), np.uint8)

    def real_image_examples(self, n: int) -> tuple[list, list[str]]:
        """The first ``n`` training images (PIL) and their findings: for ``SampleGrid(log_real_images=True)`` only."""
        self.setup()
        rows = self.train_records.head(int(n))
        images = [Image.open(self.image_cache_dir / f"{r.dicom_id}.png").convert("L") for r in rows.itertuples()]
        return images, [f"{r.finding} ({r.dicom_id})" for r in rows.itertuples()]

    # ------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self):
        self.setup()
        latents, class_images = self.prepared.latents, self.prepared.class_images
        dataset = CXRImageDataset(self.train_records, self.image_cache_dir, self.hflip_probability, self.seed, latents)
        loaders = {"instance": self._loader(dataset, self.batch_size, self.shuffle, self.seed)}
        if class_images is not None:
            loaders["prior"] = self._loader(ClassImageDataset(class_images, latents), self.batch_size, self.shuffle, self.seed + 1)
        lengths = [batches_per_epoch(len(dl.sampler), dl.batch_size) for dl in loaders.values()]
        position = resume_position(self.trainer, lengths)
        if position is not None:
            epoch, pos = position
            for dl, length in zip(loaders.values(), lengths):
                dl.sampler.resume(epoch, (pos % length) * dl.batch_size)
        if class_images is None:
            return loaders["instance"]
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self):
        self.setup()
        if len(self.val_records) == 0:
            return []
        dataset = CXRImageDataset(self.val_records, self.image_cache_dir)
        return self._loader(dataset, self.val_batch_size, shuffle=False, seed=self.seed)
