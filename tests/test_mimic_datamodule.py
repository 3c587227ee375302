"""The MIMIC-CXR datamodule on files written in the real MIMIC-CXR-JPG layout."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from datamodules import mimic_cxr
from datamodules.mimic_cxr import MIMICCXRDataModule, MIMICDataError
from datamodules.sampling import ResumableSampler


def make_dm(root, tmp_path, **kw) -> MIMICCXRDataModule:
    kw.setdefault("findings", ["No Finding", "Pleural Effusion"])
    kw.setdefault("resolution", 64)
    kw.setdefault("batch_size", 4)
    return MIMICCXRDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def copy_root(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "mimic"
    shutil.copytree(root, dst)
    return dst


def test_reads_phantom_files_frontal_only_with_official_split(phantom_root, tmp_path):
    dm = make_dm(phantom_root, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    meta = pd.read_csv(phantom_root / mimic_cxr.METADATA_CSV)
    split = pd.read_csv(phantom_root / mimic_cxr.SPLIT_CSV).set_index("dicom_id")["split"]
    frontal = set(meta.loc[meta.ViewPosition.isin(["PA", "AP"]), "dicom_id"])
    assert set(dm.train_records.dicom_id) <= frontal and set(dm.val_records.dicom_id) <= frontal
    assert (meta.ViewPosition == "LATERAL").any(), "fixture must contain lateral views to filter"
    assert all(split[d] == "train" for d in dm.train_records.dicom_id)
    assert all(split[d] == "validate" for d in dm.val_records.dicom_id)
    assert set(dm.train_records.finding) == {"No Finding", "Pleural Effusion"}
    batch = next(iter(dm.train_dataloader()))
    x = batch["pixel_values"]
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grayscale replicated
    expected = {"No Finding": "a photo of a lung xray", "Pleural Effusion": "a photo of a lung xray with a visible pleural effusion"}
    by_id = dm.train_records.set_index("dicom_id").finding
    assert batch["prompt"] == [expected[by_id[d]] for d in batch["dicom_id"]]
    assert batch["labels"].shape == (4, 14)


def test_no_horizontal_flip_by_default(phantom_root, tmp_path):
    dm = make_dm(phantom_root, tmp_path, shuffle=False)
    dm.setup("fit")
    ds = dm.train_dataloader().dataset
    from PIL import Image
    import numpy as np

    first = ds[0]
    cached = np.array(Image.open(dm.image_cache_dir / f"{first['dicom_id']}.png"), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(first["pixel_values"][0], torch.from_numpy(cached))
    flipped = make_dm(phantom_root, tmp_path, shuffle=False, hflip_probability=1.0)
    flipped.setup("fit")
    assert torch.equal(flipped.train_dataloader().dataset[0]["pixel_values"], first["pixel_values"].flip(-1))


def test_images_are_resized_once_and_cached(phantom_root, tmp_path, monkeypatch):
    dm = make_dm(phantom_root, tmp_path)
    dm.prepare_data()
    assert len(list(dm.image_cache_dir.glob("*.png"))) == len(dm.build_records()[0]) + len(dm.build_records()[1])

    def fail(*a, **k):
        raise AssertionError("a full-size image was decoded again")

    monkeypatch.setattr(mimic_cxr, "load_grayscale", fail)
    again = make_dm(phantom_root, tmp_path)
    again.prepare_data()
    again.setup("fit")
    next(iter(again.train_dataloader()))


def test_uncertain_labels_are_configurable(phantom_root, tmp_path):
    labels = pd.read_csv(phantom_root / mimic_cxr.CHEXPERT_CSV)
    uncertain = set(labels.loc[labels["Pleural Effusion"] == -1.0, "study_id"])
    assert uncertain, "fixture must contain uncertain effusion labels"
    def studies(**kw):
        dm = make_dm(phantom_root, tmp_path, findings=["Pleural Effusion"], **kw)
        train, val = dm.build_records()
        return set(pd.concat([train, val]).study_id)
    assert not studies(uncertain="exclude") & uncertain
    assert uncertain <= studies(uncertain="positive")
    assert not studies(uncertain="negative") & uncertain


def test_explicit_dicom_ids_and_per_finding_sampling(phantom_root, tmp_path):
    dm = make_dm(phantom_root, tmp_path)
    train, _ = dm.build_records()
    picked = list(train.dicom_id[:3])
    chosen, val = make_dm(phantom_root, tmp_path, dicom_ids=picked).build_records()
    assert sorted(chosen.dicom_id) == sorted(picked) and not set(val.dicom_id) & set(picked)
    sampled, _ = make_dm(phantom_root, tmp_path, train_images_per_finding=2).build_records()
    assert sampled.finding.value_counts().to_dict() == {"No Finding": 2, "Pleural Effusion": 2}
    with pytest.raises(MIMICDataError, match="not in"):
        make_dm(phantom_root, tmp_path, dicom_ids=["00000000-00000000-00000000-00000000-00000000"]).build_records()
    meta = pd.read_csv(phantom_root / mimic_cxr.METADATA_CSV)
    lateral = meta.loc[meta.ViewPosition == "LATERAL", "dicom_id"].iloc[0]
    with pytest.raises(MIMICDataError, match="not frontal"):
        make_dm(phantom_root, tmp_path, dicom_ids=[lateral]).build_records()


def test_impression_prompts_from_reports(phantom_root, tmp_path):
    dm = make_dm(phantom_root, tmp_path, prompt_source="impression", findings=["Pleural Effusion"])
    train, _ = dm.build_records()
    assert all("effusion" in p.lower() for p in train.prompt), list(train.prompt)


def test_resumable_sampler_shards_and_resumes():
    full = [ResumableSampler(10, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in full:
        s.set_epoch(2)
    a, b = list(full[0]), list(full[1])
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    resumed = ResumableSampler(10, shuffle=True, seed=3, rank=0, world_size=2)
    resumed.resume(epoch=2, skip_samples=2)
    assert list(resumed) == a[2:]
    assert list(resumed) == a  # the skip is one-shot


# ---------------------------------------------------------------------- bad input
def test_missing_root(tmp_path):
    with pytest.raises(MIMICDataError, match="root not found"):
        make_dm(tmp_path / "nope", tmp_path).build_records()


def test_missing_csv_names_the_file(phantom_root, tmp_path):
    root = copy_root(phantom_root, tmp_path)
    (root / mimic_cxr.SPLIT_CSV).unlink()
    with pytest.raises(MIMICDataError, match="mimic-cxr-2.0.0-split.csv.gz: file not found"):
        make_dm(root, tmp_path).build_records()


def test_csv_missing_a_column_names_it(phantom_root, tmp_path):
    root = copy_root(phantom_root, tmp_path)
    df = pd.read_csv(root / mimic_cxr.METADATA_CSV).drop(columns=["ViewPosition"])
    df.to_csv(root / mimic_cxr.METADATA_CSV, index=False)
    with pytest.raises(MIMICDataError, match=r"missing column\(s\) \['ViewPosition'\]"):
        make_dm(root, tmp_path).build_records()


def test_csv_bad_label_value_names_column_and_value(phantom_root, tmp_path):
    root = copy_root(phantom_root, tmp_path)
    df = pd.read_csv(root / mimic_cxr.CHEXPERT_CSV)
    df["Edema"] = df["Edema"].astype(object)
    df.loc[0, "Edema"] = "yes"
    df.to_csv(root / mimic_cxr.CHEXPERT_CSV, index=False)
    with pytest.raises(MIMICDataError, match="'Edema' has value 'yes'"):
        make_dm(root, tmp_path).build_records()


def test_unreadable_image_fails_or_skips_with_warning(phantom_root, tmp_path):
    root = copy_root(phantom_root, tmp_path)
    dm = make_dm(root, tmp_path)
    train, _ = dm.build_records()
    row = train.iloc[0]
    path = mimic_cxr.image_path(root, row.subject_id, row.study_id, row.dicom_id)
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(MIMICDataError, match=str(path)):
        make_dm(root, tmp_path).prepare_data()
    skipping = make_dm(root, tmp_path, on_bad_image="skip")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        skipping.prepare_data()
    skipping.setup("fit")
    assert row.dicom_id not in set(skipping.train_records.dicom_id)
    assert len(skipping.train_records) == len(train) - 1


def test_missing_image_file_names_it(phantom_root, tmp_path):
    root = copy_root(phantom_root, tmp_path)
    train, _ = make_dm(root, tmp_path).build_records()
    row = train.iloc[1]
    path = mimic_cxr.image_path(root, row.subject_id, row.study_id, row.dicom_id)
    path.unlink()
    with pytest.raises(MIMICDataError, match="image file not found"):
        make_dm(root, tmp_path).prepare_data()


def test_unknown_finding_is_rejected(phantom_root, tmp_path):
    with pytest.raises(ValueError, match="unknown CheXpert class"):
        make_dm(phantom_root, tmp_path, findings=["Pleural effusion"])
