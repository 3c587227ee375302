"""Tests for synthetic.phantoms (synthetic MIMIC-CXR-JPG v2.0.0 phantoms)."""

from __future__ import annotations

import gzip
import json
import pathlib
import re
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synthetic import phantoms
from synthetic.phantoms import (
    preview_grid,
    render_lateral,
    render_phantom,
    render_phantom_with_geometry,
    write_phantom_mimic,
)

METADATA_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
]
CHEXPERT_COLUMNS = [
    "subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
    "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
    "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
]
SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
FINDINGS = ["No Finding", "Pleural Effusion", "Cardiomegaly"]
ARGS = dict(n_per_finding=8, size=96, seed=3)

SUBJECT_RE = re.compile(r"^1\d{7}$")
STUDY_RE = re.compile(r"^5\d{7}$")
DICOM_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    r = tmp_path_factory.mktemp("phantoms") / "mimic"
    out = write_phantom_mimic(r, **ARGS)
    assert out == r
    return r


@pytest.fixture(scope="module")
def tables(root):
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    chex = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    info = json.loads((root / "PHANTOMS.json").read_text())
    return meta, chex, split, info


def _report_path(root, subject_id, study_id) -> pathlib.Path:
    s = str(subject_id)
    return root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{study_id}.txt"


# ---------------------------------------------------------------- layout


def test_csv_headers_exact(tables):
    meta, chex, split, _ = tables
    assert list(meta.columns) == METADATA_COLUMNS
    assert list(chex.columns) == CHEXPERT_COLUMNS
    assert list(split.columns) == SPLIT_COLUMNS


def test_id_formats_and_consistency(tables):
    meta, chex, split, _ = tables
    for frame in (meta, chex, split):
        assert all(SUBJECT_RE.match(str(v)) for v in frame["subject_id"])
        assert all(STUDY_RE.match(str(v)) for v in frame["study_id"])
    assert all(DICOM_RE.match(v) for v in meta["dicom_id"])
    assert meta["dicom_id"].is_unique
    assert set(meta["dicom_id"]) == set(split["dicom_id"])
    assert set(meta["study_id"]) == set(chex["study_id"])
    assert chex["study_id"].is_unique  # one row per study
    # a study belongs to exactly one subject
    assert (meta.groupby("study_id")["subject_id"].nunique() == 1).all()


def test_metadata_values(tables):
    meta, chex, _, _ = tables
    assert set(meta["ViewPosition"]) <= {"PA", "AP", "LATERAL"}
    view_code = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
    assert (meta["ViewCodeSequence_CodeMeaning"] == meta["ViewPosition"].map(view_code)).all()
    assert set(meta["PatientOrientationCodeSequence_CodeMeaning"]) <= {"Erect", "Recumbent"}
    assert (meta["PerformedProcedureStepDescription"] == meta["ProcedureCodeSequence_CodeMeaning"]).all()
    assert (meta["ViewPosition"] == "LATERAL").any()
    frontal = meta[meta["ViewPosition"] != "LATERAL"]
    # one frontal image per study; n_per_finding frontal studies per finding
    assert frontal["study_id"].is_unique and len(frontal) == len(chex) == 3 * ARGS["n_per_finding"]
    assert (frontal["ViewPosition"] == "PA").mean() > 0.5
    assert meta["StudyDate"].between(21000101, 22991231).all()
    assert meta["StudyTime"].dtype.kind == "f" and meta["StudyTime"].between(0, 235960).all()
    assert (meta["Rows"] == ARGS["size"]).all() and (meta["Columns"] == ARGS["size"]).all()


def test_images_exist_with_metadata_size(root, tables):
    meta, _, _, _ = tables
    for row in meta.itertuples(index=False):
        s = str(row.subject_id)
        p = root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{row.study_id}" / f"{row.dicom_id}.jpg"
        assert p.is_file(), p
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "L"
            assert im.size == (row.Columns, row.Rows)
        assert _report_path(root, row.subject_id, row.study_id).is_file()


