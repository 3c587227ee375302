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

The kit holds real images when built from MIMIC: it is written only to the local folder given.
:func:`summarize_scores` (``python evaluate.py vae-scores scores.csv``) checks the filled sheet and
returns mean ± sd, median and range.
"""
from __future__ import annotations

import csv
import html
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from core.errors import UserError

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
KEY_FILE = "key_PRIVATE.csv"


class ScoreSheetError(UserError, ValueError):
    """The filled scoring sheet is not usable (missing rows, out-of-range or non-integer scores)."""


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
                    scale: Optional[dict] = None, title: str = "Reader study", questions: Optional[dict] = None) -> Path:
    """Write a blinded kit for ``n`` random ``items`` into ``out``; return the folder.

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
    columns = ("case", *questions, "score", "comment")
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
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


def read_score_sheet(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ScoreSheetError(f"{path}: scoring sheet not found")
    with open(path, newline="", encoding="utf-8") as fh:
        lines = [line for line in fh if not line.lstrip().startswith("#") and line.strip()]
    if not lines:
        raise ScoreSheetError(f"{path}: the scoring sheet is empty")
    reader = csv.DictReader(lines)
    missing = [c for c in ("case", "score") if c not in (reader.fieldnames or [])]
    if missing:
        raise ScoreSheetError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
    return list(reader)


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
        with open(key_path, newline="", encoding="utf-8") as fh:
            expected = [r["case"] for r in csv.DictReader(fh)]
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
    with open(key_path, newline="", encoding="utf-8") as fh:
        source = {r["case"]: r["source_id"] for r in csv.DictReader(fh)}
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
