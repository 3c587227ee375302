"""MIMIC-CXR free-text reports with their CheXpert labels, as a corpus to sample from.

Shared by the text-encoder study (CheXpert@k on impressions) and report-conditioned generation (impressions as
prompts): the report files (``files/pXX/pSUBJECT/sSTUDY.txt``), the label CSV, one usable section per report
(impression > findings > last paragraph) and a class-balanced sample with a seed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from core.errors import UserError
from datamodules.mimic_cxr import CHEXPERT_CLASSES, CHEXPERT_CSV, MIMICDataError, read_mimic_csv
from datamodules.reports import PRIORITY, split_sections

UNCERTAIN = ("negative", "positive", "exclude")


class ReportCorpusError(UserError, ValueError):
    """Reports or labels that cannot be used: the message names the folder, file or option."""


REPORT_RE = re.compile(r"^s(\d+)\.txt$")
SUBJECT_RE = re.compile(r"^p(\d+)$")


def find_report_files(root: Path | str) -> dict[int, tuple[int, Path]]:
    """``study_id -> (subject_id, path)`` of every ``pXX/pSUBJECT/sSTUDY.txt`` below ``root``.

    ``root`` may be the unpacked ``mimic-cxr-reports`` folder, its ``files/`` folder, or a MIMIC-CXR root
    holding ``files/`` (the phantom demo data keeps its reports there too).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ReportCorpusError(f"{root}: report folder not found (expected the unpacked mimic-cxr-reports.zip: files/pXX/pSUBJECT/sSTUDY.txt)")
    found: dict[int, tuple[int, Path]] = {}
    for path in root.rglob("s*.txt"):
        m, p = REPORT_RE.match(path.name), SUBJECT_RE.match(path.parent.name)
        if m and p:
            found[int(m.group(1))] = (int(p.group(1)), path)
    if not found:
        raise ReportCorpusError(
            f"{root}: no report files. Expected MIMIC-CXR free-text reports laid out as files/pXX/pSUBJECT/sSTUDY.txt "
            "(unpack mimic-cxr-reports.zip from https://physionet.org/content/mimic-cxr/2.0.0/ and pass that folder)."
        )
    return found


def read_labels(path: Path | str) -> pd.DataFrame:
    """The CheXpert label CSV (``mimic-cxr-2.0.0-chexpert.csv.gz`` schema), checked, indexed by study_id."""
    try:
        df = read_mimic_csv(Path(path).expanduser(), CHEXPERT_CSV)
    except MIMICDataError as err:
        raise ReportCorpusError(str(err)) from None
    dup = df["study_id"].duplicated()
    if dup.any():
        raise ReportCorpusError(f"{path}: study_id {int(df.loc[dup, 'study_id'].iloc[0])} appears more than once; expected one row per study")
    return df.set_index("study_id")


def positive_matrix(labels: pd.DataFrame, uncertain: str) -> np.ndarray:
    """Boolean ``[n, 14]``: positive for each class. ``uncertain`` (-1.0) counts as negative or as positive;
    with ``exclude`` the caller has already dropped reports with any uncertain label."""
    values = labels[list(CHEXPERT_CLASSES)].to_numpy(dtype=np.float64)
    if uncertain == "positive":
        return (values == 1.0) | (values == -1.0)
    return values == 1.0


@dataclass
class Corpus:
    """Usable reports: one row per study with subject_id, section, text and the 14 label columns."""

    table: pd.DataFrame
    skipped: dict[str, int]
    sections_used: dict[str, int]


def load_corpus(reports_root: Path | str, labels_csv: Path | str, uncertain: str = "negative",
                progress: bool = True, log: Callable[[str], None] = print) -> Corpus:
    """Read every labelled report and extract its impression (impression > findings > last paragraph)."""
    from tqdm.auto import tqdm

    if uncertain not in UNCERTAIN:
        raise ReportCorpusError(f"uncertain: unknown value {uncertain!r}; expected one of {', '.join(UNCERTAIN)}")
    files = find_report_files(reports_root)
    labels = read_labels(labels_csv)
    studies = sorted(set(files) & set(labels.index))
    skipped = {"labels_without_report": int(len(set(labels.index) - set(files))),
               "reports_without_labels": int(len(set(files) - set(labels.index))),
               "no_usable_section": 0, "unreadable": 0, "uncertain_excluded": 0}
    if not studies:
        raise ReportCorpusError(
            f"no study has both a report under {reports_root} and a row in {labels_csv} "
            f"({len(files)} reports, {len(labels)} label rows): do they come from the same MIMIC-CXR release?"
        )
    rows, used = [], {name: 0 for name in PRIORITY}
    for study in tqdm(studies, desc="reading reports", disable=not progress or len(studies) < 200):
        subject, path = files[study]
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            log(f"warning: {path}: cannot be read ({err}); skipped")
            skipped["unreadable"] += 1
            continue
        sections = split_sections(text)
        section = next((name for name in PRIORITY if sections.get(name)), None)
        if section is None:
            skipped["no_usable_section"] += 1
            continue
        used[section] += 1
        rows.append((study, subject, section, sections[section]))
    table = pd.DataFrame(rows, columns=["study_id", "subject_id", "section", "text"]).set_index("study_id")
    table = table.join(labels[list(CHEXPERT_CLASSES)], how="inner")
    if uncertain == "exclude":
        keep = ~(table[list(CHEXPERT_CLASSES)] == -1.0).any(axis=1)
        skipped["uncertain_excluded"] = int((~keep).sum())
        table = table[keep]
    return Corpus(table.reset_index(), skipped, used)


def sample_per_class(corpus: Corpus, n_per_class: int, seed: int = 0, uncertain: str = "negative",
                     allow_short_classes: bool = False, classes: Sequence[str] = CHEXPERT_CLASSES) -> pd.DataFrame:
    """``n_per_class`` reports positive for each class, each carrying the class it was drawn for (``class``).

    Classes are filled rarest first, without replacement (a report is drawn for one class only), with a
    ``numpy`` generator seeded by ``seed``. The result is ordered by class (CheXpert order), then study id.
    """
    table = corpus.table
    positives = positive_matrix(table, uncertain)
    col = {c: i for i, c in enumerate(CHEXPERT_CLASSES)}
    available = {c: int(positives[:, col[c]].sum()) for c in classes}
    short = {c: n for c, n in available.items() if n < n_per_class}
    if short and not allow_short_classes:
        listing = ", ".join(f"{c!r}: {n}" for c, n in short.items())
        raise ReportCorpusError(
            f"n_per_class={n_per_class}, but some classes have fewer usable reports positive for them "
            f"(uncertain={uncertain}): {listing}. Lower --n_per_class, or pass --allow_short_classes to use what there is."
        )
    rng = np.random.default_rng(seed)
    taken = np.zeros(len(table), dtype=bool)
    picks = []
    for c in sorted(classes, key=lambda c: (available[c], col[c])):  # rarest first; ties in CheXpert order
        pool = np.flatnonzero(positives[:, col[c]] & ~taken)
        chosen = rng.choice(pool, size=min(n_per_class, len(pool)), replace=False) if len(pool) else pool
        taken[chosen] = True
        picks.append(pd.DataFrame({"row": chosen, "class": c}))
    picked = pd.concat(picks, ignore_index=True)
    sample = table.iloc[picked["row"].to_numpy()].copy()
    sample["class"] = picked["class"].to_numpy()
    order = {c: i for i, c in enumerate(classes)}
    sample["_order"] = sample["class"].map(order)
    return sample.sort_values(["_order", "study_id"]).drop(columns="_order").reset_index(drop=True)
