"""A generic blinded reader-study kit and the summary of its filled scoring sheet.

The paper had a radiologist score 100 random original–reconstruction pairs from 1 to 5. The kit
works for pairs (VAE study: which side is the reconstruction is randomised per case) and for single
images (generation study). It writes, into one local folder:

* ``cases/case_XXX_*.png``: the images, named only by a blinded case number (shuffled order);
* ``index.html``: a page showing every case with the scale definitions (open it in a browser);
* ``scores.csv``: the sheet to fill in (``case``, ``score``, ``comment``); the scale is in the header
  comment lines and in ``SCALE.md``;
* ``key_PRIVATE.csv``: which source each case came from (and, for pairs, which side is the original).
  Keep it away from the reader until scoring is done.

A folder that already holds a kit is refused (:func:`check_kit_folder`) unless ``overwrite`` is given, and even then
neither a sheet that a reader has started to fill nor the key are overwritten: they are renamed with a time stamp
(``scores.filled-YYYYmmdd-HHMMSS.csv``, ``key_PRIVATE.YYYYmmdd-HHMMSS.csv``), and one line says so.

The kit holds real images when built from MIMIC: it is written only to the local folder given.
:func:`summarize_scores` (``python evaluate.py vae-scores scores.csv``) checks the filled sheet and
returns mean ± sd, median and range.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import random
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from core.errors import UserError, read_text

# The paper's scale (section 2.3, lines 103-107), verbatim.
PAPER_SCALE = {
    5: "Very good reconstruction with essentially non-inferior diagnostic quality to the original",
    4: "Good reconstruction with noticeable errors not negatively influencing diagnostic quality",
    3: "Moderate reconstruction errors with possible negative effects to diagnostic performance",
    2: "Severe reconstruction errors or errors of any level leading to hallucinated lesions",
    1: "Severe reconstruction errors yielding the image undiagnostic",
}
# For single (generated) images the paper gives no scale: this is a PLACEHOLDER of ours, not the paper's.
SINGLE_IMAGE_SCALE_PLACEHOLDER = {
    5: "PLACEHOLDER (not from the paper): realistic, diagnostic-quality chest X-ray",
    4: "PLACEHOLDER (not from the paper): realistic, minor artefacts not affecting diagnosis",
    3: "PLACEHOLDER (not from the paper): noticeable artefacts that may affect diagnosis",
    2: "PLACEHOLDER (not from the paper): severe artefacts or implausible anatomy / hallucinated lesions",
    1: "PLACEHOLDER (not from the paper): not a diagnostic chest X-ray",
}
SHEET_COLUMNS = ("case", "score", "comment")
SHEET_FILE = "scores.csv"
KEY_FILE = "key_PRIVATE.csv"
SUMMARY_FILE = "scores_by_source.csv"  # written beside the sheet by ``evaluate.py generation-scores``
KIT_FILES = (SHEET_FILE, KEY_FILE, "SCALE.md", "index.html", "cases")


class ScoreSheetError(UserError, ValueError):
    """The filled scoring sheet is not usable (missing rows, out-of-range or non-integer scores)."""


class ReaderKitExistsError(UserError, FileExistsError):
    """The output folder already holds a reader kit and ``overwrite`` was not given."""


def existing_kit_files(out) -> list[str]:
    """The names of a reader kit's files already in ``out`` (empty when there is no kit)."""
    out = Path(out)
    return [name for name in KIT_FILES if (out / name).exists()]


def check_kit_folder(out, overwrite: bool = False, option: str = "--overwrite") -> None:
    """Refuse a folder that holds a reader kit unless ``overwrite`` (a study calls this before its long computation)."""
    found = existing_kit_files(out)
    if found and not overwrite:
        raise ReaderKitExistsError(
            f"{out}: holds a reader kit already ({', '.join(found)}); pass {option} to write a new one (the key and a "
            "filled score sheet are then kept under time-stamped names, never overwritten) or choose another --out")


def sheet_is_filled(path) -> bool:
    """True when any row of the sheet has something besides its case id (a score, an answer, a comment).

    A sheet that cannot be read or parsed counts as filled: it is kept, not overwritten."""
    try:
        rows = list(csv.DictReader(_sheet_lines(path)))
    except (OSError, UserError, csv.Error):
        return True
    return any((value or "").strip() for row in rows for column, value in row.items() if column != "case")