def test_chexpert_values(root, tables):
    _, chex, _, info = tables
    raw = gzip.decompress((root / "mimic-cxr-2.0.0-chexpert.csv.gz").read_bytes()).decode()
    for line in raw.splitlines()[1:]:
        assert set(line.split(",")[2:]) <= {"", "1.0", "0.0", "-1.0"}, line
    labels = chex[CHEXPERT_COLUMNS[2:]]
    vals = labels.to_numpy().ravel()
    assert set(np.unique(vals[~np.isnan(vals)])) <= {1.0, 0.0, -1.0}
    assert set(chex["No Finding"].dropna()) <= {1.0}
    findings = chex[FINDINGS]
    # exactly one finding per study, positive or uncertain
    assert (findings.isin([1.0, -1.0]).sum(axis=1) == 1).all()
    counts = findings.isin([1.0, -1.0]).sum()
    assert (counts == ARGS["n_per_finding"]).all()
    uncertain = chex.loc[(labels == -1.0).any(axis=1), "study_id"].tolist()
    assert uncertain, "some studies must carry an uncertain (-1.0) label"
    assert sorted(uncertain) == sorted(u["study_id"] for u in info["uncertain_studies"])
    assert (chex.set_index("study_id").loc[uncertain, "Pleural Effusion"] == -1.0).all()
    assert (labels == 0.0).any().any()


def test_split_patient_disjoint_and_stratified(tables):
    meta, chex, split, _ = tables
    assert set(split["split"]) == {"train", "validate", "test"}
    assert (split.groupby("subject_id")["split"].nunique() == 1).all()
    assert (split.groupby("study_id")["split"].nunique() == 1).all()
    study_split = split.drop_duplicates("study_id").set_index("study_id")["split"]
    for f in FINDINGS:
        studies = chex.loc[chex[f].isin([1.0, -1.0]), "study_id"]
        assert set(study_split.loc[studies]) == {"train", "validate", "test"}, f
    # some subject has more than one study
    assert (chex.groupby("subject_id")["study_id"].nunique() > 1).any()


# ---------------------------------------------------------------- reports


def _impression(text: str) -> str | None:
    lines = text.splitlines()
    if " IMPRESSION: " not in lines:
        return None
    i = lines.index(" IMPRESSION: ")
    return " ".join(l.strip() for l in lines[i + 1 :]).strip().lower()


def test_reports_format_and_content(root, tables):
    _, chex, _, info = tables
    manifest = {m["study_id"]: m for m in info["studies"]}
    no_imp = set(info["report_variants"]["no_impression"])
    addendum = set(info["report_variants"]["addendum"])
    assert len(no_imp) == 1 and len(addendum) == 1
    seen_no_imp, seen_add = set(), set()
    for row in chex.itertuples(index=False):
        text = _report_path(root, row.subject_id, row.study_id).read_text()
        lines = text.splitlines()
        assert all(l.startswith(" ") for l in lines), text
        assert all(len(l) <= 79 for l in lines)
        assert (" " * 33 + "FINAL REPORT") in lines
        for head in ("EXAMINATION:", "INDICATION:", "TECHNIQUE:", "COMPARISON:", "FINDINGS:"):
            assert any(l.startswith(" " + head) for l in lines), head
        if lines[0].startswith(" ADDENDUM:"):
            seen_add.add(row.study_id)
            title = lines.index(" " * 33 + "FINAL REPORT")
            assert lines[title - 1] == " " + "_" * 78
        imp = _impression(text)
        if imp is None:
            seen_no_imp.add(row.study_id)
            continue
        m = manifest[row.study_id]
        if m["finding"] == "No Finding":
            assert "no acute" in imp
        elif m["finding"] == "Pleural Effusion":
            assert "pleural effusion" in imp
            sides = set(m["sides"])
            if sides == {"right", "left"}:
                assert "bilateral" in imp
            else:
                (side,) = sides
                other = "left" if side == "right" else "right"
                assert side in imp and other not in imp
            assert ("possible" in imp) == (m["uncertain"])
        elif m["finding"] == "Cardiomegaly":
            assert "cardiomegaly" in imp and m["severity"] in imp
    assert seen_no_imp == no_imp
    assert seen_add == addendum


