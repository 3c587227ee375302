"""VAE reconstruction study (issue 5): metrics on constructed images, Table 1, FID, reader kit, the CLI end to end."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
from evaluation.reader_kit import KEY_FILE, PAPER_SCALE, ScoreSheetError, make_reader_kit, summarize_scores
from evaluation.vae_study import TABLE1_COLUMNS, TABLE1_MAPPING, binary_labels, table1
from metrics.features import INCEPTION_WEIGHTS_FILE, InceptionFeatures
from metrics.image_quality import corner_mask, image_metrics, pair_metrics, pooled_psnr
from metrics.scores import accuracy_f1, auroc, fid_minibatches as fid_report, summarize


# ------------------------------------------------------------------------------------------ image metrics
def test_identical_images_give_rmse_0_and_ssim_1():
    img = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    m = pair_metrics(img, img.copy())
    for scale in ("8bit", "xrv"):
        assert m[f"rmse_{scale}"] == 0
        assert m[f"ssim_{scale}"] == pytest.approx(1.0)
        assert math.isinf(m[f"psnr_{scale}"])


def test_known_noise_gives_known_psnr_on_both_scales():
    rng = np.random.default_rng(1)
    base = rng.integers(20, 236, (64, 64)).astype(np.uint8)
    d = 5
    noise = np.where(rng.random((64, 64)) < 0.5, d, -d)  # |error| = d everywhere: MSE = d², RMSE = d
    noisy = (base.astype(int) + noise).astype(np.uint8)
    m = pair_metrics(base, noisy)
    assert m["rmse_8bit"] == pytest.approx(d)
    assert m["psnr_8bit"] == pytest.approx(20 * math.log10(255 / d))
    assert m["rmse_xrv"] == pytest.approx(d * 2048 / 255)  # RMSE depends on the scale ...
    assert m["psnr_xrv"] == pytest.approx(m["psnr_8bit"])  # ... PSNR does not (data_range follows it)
    # SSIM is scale-invariant but not offset-invariant: the xrv value is skimage's on the shifted arrays
    from skimage.metrics import structural_similarity

    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    xrv = lambda a: (2 * a.astype(np.float64) / 255 - 1) * 1024
    assert m["ssim_xrv"] == pytest.approx(structural_similarity(xrv(base), xrv(noisy), data_range=2048, **kw))
    scaled = structural_similarity(base * 8.0, noisy * 8.0, data_range=255 * 8.0, **kw)
    assert m["ssim_8bit"] == pytest.approx(scaled) and m["ssim_8bit"] < 1
    # docs/formats.md §5: RMSE 41 on the xrv scale is PSNR 33.97 dB (a single image)
    assert 20 * math.log10(2048 / 41) == pytest.approx(33.97, abs=0.01)


def test_pooled_psnr_is_below_mean_per_image_psnr():
    mse = np.array([4.0, 100.0])
    per_image = np.mean([10 * math.log10(255**2 / v) for v in mse])
    assert pooled_psnr(mse, "8bit") == pytest.approx(10 * math.log10(255**2 / 52.0))
    assert pooled_psnr(mse, "8bit") < per_image


def test_corner_mask_removes_burnt_in_corner_errors():
    img = np.full((64, 64), 100, np.uint8)
    recon = img.copy()
    recon[:6, -6:] = 255  # "scrambled annotation" in the top right corner
    assert image_metrics(img, recon)["rmse"] > 0
    mask = corner_mask((64, 64), 0.1)
    assert not mask[0, -1] and mask[32, 32]
    masked = image_metrics(img, recon, mask=mask)
    assert masked["rmse"] == 0 and masked["ssim"] == pytest.approx(1.0)
    assert corner_mask((64, 64), 0.0) is None
    with pytest.raises(ValueError, match="mask_corners"):
        corner_mask((64, 64), 0.6)


def test_summarize_mean_sd_median_range():
    s = summarize([1.0, 2.0, 3.0, float("inf")])
    assert (s["n"], s["mean"], s["sd"], s["median"], s["min"], s["max"]) == (3, 2.0, 1.0, 2.0, 1.0, 3.0)


# ------------------------------------------------------------------------------------------ classifier table
def test_labels_convention_and_table1():
    assert binary_labels(pd.Series([1.0, -1.0, 0.0, np.nan])).tolist() == [1, 1, 0, 0]
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert math.isnan(auroc(np.array([0, 0]), np.array([0.1, 0.2])))
    acc, f1 = accuracy_f1(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert (acc, f1) == (0.5, 0.5)

    labels = pd.DataFrame({k: [1.0, -1.0, 0.0, np.nan] for k in TABLE1_MAPPING})
    targets = ["Effusion", "Cardiomegaly"]
    p_orig = np.array([[0.9, 0.9], [0.8, 0.1], [0.2, 0.1], [0.1, 0.1]])
    p_recon = np.array([[0.9, 0.9], [0.3, 0.1], [0.2, 0.1], [0.1, 0.1]])
    table, notes = table1(labels, targets, p_orig, p_recon, threshold=0.5)
    assert list(table.columns) == TABLE1_COLUMNS
    assert set(table["label"]) == {"Pleural Effusion", "Cardiomegaly"}
    eff = table.set_index("label").loc["Pleural Effusion"]
    assert eff["prevalence_pct"] == 50 and eff["acc_original_pct"] == 100 and eff["acc_recon_pct"] == 75
    assert eff["acc_change_pct"] == pytest.approx(-25) and eff["threshold"] == 0.5
    assert eff["acc_always_negative_pct"] == 50
    assert any("Pleural Other -> Pleural_Thickening" in n for n in notes)
    assert len(TABLE1_MAPPING) == 12 and TABLE1_MAPPING["Pleural Effusion"] == "Effusion"


def test_classifier_outputs_catch_features2_in_one_pass():
    from metrics.classifiers import classifier_outputs, load_classifier, to_classifier_input

    clf = load_classifier("tiny-phantom")
    imgs = np.random.default_rng(0).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    probs, feats = classifier_outputs(clf, imgs, batch_size=2, device="cpu")
    x = to_classifier_input(torch.from_numpy(imgs).float().div(255).unsqueeze(1))
    with torch.no_grad():
        assert np.allclose(feats, clf.features2(x).numpy(), atol=1e-5)
        assert np.allclose(probs, clf(x).numpy(), atol=1e-6)
    assert not clf.classifier._forward_hooks


def test_frechet_distance_matches_torchmetrics():
    from torch import nn
    from torchmetrics.image.fid import FrechetInceptionDistance

    from metrics.scores import frechet_distance

    g = torch.Generator().manual_seed(0)
    for n, d in ((40, 8), (12, 16)):  # full rank and rank-deficient covariances
        a = torch.randn(n, d, generator=g, dtype=torch.float64)
        b = 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.3
        ref = FrechetInceptionDistance(feature=nn.Identity(), input_img_size=(d,))
        ref.update(a, real=True)
        ref.update(b, real=False)
        assert frechet_distance(a, b) == pytest.approx(float(ref.compute()), rel=1e-6, abs=1e-6)


def test_fid_report_minibatches_and_whole_set():
    rng = torch.Generator().manual_seed(0)
    real = torch.randn(70, 4, generator=rng, dtype=torch.float64)
    rep = fid_report(real, real.clone(), batch=32)
    assert rep["minibatch"]["n_batches"] == 2 and rep["minibatch"]["batch_size"] == 32  # the last 6 are dropped
    assert rep["whole_set"]["n"] == 70 and abs(rep["whole_set"]["fid"]) < 1e-6
    shifted = fid_report(real, real + 1.0, batch=32)
    assert shifted["whole_set"]["fid"] == pytest.approx(4.0, abs=1e-6)  # |mean shift|² = 4 × 1²
    small = fid_report(real[:8], real[:8] + 1, batch=32)  # fewer than one batch: one batch of all
    assert small["minibatch"]["batch_size"] == 8 and small["minibatch"]["n_batches"] == 1


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as err:
        InceptionFeatures()
    assert str(tmp_path / "hub" / "checkpoints") in str(err.value)


# ------------------------------------------------------------------------------------------ reader kit
def _fill(sheet: Path, scores: dict) -> None:
    lines = sheet.read_text().splitlines()
    out = []
    for line in lines:
        case = line.split(",")[0]
        out.append(f"{case},{scores[case]}," if case in scores else line)
    sheet.write_text("\n".join(out) + "\n")


def test_reader_kit_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, (32, 32), dtype=np.uint8), rng.integers(0, 256, (32, 32), dtype=np.uint8)) for _ in range(6)]
    kit = make_reader_kit(pairs, tmp_path / "kit", n=4, seed=0, ids=[f"img{i}" for i in range(6)])
    assert len(list((kit / "cases").glob("*.png"))) == 8
    assert "Very good reconstruction" in (kit / "index.html").read_text()
    sheet = kit / "scores.csv"
    assert PAPER_SCALE[1] in sheet.read_text()
    key = list(csv.DictReader(open(kit / KEY_FILE)))
    assert len(key) == 4 and {r["A"] for r in key} <= {"original", "reconstruction"}
    assert all(r["source_id"].startswith("img") for r in key)
    assert "img" not in sheet.read_text()  # blinded

    cases = [r["case"] for r in key]
    _fill(sheet, dict(zip(cases, [5, 4, 5, 3])))
    s = summarize_scores(sheet)
    assert (s["n"], s["mean"], s["median"], s["min"], s["max"]) == (4, 4.25, 4.5, 3, 5)
    assert s["sd"] == pytest.approx(np.std([5, 4, 5, 3], ddof=1))
    assert evaluate.main(["vae-scores", str(sheet)]) == 0
    assert "4.25" in capsys.readouterr().out

    _fill(sheet, dict(zip(cases, [5, 4, 7, 3])))
    with pytest.raises(ScoreSheetError, match="out of range"):
        summarize_scores(sheet)
    assert evaluate.main(["vae-scores", str(sheet)]) == 2
    assert "out of range" in capsys.readouterr().err

    sheet.write_text("\n".join(l for l in sheet.read_text().splitlines() if not l.startswith(cases[0])) + "\n")
    _fill(sheet, dict(zip(cases[1:], [4, 5, 3])))
    with pytest.raises(ScoreSheetError, match="missing rows"):
        summarize_scores(sheet)
    _fill(sheet, {cases[1]: "good"})
    with pytest.raises(ScoreSheetError, match="not a number"):
        summarize_scores(sheet)


def test_single_image_kit_uses_placeholder_scale(tmp_path):
    kit = make_reader_kit([np.zeros((16, 16), np.uint8)] * 3, tmp_path / "kit", n=2, seed=1)
    assert "PLACEHOLDER" in (kit / "scores.csv").read_text()
    assert len(list((kit / "cases").glob("*.png"))) == 2


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def xrv_cache(tmp_path_factory) -> Path:
    """A randomly initialised xrv DenseNet pickled under the exact file name torchxrayvision looks for."""
    import torchxrayvision as xrv

    cache = tmp_path_factory.mktemp("xrv")
    url = xrv.models.model_urls["densenet121-res224-all"]["weights_url"]
    torch.manual_seed(0)
    torch.save(xrv.models.DenseNet(num_classes=18), cache / Path(url).name)
    return cache


@pytest.mark.slow
def test_vae_study_end_to_end_on_phantoms(phantom_root, xrv_cache, tmp_path):
    out = tmp_path / "study"
    rc = evaluate.main([
        "vae", "--mimic_root", str(phantom_root), "--n", "6", "--seed", "0", "--resolution", "64",
        "--pretrained", "tiny-phantom", "--out", str(out), "--batch_size", "8", "--device", "cpu",
        "--classifier", "densenet121-res224-all", "--xrv_cache_dir", str(xrv_cache), "--fid_features", "xrv",
        "--fid_batch", "3", "--reader_pairs", "3", "--mask_corners", "0.05",
    ])
    assert rc == 0
    for name in ("summary.md", "per_image_metrics.csv", "image_metrics_summary.csv", "metrics_by_finding.csv", "classifier_table.csv",
                 "classifier_probabilities.csv", "fid.csv", "metrics_distribution.png", "examples.png", "provenance.json",
                 "reader_kit/index.html", "reader_kit/scores.csv", "reader_kit/key_PRIVATE.csv"):
        assert (out / name).is_file(), name
    per_image = pd.read_csv(out / "per_image_metrics.csv")
    assert len(per_image) == 6
    assert {"rmse_8bit", "rmse_xrv", "psnr_8bit", "ssim_8bit", "feature_cosine_similarity"} <= set(per_image.columns)
    assert np.allclose(per_image["rmse_xrv"], per_image["rmse_8bit"] * 2048 / 255)
    assert (per_image["ssim_8bit"] <= 1).all() and (per_image["rmse_8bit"] > 0).all()
    table = pd.read_csv(out / "classifier_table.csv")
    assert list(table.columns) == TABLE1_COLUMNS
    assert len(table) == 12 and (table["threshold"] == 0.5).all()
    fid = pd.read_csv(out / "fid.csv")
    assert list(fid["kind"]) == ["minibatch (batch 3)", "whole set"] and fid["n_per_side"].tolist() == [3, 6]
    (prov,) = json.loads((out / "provenance.json").read_text())["records"]
    assert prov["what"] == "study/vae" and prov["packages"]["torch"]
    assert len(prov["inputs"]["dicom_ids"]) == 6 and prov["settings"]["seed"] == 0
    assert prov["inputs"]["vae_weights"].startswith("tiny-phantom")
    summary = (out / "summary.md").read_text()
    assert "per image" in summary and "Pooled PSNR" in summary and "Pleural Other -> Pleural_Thickening" in summary
    assert "Threshold for accuracy and F1: **0.5**" in summary and "N = 6" in summary

    # the one-pass features equal xrv's features2
    from metrics.classifiers import classifier_outputs, load_classifier, to_classifier_input

    clf = load_classifier("densenet121-res224-all", str(xrv_cache))
    imgs = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    _, feats = classifier_outputs(clf, imgs, batch_size=2, device="cpu")
    with torch.no_grad():
        assert np.allclose(feats, clf.features2(to_classifier_input(torch.from_numpy(imgs).float().div(255).unsqueeze(1))).numpy(), atol=1e-4)

    # same seed, same images
    out2 = tmp_path / "again"
    assert evaluate.main(["vae", "--mimic_root", str(phantom_root), "--n", "6", "--resolution", "64", "--pretrained", "tiny-phantom",
                          "--out", str(out2), "--device", "cpu", "--classifier", "none", "--fid_features", "none", "--reader_pairs", "0"]) == 0
    assert json.loads((out2 / "provenance.json").read_text())["records"][0]["inputs"]["dicom_ids"] == prov["inputs"]["dicom_ids"]


def test_bad_inputs(tmp_path, capsys):
    common = ["--resolution", "64", "--pretrained", "tiny-phantom", "--device", "cpu", "--classifier", "none",
              "--fid_features", "none", "--reader_pairs", "0"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate.main(["vae", "--image_folder", str(empty), "--out", str(tmp_path / "o1"), *common]) == 2
    assert "no images found" in capsys.readouterr().err

    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (80, 64), dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    assert evaluate.main(["vae", "--image_folder", str(folder), "--out", str(tmp_path / "o2"), *common]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "--on_bad_image skip" in err

    out = tmp_path / "o3"
    assert evaluate.main(["vae", "--image_folder", str(folder), "--out", str(out), "--on_bad_image", "skip", *common]) == 0
    assert len(pd.read_csv(out / "per_image_metrics.csv")) == 3
    prov = json.loads((out / "provenance.json").read_text())["records"][0]
    assert [Path(s["path"]).name for s in prov["inputs"]["skipped"]] == ["broken.png"]
    assert "broken.png" in (out / "summary.md").read_text()

    assert evaluate.main(["vae", "--image_folder", str(folder), "--out", str(tmp_path / "o4"), *common[:-2], "--reader_pairs", "0",
                          "--resolution", "60"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_missing_weights_fail_fast_with_the_file_name(phantom_root, tmp_path, monkeypatch, capsys):
    base = ["vae", "--mimic_root", str(phantom_root), "--n", "4", "--resolution", "64", "--pretrained", "tiny-phantom",
            "--out", str(tmp_path / "o"), "--device", "cpu", "--reader_pairs", "0"]
    assert evaluate.main([*base, "--classifier", "densenet121-res224-all", "--xrv_cache_dir", str(tmp_path / "nothing"),
                          "--fid_features", "none"]) == 2
    err = capsys.readouterr().err
    assert "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt" in err and str(tmp_path / "nothing") in err
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert evaluate.main([*base, "--classifier", "none", "--fid_features", "inception"]) == 2
    assert INCEPTION_WEIGHTS_FILE in capsys.readouterr().err


def test_every_study_has_a_subcommand(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["no-such-study"])
    err = capsys.readouterr().err
    assert all(name in err for name in ("vae", "vae-scores", "text-encoders", "generation"))