def _aside(path: Path, name: str) -> Path:
    """``path`` renamed to ``name`` in its folder (``name-2``, ``name-3``, ... when taken); returns the new path."""
    target, n = path.with_name(name), 1
    while target.exists():
        n += 1
        stem, dot, suffix = name.rpartition(".")
        target = path.with_name(f"{stem}-{n}.{suffix}" if dot else f"{name}-{n}")
    path.rename(target)
    return target


def clear_kit(out, log: Callable[[str], None] = print) -> list[Path]:
    """Make room for a new kit in ``out``; returns the files kept.

    The earlier kit's private key (a reader may still be scoring a copy of it), a filled score sheet and the summary
    made from it are renamed with a time stamp, and one line through ``log`` says so; the rest (cases, page, scale, an
    empty sheet) is removed, so two kits never mix.
    """
    out = Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    keep = {KEY_FILE: f"key_PRIVATE.{stamp}.csv", SUMMARY_FILE: f"scores_by_source.{stamp}.csv"}
    if (out / SHEET_FILE).exists() and sheet_is_filled(out / SHEET_FILE):
        keep[SHEET_FILE] = f"scores.filled-{stamp}.csv"
    kept = [_aside(out / name, new) for name, new in keep.items() if (out / name).exists()]
    if kept:
        log(f"reader kit: the earlier kit's files are kept as {', '.join(p.name for p in kept)} in {out} (never overwritten); "
            "writing a new kit")
    for name in KIT_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return kept


def _as_u8(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"reader kit expects uint8 (or 0–255) images, got values in [{arr.min()}, {arr.max()}]")
        arr = np.round(arr).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.mean(axis=0).astype(np.uint8)
    return arr