# ---------------------------------------------------------------- rendering


def test_render_dtype_shape_and_speed():
    img = render_phantom("No Finding", 256, 0)
    assert img.dtype == np.uint8 and img.shape == (256, 256)
    t = time.perf_counter()
    for k in range(3):
        render_phantom("Pleural Effusion", 256, k)
    assert (time.perf_counter() - t) / 3 < 0.2
    # per-image variation within a class
    assert not np.array_equal(render_phantom("No Finding", 128, 1), render_phantom("No Finding", 128, 2))
    # generator input works and equals the int seed path
    a = render_phantom("Cardiomegaly", 64, np.random.default_rng(5))
    assert np.array_equal(a, render_phantom("Cardiomegaly", 64, 5))


def test_intensity_ordering():
    img, g = render_phantom_with_geometry("No Finding", 256, 0)
    S = 256
    background = img[:5, :5].mean()  # above the shoulders
    cp_y = int(g["costophrenic_angle"]["right"][1])
    lung = img[int(0.35 * S) : int(0.5 * S), int(g["thorax_left_px"] + 0.15 * g["thorax_width"]) :
               int(g["thorax_left_px"] + 0.3 * g["thorax_width"])].mean()
    abdomen = img[cp_y + int(0.08 * S) : cp_y + int(0.15 * S), int(0.4 * S) : int(0.6 * S)].mean()
    assert background < 30 < lung < abdomen


@pytest.mark.parametrize("seed", range(6))
def test_cardiothoracic_ratio(seed):
    _, g_norm = render_phantom_with_geometry("No Finding", 128, seed)
    _, g_eff = render_phantom_with_geometry("Pleural Effusion", 128, seed)
    _, g_card = render_phantom_with_geometry("Cardiomegaly", 128, seed)
    assert 0.38 <= g_norm["cardiothoracic_ratio"] < 0.5
    assert g_eff["cardiothoracic_ratio"] < 0.5
    assert 0.53 <= g_card["cardiothoracic_ratio"] <= 0.68
    assert g_card["heart_width"] > g_norm["heart_width"]
    for g in (g_norm, g_card):
        assert g["cardiothoracic_ratio"] == pytest.approx(g["heart_width"] / g["thorax_width"])


@pytest.mark.parametrize("seed", range(4))
def test_heart_on_image_right(seed):
    S = 128
    img, g = render_phantom_with_geometry("No Finding", S, seed)
    mid = g["midline_x"]
    assert g["heart_center"][0] > mid + 0.03 * S
    # more of the heart right of the midline (image) than left of it
    assert g["heart_right_px"] - mid > 1.5 * (mid - g["heart_left_px"])
    # intensity: at heart level, the band right of the midline is brighter
    y0 = int(g["heart_center"][1])
    rows = slice(y0 - int(0.04 * S), y0 + int(0.04 * S))
    w = int(0.18 * S)
    left = img[rows, int(mid) - int(0.06 * S) - w : int(mid) - int(0.06 * S)].mean()
    right = img[rows, int(mid) + int(0.06 * S) : int(mid) + int(0.06 * S) + w].mean()
    assert right > left + 15


@pytest.mark.parametrize("seed", range(8))
def test_effusion_at_lateral_base_of_its_side(seed):
    S = 128
    norm, _ = render_phantom_with_geometry("No Finding", S, seed)
    eff, g = render_phantom_with_geometry("Pleural Effusion", S, seed)
    norm, eff = norm.astype(float), eff.astype(float)
    assert g["sides"] and set(g["sides"]) <= {"right", "left"}
    half = g["thorax_width"] / 2

    def base_box(side):
        x, y = g["costophrenic_angle"][side]
        inward = 1 if side == "right" else -1  # patient right = image left
        xs = sorted([int(x + inward * 0.04 * half), int(x + inward * 0.3 * half)])
        return slice(int(y - 0.12 * S), int(y - 0.02 * S)), slice(*xs)

    # aerated lung pixels of the normal image (darker than the lung median + margin)
    lung_thr = np.percentile(norm[int(0.3 * S) : int(0.6 * S)], 25) + 25
    for side in ("right", "left"):
        rows, cols = base_box(side)
        diff = eff[rows, cols] - norm[rows, cols]
        if side in g["sides"]:
            lung = norm[rows, cols] < lung_thr
            assert lung.sum() >= 10  # the box does sit on the lower lateral lung
            assert diff[lung].mean() > 10, (side, diff[lung].mean())
        else:
            assert abs(diff.mean()) < 4, (side, diff.mean())
    # upper zones untouched
    top = int(g["lung_apex_y"] + 0.1 * S)
    upper = slice(top, top + int(0.1 * S))
    assert np.abs(eff[upper] - norm[upper]).mean() < 3


