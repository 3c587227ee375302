"""MIMIC-CXR's de-identification markers (``___``) out of report-derived prompts: training and ``--prompts reports``."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from datamodules.mimic_cxr import MIMICCXRDataModule, MIMICDataError
from datamodules.reports import extract_impression, report_path, scrub_deid_markers

MARKED = "Findings discussed with Dr. ___ by telephone at ___ on ___, 10 minutes after discovery."


def test_markers_go_and_the_text_around_them_reads_cleanly():
    assert scrub_deid_markers(MARKED) == ("Findings discussed with Dr. by telephone at on, 10 minutes after discovery.", 3)
    assert scrub_deid_markers("Comparison was made with the prior study from ___, which shows no change.") == (
        "Comparison was made with the prior study from, which shows no change.", 1)
    assert scrub_deid_markers("___ year old woman. Chest radiograph (___) shows a small effusion.") == (
        "year old woman. Chest radiograph shows a small effusion.", 2)
    text = "No acute cardiopulmonary process.  Unchanged since 2150."  # no marker: returned as it is, spaces too
    assert scrub_deid_markers(text) == (text, 0)


@pytest.fixture(scope="module")
def marked_root(tmp_path_factory) -> Path:
    """Phantom MIMIC-CXR-JPG whose impressions carry markers where real ones do (a discussed finding, a prior date)."""
    from synthetic.phantoms import write_phantom_mimic

    root = write_phantom_mimic(tmp_path_factory.mktemp("deid") / "mimic-cxr-jpg",
                               n_per_finding={"No Finding": 4, "Pleural Effusion": 4}, size=64, seed=0)
    for path in sorted(root.glob("files/p*/p*/s*.txt")):
        text = path.read_text()
        if "IMPRESSION:" in text:
            path.write_text(text.rstrip("\n") + "\n " + MARKED + "\n")
    return root


def datamodule(root: Path, **kwargs) -> MIMICCXRDataModule:
    return MIMICCXRDataModule(str(root), findings=["No Finding", "Pleural Effusion"], prompt_source="impression",
                              resolution=32, uncertain="positive", cache_dir=str(root.parent / "cache"), **kwargs)


def impressions_as_written(root: Path, records) -> list[str]:
    return [extract_impression(report_path(root, r.subject_id, r.study_id).read_text())[1] for r in records.itertuples()]


def test_training_prompts_lose_the_markers_by_default_and_data_json_counts_them(marked_root):
    dm = datamodule(marked_root)
    dm.setup()
    written = impressions_as_written(marked_root, dm.train_records)
    assert sum("___" in w for w in written) > 0  # the fixture put markers where the datamodule reads
    assert not any("___" in p for p in dm.train_records["prompt"])
    assert not any(re.search(r"\s{2,}| [,.]", p) for p in dm.train_records["prompt"])
    record = dm.manifest()["prompts"]
    assert record["source"] == "impression" and record["deid_markers"] == "remove"
    assert record["deid_markers_removed"]["train"] == {"markers": sum(w.count("___") for w in written),
                                                       "prompts": sum("___" in w for w in written)}
    assert "___" not in str(dm.manifest())  # data.json holds counts, no report text

    kept = datamodule(marked_root, deid_markers="keep")
    kept.setup()
    assert list(kept.train_records["prompt"]) == written
    assert kept.manifest()["prompts"] == {"source": "impression", "deid_markers": "keep"}


def test_bad_setting_and_a_prompt_of_nothing_but_markers_are_one_line(marked_root, tmp_path):
    with pytest.raises(MIMICDataError, match=r"deid_markers: 'strip'; expected one of remove, keep"):
        datamodule(marked_root, deid_markers="strip")
    dm = datamodule(marked_root)
    dm.setup()
    row = dm.train_records.iloc[0]
    path = report_path(marked_root, row.subject_id, row.study_id)
    original = path.read_text()
    try:
        path.write_text(re.sub(r"IMPRESSION:.*", "IMPRESSION: \n \n ___ ___.\n", original, flags=re.S))
        with pytest.raises(MIMICDataError, match=re.escape(f"{path}: the prompt is nothing but de-identification markers")):
            datamodule(marked_root).build_records()
    finally:
        path.write_text(original)


def test_report_prompts_drop_the_markers_and_say_how_many(marked_root):
    from evaluation.report_prompts import split_impressions

    labels = str(marked_root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    scrubbed = split_impressions(str(marked_root), str(marked_root), labels, "all")
    kept = split_impressions(str(marked_root), str(marked_root), labels, "all", deid_markers="keep")
    assert len(scrubbed) == len(kept) > 0
    assert not scrubbed["text"].str.contains("___", regex=False).any()
    assert int(scrubbed["deid_removed"].sum()) == int(kept["text"].str.count("___").sum()) > 0
    assert list(scrubbed["text"]) == [scrub_deid_markers(t)[0] for t in kept["text"]]