def make_reader_kit(items: Sequence, out, n: Optional[int] = None, seed: int = 0, ids: Optional[Sequence[str]] = None,
                    scale: Optional[dict] = None, title: str = "Reader study", questions: Optional[dict] = None,
                    overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write a blinded kit for ``n`` random ``items`` into ``out``; return the folder.

    A kit already in ``out`` is refused (:class:`ReaderKitExistsError`) unless ``overwrite``; then a filled sheet and
    its key are kept under time-stamped names (:func:`clear_kit`, which reports it through ``log``).

    ``items``: either pairs ``(original, reconstruction)`` or single images (uint8 ``[H, W]`` arrays).
    ``ids``: the source id of each item (e.g. dicom_id) for the private key; default the item index.
    ``scale``: score -> definition; default the paper's scale for pairs, a placeholder for single images.
    ``questions``: extra sheet columns answered yes/no, column -> question (e.g. ``{"finding_present":
    "Is a pleural effusion visible?"}``); they come before ``score`` in the sheet.
    """
    items = list(items)
    if not items:
        raise ValueError("make_reader_kit: no images given")
    paired = isinstance(items[0], (tuple, list))
    ids = [str(i) for i in (ids if ids is not None else range(len(items)))]
    if len(ids) != len(items):
        raise ValueError(f"make_reader_kit: {len(ids)} ids for {len(items)} items")
    n = len(items) if n is None else min(int(n), len(items))
    if n < 1:
        raise ValueError(f"make_reader_kit: n must be >= 1, got {n}")
    scale = dict(scale or (PAPER_SCALE if paired else SINGLE_IMAGE_SCALE_PLACEHOLDER))
    rng = random.Random(seed)
    chosen = rng.sample(range(len(items)), n)  # random subset in random order
    out = Path(out)
    check_kit_folder(out, overwrite)
    clear_kit(out, log)
    cases_dir = out / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    key_rows, html_cases = [], []
    for case_number, index in enumerate(chosen, start=1):
        case = f"case_{case_number:03d}"
        if paired:
            original, recon = (_as_u8(x) for x in items[index])
            original_left = rng.random() < 0.5
            left, right = (original, recon) if original_left else (recon, original)
            files = [f"{case}_A.png", f"{case}_B.png"]
            Image.fromarray(left).save(cases_dir / files[0])
            Image.fromarray(right).save(cases_dir / files[1])
            key_rows.append({"case": case, "source_id": ids[index], "A": "original" if original_left else "reconstruction",
                             "B": "reconstruction" if original_left else "original"})
        else:
            files = [f"{case}.png"]
            Image.fromarray(_as_u8(items[index])).save(cases_dir / files[0])
            key_rows.append({"case": case, "source_id": ids[index]})
        imgs = "".join(f'<figure><img src="cases/{f}" width="400"><figcaption>{f[-5] if paired else ""}</figcaption></figure>' for f in files)
        html_cases.append(f'<section><h2>{case}</h2><div class="row">{imgs}</div></section>')
    scale_lines = [f"{k}: {scale[k]}" for k in sorted(scale, reverse=True)]
    questions = dict(questions or {})
    _write_sheet_and_key(out, title, scale, scale_lines, questions, paired, key_rows)
    (out / "SCALE.md").write_text(f"# {title}: scoring scale\n\n" + "\n".join(f"- {line}" for line in scale_lines) + "\n", encoding="utf-8")
    scale_html = "".join(f"<li>{html.escape(line)}</li>" for line in scale_lines)
    intro = ("Each case shows an original and its reconstruction side by side (A/B, order randomised)."
             if paired else "Each case shows one image.")
    (out / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;background:#111;color:#eee} .row{display:flex;gap:8px} "
        "figure{margin:0} img{image-rendering:auto}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{intro} Enter one integer score per case in scores.csv"
        + "".join(f", and answer <b>{html.escape(c)}</b>: {html.escape(q)} (yes/no)" for c, q in questions.items()) + ".</p>"
        f"<ul>{scale_html}</ul>{''.join(html_cases)}</body></html>",
        encoding="utf-8",
    )
    return out


def _sheet_lines(path: Path) -> list[str]:
    """The lines of a sheet that are neither blank nor ``#`` comments (:func:`core.errors.read_text`: UTF-8, BOM or not)."""
    text = read_text(path, "score sheet")
    return [line for line in io.StringIO(text, newline="") if line.strip() and not line.lstrip().startswith("#")]


def read_score_sheet(path) -> list[dict]:
    """The sheet's rows (comment lines left out). UTF-8 with or without a byte-order mark, as spreadsheet programs save
    it; any other encoding is refused naming the file (:func:`core.errors.read_text`)."""
    path = Path(path)
    if not path.is_file():
        raise ScoreSheetError(f"{path}: scoring sheet not found")
    lines = _sheet_lines(path)
    if not lines:
        raise ScoreSheetError(f"{path}: the scoring sheet is empty")
    reader = csv.DictReader(lines)
    missing = [c for c in ("case", "score") if c not in (reader.fieldnames or [])]
    if missing:
        raise ScoreSheetError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
    return list(reader)


def _write_sheet_and_key(out: Path, title: str, scale: dict, scale_lines: list[str], questions: dict, paired: bool,
                         key_rows: list[dict]) -> None:
    """``scores.csv`` (instructions as ``#`` lines, one empty row per case) and ``key_PRIVATE.csv``."""
    columns = ("case", *questions, "score", "comment")
    with open(out / SHEET_FILE, "w", newline="", encoding="utf-8") as fh:
        fh.write(f"# {title}: give each case an integer score from {min(scale)} to {max(scale)}.\n")
        for column, question in questions.items():
            fh.write(f"# {column}: {question} Answer yes or no.\n")
        if paired:
            fh.write("# Each case shows an original and its reconstruction (A/B, randomised). Score the reconstruction quality.\n")
        for line in scale_lines:
            fh.write(f"# {line}\n")
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in key_rows:
            writer.writerow({c: (row["case"] if c == "case" else "") for c in columns})
    with open(out / KEY_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(key_rows[0]))
        writer.writeheader()
        writer.writerows(key_rows)


def read_key(path) -> list[dict]:
    """The rows of a kit's private key (``case``, ``source_id``, ...), read as :func:`read_score_sheet` reads a sheet."""
    rows = list(csv.DictReader(io.StringIO(read_text(path, "reader-kit key"), newline="")))
    if rows and not {"case", "source_id"} <= set(rows[0]):
        raise ScoreSheetError(f"{path}: missing column(s) case/source_id; found {list(rows[0])}")
    return rows


def summarize_scores(path, low: int = 1, high: int = 5, key: Optional[str] = None) -> dict:
    """Check a filled sheet and return ``{"n", "mean", "sd", "median", "min", "max", "counts"}``.

    Every case needs an integer score in ``[low, high]``. If the kit's private key sits beside the sheet
    (or ``key`` is given), every case listed there must appear exactly once in the sheet.
    """
    path = Path(path)
    rows = read_score_sheet(path)
    problems, scores, seen = [], [], set()
    for line_no, row in enumerate(rows, start=1):
        case = (row.get("case") or "").strip()
        raw = (row.get("score") or "").strip()
        if not case:
            problems.append(f"row {line_no}: no case id")
            continue
        if case in seen:
            problems.append(f"{case}: scored more than once")
            continue
        seen.add(case)
        if raw == "":
            problems.append(f"{case}: missing score")
            continue
        try:
            value = float(raw)
        except ValueError:
            problems.append(f"{case}: score {raw!r} is not a number")
            continue
        if value != int(value) or not low <= value <= high:
            problems.append(f"{case}: score {raw!r} is out of range (integers {low}–{high})")
            continue
        scores.append(int(value))
    key_path = Path(key) if key else path.parent / KEY_FILE
    if key_path.is_file():
        expected = [r["case"] for r in read_key(key_path)]
        absent = [c for c in expected if c not in seen]
        if absent:
            problems.append(f"missing rows for {len(absent)} case(s) listed in {key_path.name}: {absent[:10]}{' ...' if len(absent) > 10 else ''}")
        extra = sorted(seen - set(expected))
        if extra:
            problems.append(f"case(s) not in {key_path.name}: {extra[:10]}")
    if problems:
        shown = "\n  ".join(problems[:20])
        raise ScoreSheetError(f"{path}: {len(problems)} problem(s) in the scoring sheet:\n  {shown}" + ("\n  ..." if len(problems) > 20 else ""))
    if not scores:
        raise ScoreSheetError(f"{path}: no scores")
    v = np.asarray(scores, dtype=np.float64)
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "median": float(np.median(v)),
        "min": int(v.min()),
        "max": int(v.max()),
        "counts": {k: int((v == k).sum()) for k in range(low, high + 1)},
    }