def test_pneumothorax_and_lateral_render():
    img, g = render_phantom_with_geometry("Pneumothorax", 128, 0)
    assert img.shape == (128, 128) and g["sides"]
    lat = render_lateral("Pleural Effusion", 128, 0)
    assert lat.dtype == np.uint8 and lat.shape == (128, 128)
    assert not np.array_equal(lat, render_phantom("Pleural Effusion", 128, 0))


def test_unknown_finding_raises(tmp_path):
    with pytest.raises(ValueError, match=r"Edema.*Pleural Effusion"):
        render_phantom("Edema")
    with pytest.raises(ValueError, match="Foo"):
        write_phantom_mimic(tmp_path / "x", 2, findings=("No Finding", "Foo"))
    with pytest.raises(ValueError, match="Foo"):
        write_phantom_mimic(tmp_path / "y", {"Foo": 2})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------- writer


def test_deterministic_bytes(root, tmp_path, tables):
    other = write_phantom_mimic(tmp_path / "again", **ARGS)
    for name in ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-chexpert.csv.gz",
                 "mimic-cxr-2.0.0-split.csv.gz", "PHANTOMS.json"):
        assert (root / name).read_bytes() == (other / name).read_bytes(), name
    a = sorted(p.relative_to(root) for p in (root / "files").rglob("*") if p.is_file())
    b = sorted(p.relative_to(other) for p in (other / "files").rglob("*") if p.is_file())
    assert a == b
    for rel in a[:3] + a[-3:]:
        assert (root / rel).read_bytes() == (other / rel).read_bytes(), rel
    # a different seed gives different data
    diff = write_phantom_mimic(tmp_path / "seed4", **{**ARGS, "seed": 4, "n_per_finding": 2})
    assert (diff / "mimic-cxr-2.0.0-split.csv.gz").read_bytes() != (root / "mimic-cxr-2.0.0-split.csv.gz").read_bytes()


def test_idempotent_and_conflicting_arguments(root):
    marker = root / "PHANTOMS.json"
    before = marker.stat().st_mtime_ns
    some_img = next((root / "files").rglob("*.jpg"))
    img_before = some_img.stat().st_mtime_ns
    assert write_phantom_mimic(root, **ARGS) == root
    assert marker.stat().st_mtime_ns == before and some_img.stat().st_mtime_ns == img_before
    with pytest.raises(ValueError, match="different arguments"):
        write_phantom_mimic(root, **{**ARGS, "seed": 99})
    with pytest.raises(ValueError, match="different arguments"):
        write_phantom_mimic(root, **{**ARGS, "n_per_finding": {"No Finding": 2}})
    assert marker.stat().st_mtime_ns == before


