"""Candidates for the paper's hand-picked training images: ``python -m datamodules.candidates --mimic ROOT --out DIR``.

The paper fine-tuned on 10 hand-picked MIMIC-CXR images (5 "no finding", 5 "pleural effusion") and did
not publish which. This helper proposes candidates a reader can review, following the stated criteria:

* a frontal view (PA first, then AP) from the official ``train`` split;
* a single label: the finding is positive (1.0) and every other CheXpert class is blank or 0.0
  (never positive, never uncertain), so "pleural effusion" images show an effusion and nothing else
  the labeller found;
* no support devices (``Support Devices`` blank or 0.0), so no lines or tubes;
* one image per patient, so the 5 are 5 people.

It writes into ``--out``:

* ``candidates.csv``: every proposed image (``--n`` per finding, ranked: PA before AP, then in a
  seeded random order), with its ids, view and file path;
* ``contact_sheet_<finding>.png``: the candidates as labelled thumbnails, for review (local only:
  these are real patient images);
* ``selected.csv``: the first ``--k`` per finding (``dicom_id, finding``). Review it, replace any
  image you would not use, then pass it to ``reproduce.py --images`` (or the ids to a config's
  ``--data.init_args.dicom_ids``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from datamodules.mimic_cxr import (CHEXPERT_CLASSES, CHEXPERT_CSV, METADATA_CSV, SPLIT_CSV, MIMICDataError, image_path,
                                   read_csv_checked)

DEFAULT_FINDINGS = ("No Finding", "Pleural Effusion")
VIEW_RANK = {"PA": 0, "AP": 1}


def single_label_mask(labels: pd.DataFrame, finding: str) -> pd.Series:
    """Studies positive for ``finding`` and for no other class (blank or 0.0 elsewhere), without support devices."""
    if finding not in CHEXPERT_CLASSES:
        raise MIMICDataError(f"finding {finding!r} is not a CheXpert class; expected one of {list(CHEXPERT_CLASSES)}")
    others = [c for c in CHEXPERT_CLASSES if c != finding and not (finding != "No Finding" and c == "No Finding")]
    clean = labels[others].isna() | (labels[others] == 0.0)
    # "No Finding" is never 1.0 beside a finding, but it may be blank: it does not need to be 0.0.
    return (labels[finding] == 1.0) & clean.all(axis=1)


def propose(root: str | Path, findings: Sequence[str] = DEFAULT_FINDINGS, n: int = 20, k: int = 5,
            seed: int = 0, split: str = "train") -> pd.DataFrame:
    """Ranked candidates: ``n`` per finding (fewer if MIMIC has fewer); column ``selected`` marks the first ``k``."""
    root = Path(root)
    if n < k:
        raise MIMICDataError(f"--n {n} is smaller than --k {k}: propose at least as many candidates as you select")
    meta = read_csv_checked(root, METADATA_CSV)
    labels = read_csv_checked(root, CHEXPERT_CSV)
    splits = read_csv_checked(root, SPLIT_CSV)
    frontal = meta[meta["ViewPosition"].isin(tuple(VIEW_RANK))][["dicom_id", "subject_id", "study_id", "ViewPosition"]]
    frontal = frontal.merge(splits[["dicom_id", "split"]], on="dicom_id", how="inner")
    frontal = frontal[frontal["split"] == split]
    rows = []
    for i, finding in enumerate(findings):
        studies = labels[single_label_mask(labels, finding)][["subject_id", "study_id"]]
        pool = frontal.merge(studies, on=["subject_id", "study_id"], how="inner")
        if pool.empty:
            raise MIMICDataError(f"{root}: no frontal {split!r} image is labelled {finding!r} alone without support devices")
        rng = np.random.default_rng([seed, i])
        pool = pool.sort_values("dicom_id").reset_index(drop=True)
        pool["_order"] = rng.permutation(len(pool))
        pool["_view"] = pool["ViewPosition"].map(VIEW_RANK)
        pool = pool.sort_values(["_view", "_order"]).drop_duplicates("subject_id").head(n)
        if len(pool) < k:
            raise MIMICDataError(f"{root}: only {len(pool)} patients have a frontal {split!r} image labelled {finding!r} "
                                 f"alone without support devices; {k} are needed")
        pool = pool.drop(columns=["_order", "_view"]).reset_index(drop=True)
        pool.insert(0, "rank", np.arange(1, len(pool) + 1))
        pool.insert(1, "finding", finding)
        pool["selected"] = pool["rank"] <= k
        pool["path"] = [str(image_path(root, r.subject_id, r.study_id, r.dicom_id)) for r in pool.itertuples()]
        rows.append(pool)
    return pd.concat(rows, ignore_index=True)


def read_selection(path: str | Path) -> pd.DataFrame:
    """A reviewed ``selected.csv`` (``dicom_id, finding``), checked: the error names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise MIMICDataError(f"{path}: image list not found (write one with `python -m datamodules.candidates`)")
    try:
        df = pd.read_csv(path, dtype=str)
    except (ValueError, OSError) as err:
        raise MIMICDataError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in ("dicom_id", "finding") if c not in df.columns]
    if missing:
        raise MIMICDataError(f"{path}: missing column(s) {missing}; expected dicom_id, finding (found {list(df.columns)})")
    df = df[["dicom_id", "finding"]].dropna(how="all")
    if df.empty or df.isna().any().any():
        raise MIMICDataError(f"{path}: every row needs a dicom_id and a finding")
    df = df.apply(lambda c: c.str.strip())
    dupes = sorted(set(df.loc[df["dicom_id"].duplicated(), "dicom_id"]))
    if dupes:
        raise MIMICDataError(f"{path}: dicom_id(s) listed twice: {dupes}")
    unknown = sorted(set(df["finding"]) - set(CHEXPERT_CLASSES))
    if unknown:
        raise MIMICDataError(f"{path}: finding(s) {unknown} are not CheXpert classes")
    return df.reset_index(drop=True)


