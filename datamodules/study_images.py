"""Images for the studies: a seeded random sample of frontal MIMIC-CXR images with their labels, or every image of a
plain folder, decoded and resized as training does (no training datamodule, no cache)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from datamodules.mimic_cxr import (CHEXPERT_CLASSES, CHEXPERT_CSV, FRONTAL_VIEWS, METADATA_CSV, SPLIT_CSV, SPLITS,
                                   MIMICDataError, image_path, load_grayscale, read_csv_checked)
from core.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageSelectionError(UserError, ValueError):
    """No images, an unreadable image, or a bad option."""


def select_mimic(root, n: Optional[int], seed: int, split: str = "all") -> pd.DataFrame:
    """Random ``n`` frontal (PA/AP) images of a MIMIC-CXR-JPG root, with their CheXpert values.

    Uses the datamodule's readers and checks. Images of studies without a CheXpert row keep NaN
    labels (treated as negative, like every missing value). The sample is ``DataFrame.sample(n,
    random_state=seed)`` of the frontal images sorted by dicom_id, so it is reproducible.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MIMICDataError(f"{root}: MIMIC-CXR-JPG root not found")
    meta = read_csv_checked(root, METADATA_CSV)
    labels = read_csv_checked(root, CHEXPERT_CSV)
    df = meta[meta["ViewPosition"].isin(FRONTAL_VIEWS)][["dicom_id", "subject_id", "study_id", "ViewPosition"]]
    df = df.merge(labels[["subject_id", "study_id", *CHEXPERT_CLASSES]], on=["subject_id", "study_id"], how="left")
    if split != "all":
        if split not in SPLITS:
            raise ImageSelectionError(f"split {split!r} is not one of {('all',) + SPLITS}")
        splits = read_csv_checked(root, SPLIT_CSV)
        df = df.merge(splits[["dicom_id", "split"]], on="dicom_id", how="left")
        df = df[df["split"] == split]
    df = df.sort_values("dicom_id").reset_index(drop=True)
    if len(df) == 0:
        raise ImageSelectionError(f"{root}: no frontal (PA/AP) images" + (f" in split {split!r}" if split != "all" else ""))
    if n is not None and n < len(df):
        df = df.sample(n=n, random_state=seed).reset_index(drop=True)
    elif n is not None and n > len(df):
        warnings.warn(f"--n {n} but only {len(df)} frontal images are available: using all of them")
    df["image_id"] = df["dicom_id"]
    df["path"] = [str(image_path(root, r.subject_id, r.study_id, r.dicom_id)) for r in df.itertuples()]
    return df


def select_folder(folder, n: Optional[int] = None, seed: int = 0) -> pd.DataFrame:
    """Every image under ``folder`` (recursive, sorted), or a seeded random ``n`` of them. No labels."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ImageSelectionError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ImageSelectionError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    df = pd.DataFrame({"image_id": [str(p.relative_to(folder)) for p in paths], "path": [str(p) for p in paths]})
    if n is not None and n < len(df):
        df = df.sample(n=n, random_state=seed).reset_index(drop=True)
    return df


def load_images(records: pd.DataFrame, resolution: int, on_bad_image: str = "fail", skip_option: bool = True
                ) -> tuple[pd.DataFrame, np.ndarray, list[dict]]:
    """Decode, resize (shorter side) and centre-crop every record; returns (kept records, uint8 [N,H,W], skipped).
    ``skip_option``: the caller takes ``--on_bad_image skip`` (its error advises the flag only then)."""
    from tqdm.auto import tqdm

    if on_bad_image not in ("fail", "skip"):
        raise ImageSelectionError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if records.empty:
        raise ImageSelectionError("no images selected")
    images, keep, skipped = [], [], []
    for i, row in enumerate(tqdm(records.itertuples(), total=len(records), desc="loading images", disable=len(records) < 20)):
        try:
            images.append(load_grayscale(Path(row.path), resolution))
            keep.append(i)
        except OSError as err:
            if on_bad_image == "fail":
                advice = (" Pass --on_bad_image skip to leave such images out (they are then listed in the summary)."
                          if skip_option else "")
                raise ImageSelectionError(f"{err}.{advice}") from None
            skipped.append({"image_id": row.image_id, "path": row.path, "error": str(err)})
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {[s['path'] for s in skipped[:5]]}")
    if not images:
        raise ImageSelectionError(f"all {len(records)} selected images were unreadable, e.g. {skipped[0]['error']}")
    return records.iloc[keep].reset_index(drop=True), np.stack(images), skipped


def reference_images(mimic_root: str, finding: str, split: str, n: Optional[int], resolution: int, seed: int
                     ) -> tuple[pd.DataFrame, np.ndarray]:
    """Frontal images of ``split`` positive (1.0) for ``finding``, uint8 ``[N, H, W]`` (at least 2: FID needs them)."""
    records = select_mimic(mimic_root, None, seed, split)
    records = records[records[finding] == 1.0].reset_index(drop=True)
    if len(records) < 2:
        raise ImageSelectionError(f"{mimic_root}: {len(records)} frontal {split!r} image(s) positive for {finding!r}; "
                                  "FID needs at least 2 (choose another --split)")
    if n is not None and n < len(records):
        records = records.sample(n=n, random_state=seed).reset_index(drop=True)
    kept, images, _ = load_images(records, resolution, skip_option=False)  # the generation study has no --on_bad_image
    return kept, images