def test_overwrite_and_foreign_directory(tmp_path):
    r = tmp_path / "set"
    write_phantom_mimic(r, n_per_finding=1, size=64, seed=0)
    write_phantom_mimic(r, n_per_finding=2, size=64, seed=1, overwrite=True)
    info = json.loads((r / "PHANTOMS.json").read_text())
    assert info["arguments"]["seed"] == 1 and info["n_studies"] == 6
    assert len(pd.read_csv(r / "mimic-cxr-2.0.0-chexpert.csv.gz")) == 6
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not an empty folder nor a phantom dataset"):
        write_phantom_mimic(foreign, n_per_finding=1, size=64)
    # --overwrite replaces a phantom dataset only: another folder's files, or a file, are never deleted
    a_file = tmp_path / "thesis.docx"
    a_file.write_text("years of work")
    for victim in (foreign, a_file):
        with pytest.raises(ValueError, match="also with --overwrite"):
            write_phantom_mimic(victim, n_per_finding=1, size=64, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "hi" and a_file.read_text() == "years of work"
    # an empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    write_phantom_mimic(empty, n_per_finding=1, size=64)
    assert (empty / "PHANTOMS.json").is_file()
    # nothing temporary left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantoms, "_save_jpeg", boom)
    with pytest.raises(RuntimeError):
        write_phantom_mimic(tmp_path / "broken", n_per_finding=1, size=64)
    assert list(tmp_path.iterdir()) == []


def test_dict_counts_and_lateral_count(tmp_path):
    r = write_phantom_mimic(tmp_path / "d", {"Cardiomegaly": 3, "No Finding": 1}, size=64, n_lateral=0)
    meta = pd.read_csv(r / "mimic-cxr-2.0.0-metadata.csv.gz")
    chex = pd.read_csv(r / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert (meta["ViewPosition"] != "LATERAL").all() and len(meta) == 4
    assert chex["Cardiomegaly"].isin([1.0]).sum() == 3 and chex["No Finding"].eq(1.0).sum() == 1
    assert chex["Pleural Effusion"].isin([1.0, -1.0]).sum() == 0


def test_cli_and_preview(tmp_path, capsys):
    out = tmp_path / "cli"
    png = tmp_path / "grid.png"
    assert phantoms.main([str(out), "--n-per-finding", "1", "--size", "64", "--seed", "2",
                          "--preview", str(png)]) == 0
    msg = capsys.readouterr().out.strip()
    assert "\n" not in msg and "3 studies" in msg
    assert (out / "PHANTOMS.json").is_file()
    with Image.open(png) as im:
        assert im.size == (64, 3 * 64)
    p2 = preview_grid([render_phantom("No Finding", 64, k) for k in range(2)], tmp_path / "row.png")
    with Image.open(p2) as im:
        assert im.size == (128, 64)


def test_phantom_datamodule_writes_on_first_use(tmp_path):
    pytest.importorskip("lightning")
    import pickle

    from synthetic.phantoms import PhantomCXRDataModule

    root = tmp_path / "phantoms"
    dm = PhantomCXRDataModule(root=str(root), n_per_finding=3, phantom_size=64,
                              findings=["No Finding", "Cardiomegaly"], resolution=32,
                              cache_dir=str(tmp_path / "cache"))
    assert not root.exists()
    train, val = dm.build_records()
    info = json.loads((root / "PHANTOMS.json").read_text())
    assert info["arguments"]["findings"] == FINDINGS and info["arguments"]["size"] == 64
    assert len(train) > 0 and set(train["finding"]) <= {"No Finding", "Cardiomegaly"}
    dm.build_records()  # idempotent second call
    assert pickle.loads(pickle.dumps(PhantomCXRDataModule)) is PhantomCXRDataModule
    with pytest.raises(ValueError, match="no phantoms"):
        PhantomCXRDataModule(root=str(root), findings=["Edema"], prompt_templates={"Edema": "x"})


def test_a_jpeg_that_changed_after_caching_with_the_same_size_and_mtime_is_read_again(tmp_path):
    """A phantom JPEG overwritten with another image of as many bytes, its modification time restored (what
    ``rsync -a`` or ``cp -p`` of a re-exported file leaves): the image cache's stamp (size, mtime and a digest of the
    first and last KiB) notices, so the resized copy and the latent-cache key follow the new image."""
    import io
    import os

    from datamodules import mimic_cxr

    root = write_phantom_mimic(tmp_path / "mimic", n_per_finding={"No Finding": 3, "Pleural Effusion": 3}, size=64)
    make = lambda: mimic_cxr.MIMICCXRDataModule(root=str(root), findings=["No Finding", "Pleural Effusion"],
                                                resolution=32, max_val_images=0, cache_dir=str(tmp_path / "cache"))
    dm = make()
    dm.setup()
    first = dm.train_records.iloc[0]
    jpeg = mimic_cxr.image_path(root, first.subject_id, first.study_id, first.dicom_id)
    latents_key = dm.training_images().key_parts["sources_sha1"]
    stat = jpeg.stat()
    other = io.BytesIO()
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(other, format="JPEG")
    assert other.tell() < stat.st_size  # a flat image: fewer bytes, padded after its end marker (decoders ignore that)
    jpeg.write_bytes(other.getvalue().ljust(stat.st_size, b"\0"))
    os.utime(jpeg, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (jpeg.stat().st_size, jpeg.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    fresh = make()
    fresh.setup()
    with Image.open(fresh.image_cache_dir / f"{first.dicom_id}.png") as png:
        assert abs(float(np.asarray(png).mean()) - 200) <= 2  # the new image, not the cached phantom
    assert fresh.training_images().key_parts["sources_sha1"] != latents_key


def test_the_documented_phantoms_command_after_the_quickstart_keeps_its_data_in_one_line(tmp_path, monkeypatch, capsys):
    """The quickstart (`train.py --config demo.yaml`) writes data/phantoms on first use; the studies' pages then say
    `python -m synthetic.phantoms data/phantoms`. Both write the same set, so the command keeps it (one line, exit 0);
    a request the set covers is kept too, one it does not is refused in one line, never a traceback."""
    import yaml

    from core.errors import run_main
    from synthetic.phantoms import PhantomCXRDataModule

    from test_docs_commands import COMMANDS

    repo = pathlib.Path(__file__).resolve().parents[1]
    shown = {where.split(":")[0] for where, argv in COMMANDS if argv == ["python", "-m", "synthetic.phantoms", "data/phantoms"]}
    assert {"docs/vae-study.md", "docs/text-encoder-study.md"} <= shown  # and data.md's, with --preview, in its text
    assert "`python -m synthetic.phantoms data/phantoms --preview phantoms.png`" in (repo / "docs" / "data.md").read_text()
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load((repo / "configs" / "demo.yaml").read_text())["data"]["init_args"]
    PhantomCXRDataModule(**data, cache_dir=str(tmp_path / "cache"))._ensure_data()  # what the quickstart's run writes
    marker = tmp_path / data["root"] / "PHANTOMS.json"
    written = marker.stat().st_mtime_ns
    program = "python -m synthetic.phantoms"

    assert run_main(program, phantoms.main, ["data/phantoms"]) == 0
    said = capsys.readouterr().out.strip()
    assert said.startswith("kept data/phantoms: it already holds these phantoms (16 No Finding") and "\n" not in said
    assert run_main(program, phantoms.main, ["data/phantoms", "--n-per-finding", "8", "--preview", "phantoms.png"]) == 0
    said = capsys.readouterr().out.strip()
    assert said.startswith("kept data/phantoms: it holds phantoms of the same kind with at least as many") and "\n" not in said
    assert (tmp_path / "phantoms.png").is_file() and marker.stat().st_mtime_ns == written
    with pytest.raises(SystemExit) as exit_:
        run_main(program, phantoms.main, ["data/phantoms", "--n-per-finding", "20"])
    said = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and "\n" not in said, said
    assert said.startswith(f"{program}: error: data/phantoms already holds a phantom dataset written with different "
                           "arguments (16 No Finding, 16 Pleural Effusion, 16 Cardiomegaly at 256 px, seed 0"), said
    assert "asked for 20 No Finding" in said and marker.stat().st_mtime_ns == written


def test_a_seed_numpy_cannot_take_is_one_line_at_parse(tmp_path, capsys):
    """``python -m synthetic.phantoms DIR --seed -1`` is refused by the parser in one line (it was a numpy traceback)."""
    from synthetic import phantoms

    for bad in ("-1", str(2**32)):
        with pytest.raises(SystemExit) as stop:
            phantoms.main([str(tmp_path / "p"), "--seed", bad])
        assert stop.value.code == 2 and "--seed" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