def contact_sheet(df: pd.DataFrame, path: Path, size: int = 192, per_row: int = 5) -> None:
    """Labelled thumbnails of ``df``'s images (rank, dicom_id, view); unreadable files show as a labelled gap."""
    from PIL import Image, ImageDraw

    from datamodules.mimic_cxr import load_grayscale

    label_h = 14
    rows = -(-len(df) // per_row)
    sheet = Image.new("L", (per_row * size, rows * (size + label_h)), 255)
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(df.itertuples()):
        x, y = (i % per_row) * size, (i // per_row) * (size + label_h)
        try:
            sheet.paste(Image.fromarray(load_grayscale(Path(r.path), size)), (x, y + label_h))
        except (OSError, ValueError):
            draw.text((x + 4, y + label_h + size // 2), "unreadable", fill=0)
        draw.text((x + 2, y + 1), f"{r.rank}. {r.dicom_id[:18]} {r.ViewPosition}", fill=0)
    sheet.save(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.candidates", description=__doc__.split("\n")[0])
    p.add_argument("--mimic", required=True, help="MIMIC-CXR-JPG v2.0.0 root")
    p.add_argument("--out", required=True, help="output folder (local only: the contact sheets show real images)")
    p.add_argument("--findings", nargs="+", default=list(DEFAULT_FINDINGS))
    p.add_argument("--n", type=int, default=20, help="candidates per finding (default 20)")
    p.add_argument("--k", type=int, default=5, help="of which the first K go into selected.csv (default 5, as the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "validate", "test"))
    p.add_argument("--no_contact_sheets", dest="sheets", action="store_false")
    args = p.parse_args(argv)
    try:
        df = propose(args.mimic, args.findings, args.n, args.k, args.seed, args.split)
    except MIMICDataError as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "candidates.csv", index=False)
    df.loc[df["selected"], ["dicom_id", "finding"]].to_csv(out / "selected.csv", index=False)
    if args.sheets:
        for finding, part in df.groupby("finding", sort=False):
            contact_sheet(part, out / f"contact_sheet_{finding.lower().replace(' ', '_')}.png")
    counts = df.groupby("finding", sort=False).size().to_dict()
    print(f"proposed {counts} candidates in {out / 'candidates.csv'}; the first {args.k} per finding are in "
          f"{out / 'selected.csv'}. Review them (contact_sheet_*.png), edit selected.csv, then pass it to "
          "reproduce.py --images.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
