"""MIMIC-CXR free-text reports: section splitting and impression extraction.

Follows the logic of MIT-LCP's ``txt/section_parser.py`` (docs/formats.md §1): sections are split on a
newline, one space and an ALL-CAPS header followed by a colon; the chunk before the first header is
the ``preamble``; a handful of header spellings are normalised to ``impression``/``findings``; an
empty section is dropped; if neither impression nor findings exists, the text after the first blank
line of the last section becomes ``last_paragraph``. The section used for a report is the first of
``impression > findings > last_paragraph`` that is present.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

SECTION_RE = re.compile(r"\n ([A-Z ()/,-]+):\s")

# Header spellings folded together (a subset of MIT-LCP's normalisation map).
SECTION_ALIASES = {
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "impression and recommendation": "impression",
    "summary": "impression",
    "finding": "findings",
    "findings and": "findings",
}
PRIORITY = ("impression", "findings", "last_paragraph")


def split_sections(text: str) -> dict[str, str]:
    """Section name (lower case, normalised) -> stripped text; empty sections are dropped."""
    text = "\n" + text.replace("\r\n", "\n")
    parts = SECTION_RE.split(text)
    sections: dict[str, str] = {"preamble": parts[0].strip()}
    names, bodies = parts[1::2], parts[2::2]
    for name, body in zip(names, bodies):
        key = SECTION_ALIASES.get(name.strip().lower(), name.strip().lower())
        body = " ".join(body.split())
        if body:
            # a repeated header (rare) keeps the last occurrence, as the MIT-LCP parser does
            sections[key] = body
    if "impression" not in sections and "findings" not in sections:
        last_name = names[-1] if names else None
        last_raw = bodies[-1] if bodies else parts[0]
        chunks = re.split(r"\n\s*\n", last_raw.strip("\n"), maxsplit=1)
        if len(chunks) == 2 and chunks[1].strip():
            sections["last_paragraph"] = " ".join(chunks[1].split())
        elif last_name is None and parts[0].strip():
            sections["last_paragraph"] = " ".join(parts[0].split())
    sections.pop("", None)
    return sections


def extract_impression(text: str) -> tuple[Optional[str], Optional[str]]:
    """``(section_name, text)`` of the first of impression > findings > last_paragraph, or ``(None, None)``."""
    sections = split_sections(text)
    for name in PRIORITY:
        if sections.get(name):
            return name, sections[name]
    return None, None


def report_path(reports_root: Path, subject_id: int, study_id: int) -> Path:
    """``files/pXX/pSUBJECT/sSTUDY.txt`` below ``reports_root`` (the folder holding ``files/``)."""
    sid = str(int(subject_id))
    return Path(reports_root) / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{int(study_id)}.txt"


# MIMIC-CXR's de-identification replaces names, dates, times, ages and places with three underscores ("___"); the
# markers are the most memorized prompt tokens of models fine-tuned on its reports ("Devil is in the Prompts", arXiv
# 2502.07516), and they carry no finding. A run of three or more underscores is one marker.
DEID_MARKER_RE = re.compile(r"_{3,}")
DEID_SETTINGS = ("remove", "keep")


def scrub_deid_markers(text: str) -> tuple[str, int]:
    """``(text without MIMIC-CXR's ___ markers, how many were removed)``: each marker goes, the spaces left behind
    collapse to one, a space left before punctuation goes (``"Dr. ___, by"`` → ``"Dr., by"``), and so does punctuation
    left with nothing before it at the start. Text without markers is returned unchanged."""
    count = len(DEID_MARKER_RE.findall(text))
    if not count:
        return text, 0
    out = DEID_MARKER_RE.sub(" ", text)
    out = re.sub(r"[ \t]+([,.;:!?)])", r"\1", out)   # " ," left behind -> ","
    out = re.sub(r"\(\s*\)", " ", out)                 # "( )" left empty
    out = re.sub(r"([,;:])(\s*[,;:.])+", r"\1", out)   # ", ," or ", ." runs -> the first mark
    out = " ".join(out.split())
    out = re.sub(r"^[\s,;:.]+", "", out)
    return out, count
