"""evaluate.py generation on the phantom data: Table 4, finding correctness, diversity, Figure 4, bad input."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import evaluate
from datamodules.prompts import PAPER_PROMPTS


def base_args(phantom_root, out):
    return ["generation", "--mimic_root", str(phantom_root), "--out", str(out), "--base", "tiny-phantom", "--split", "all",
            "--n_per_prompt", "3", "--steps", "2", "--scheduler", "ddim", "--fid_features", "xrv", "--classifier", "tiny-phantom",
            "--n_boot", "5", "--kid", "--device", "cpu"]


def test_tables_for_the_base_model_and_a_trained_run(phantom_root, reference_run, tiny_dinov2, tmp_path, capsys):
    """FID, KID and PRDC on an image encoder's features (a tiny random DINOv2 standing in for RAD-DINO)."""
    out = tmp_path / "gen"
    assert evaluate.main([*base_args(phantom_root, out), "--runs", str(reference_run), "--n_per_prompt", "6",
                          "--fid_features", "image_encoder", "--image_encoder", str(tiny_dinov2)]) == 0, capsys.readouterr().err
    table4 = pd.read_csv(out / "table4.csv", index_col=0)
    assert list(table4.index) == ["Stable Diffusion (base)", "ref"] and list(table4.columns) == list(PAPER_PROMPTS)
    assert (table4 >= 0).all().all()
    fid = pd.read_csv(out / "fid.csv")
    assert set(fid["n_generated"]) == {6} and (fid["ci_low"] <= fid["ci_high"]).all()
    assert set(fid["features"]) == {"image_encoder"} and set(fid["prdc_k"]) == {5}
    assert fid[["precision", "recall", "coverage"]].stack().between(0, 1).all() and (fid["density"] >= 0).all()
    assert set(fid[fid.prompt == PAPER_PROMPTS[1]]["reference"]) == {"Pleural Effusion"}
    assert set(fid[fid.prompt != PAPER_PROMPTS[1]]["reference"]) == {"No Finding"}
    assert (fid["subset_size"] <= 6).all()  # KID's subset never exceeds N
    corr = pd.read_csv(out / "finding_correctness.csv")
    assert list(corr["strategy"]) == ["Stable Diffusion (base)", "ref"] and corr["auroc"].between(0, 1).all()
    div = pd.read_csv(out / "diversity.csv")
    assert set(div["scales"]) == {3} and div["ms_ssim"].between(-1, 1).all()  # 64 px: 3 MS-SSIM scales
    md = (out / "results.md").read_text()
    assert "N generated per cell = 6" in md and "Not comparable with the paper's Table 4" in md
    assert "## Precision / recall / density / coverage (image_encoder features, k = 5" in md
    assert (out / "figure4.png").stat().st_size > 10_000 and len(list((out / "grids").glob("*.png"))) == 2
    (record,) = json.loads((out / "provenance.json").read_text())["records"]
    assert record["what"] == "study/generation" and record["settings"]["seeds"] == [0, 1, 2, 3, 4, 5]
    assert record["inputs"]["strategies"][1]["source"].endswith("last.ckpt")


@pytest.mark.parametrize("extra,message", [
    (["--prompts", ""], "at least one non-empty prompt"),
    (["--n_per_prompt", "1"], "at least 2 images per prompt"),
    (["--classifier", "densenet121-res224-all", "--xrv_cache_dir", "/nonexistent"], "not found at /nonexistent"),
    (["--base", "/nonexistent/sd-v1-4"], "--base /nonexistent/sd-v1-4: /nonexistent/sd-v1-4: no such folder"),
    (["--fid_features", "image_encoder"], "--fid_features image_encoder needs --image_encoder ID_OR_FOLDER"),
    (["--fid_features", "image_encoder", "--image_encoder", "microsoft/rad-dino"],
     "image encoder microsoft/rad-dino: 'microsoft/rad-dino' is neither a folder nor in the Hugging Face cache"),
])
def test_bad_input_is_one_clear_error(phantom_root, tmp_path, capsys, extra, message):
    assert evaluate.main([*base_args(phantom_root, tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_run_folder_without_checkpoint_is_named(phantom_root, tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert evaluate.main([*base_args(phantom_root, tmp_path / "o"), "--runs", str(tmp_path / "empty_run")]) == 2
    assert "empty_run" in capsys.readouterr().err


def test_reader_kit_of_generated_and_real_images_and_its_summary(phantom_root, tmp_path, capsys):
    import csv

    out = tmp_path / "gen"
    assert evaluate.main([*base_args(phantom_root, out), "--n_per_prompt", "2", "--n_boot", "0",
                          "--reader_kit", "2", "--reader_real", "2"]) == 0, capsys.readouterr().err
    kit = out / "reader_kit"
    key = list(csv.DictReader(open(kit / "key_PRIVATE.csv")))
    sources = {r["source_id"] for r in key}
    assert len(key) == 3 * 2 + 2 * 2 and "real | Pleural Effusion" in sources and "real | No Finding" in sources
    sheet = (kit / "scores.csv").read_text()
    assert "finding_present: Is a pleural effusion visible? Answer yes or no." in sheet
    header = next(line for line in sheet.splitlines() if not line.startswith("#"))
    assert header.split(",") == ["case", "finding_present", "score", "comment"]
    # a reader fills the sheet: effusion prompt images and effusion references "yes", realism 3
    cases = {r["case"]: r["source_id"] for r in key}
    lines = [line for line in sheet.splitlines() if line.startswith("#")] + [header]
    lines += [f"{c},{'yes' if 'effusion' in s.lower() else 'no'},3," for c, s in cases.items()]
    (kit / "scores.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert evaluate.main(["generation-scores", str(kit / "scores.csv")]) == 0
    table = pd.read_csv(kit / "scores_by_source.csv").set_index("source")
    assert table.loc["real | Pleural Effusion", "finding_present_yes_share"] == 1.0
    assert table.loc["real | No Finding", "finding_present_yes_share"] == 0.0 and (table["mean_score"] == 3).all()
    # an unanswered question is named
    (kit / "scores.csv").write_text("\n".join(lines[:-1] + [lines[-1].replace(",no,", ",,").replace(",yes,", ",,")]) + "\n")
    assert evaluate.main(["generation-scores", str(kit / "scores.csv")]) == 2
    assert "finding_present is ''; expected yes or no" in capsys.readouterr().err