def format_scores(s: dict) -> str:
    counts = ", ".join(f"{k}: {c}" for k, c in s["counts"].items())
    return (f"Visual score {s['mean']:.2f} ± {s['sd']:.2f}; median, {s['median']:g}; range, {s['min']} – {s['max']} "
            f"(n={s['n']}; counts {counts})")


def summarize_by_source(path, key: Optional[str] = None, low: int = 1, high: int = 5, questions: Sequence[str] = ()) -> list[dict]:
    """Per source of the private key (e.g. ``strategy | prompt`` or ``real | finding``): N, mean ± sd score and,
    for each yes/no question column, the share of "yes". The sheet is checked as by :func:`summarize_scores`."""
    path = Path(path)
    summarize_scores(path, low, high, key)  # every case scored once, in range (raises otherwise)
    key_path = Path(key) if key else path.parent / KEY_FILE
    if not key_path.is_file():
        raise ScoreSheetError(f"{key_path}: the kit's private key is needed to group scores by source")
    source = {r["case"]: r["source_id"] for r in read_key(key_path)}
    rows = read_score_sheet(path)
    problems, groups = [], {}
    for row in rows:
        case = row["case"].strip()
        answers = {}
        for q in questions:
            value = (row.get(q) or "").strip().lower()
            if value not in ("yes", "no"):
                problems.append(f"{case}: {q} is {value!r}; expected yes or no")
            answers[q] = value == "yes"
        groups.setdefault(source[case], []).append((int(float(row["score"])), answers))
    if problems:
        raise ScoreSheetError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))
    out = []
    for name in sorted(groups):
        scores = np.array([s for s, _ in groups[name]], dtype=float)
        entry = {"source": name, "n": int(scores.size), "mean_score": float(scores.mean()),
                 "sd_score": float(scores.std(ddof=1)) if scores.size > 1 else 0.0}
        for q in questions:
            entry[f"{q}_yes_share"] = float(np.mean([a[q] for _, a in groups[name]]))
        out.append(entry)
    return out


def scores_main(argv: Optional[Sequence[str]] = None) -> int:
    """``evaluate.py vae-scores SHEET``: the summary of a filled sheet (this module only: no study, no torch to import)."""
    p = argparse.ArgumentParser(prog="evaluate.py vae-scores", description="Summarise a filled reader-study scoring sheet.")
    p.add_argument("sheet", help="the filled scores.csv")
    p.add_argument("--key", default=None, help="the kit's key_PRIVATE.csv (default: beside the sheet, if present) to check for missing rows")
    p.add_argument("--min_score", type=int, default=1)
    p.add_argument("--max_score", type=int, default=5)
    args = p.parse_args(argv)
    try:
        s = summarize_scores(args.sheet, args.min_score, args.max_score, args.key)
    except ScoreSheetError as err:
        print(f"evaluate.py vae-scores: error: {err}", file=sys.stderr)
        return 2
    print(format_scores(s))
    print(json.dumps(s))
    return 0
