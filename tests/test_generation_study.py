"""evaluate.py generation on the phantom data: Table 4, finding correctness, diversity, Figure 4, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import evaluate
from datamodules.prompts import PAPER_PROMPTS


def base_args(phantom_root, out):
    return ["generation", "--mimic_root", str(phantom_root), "--out", str(out), "--base", "tiny-phantom", "--split", "all",
            "--n_per_prompt", "3", "--steps", "2", "--scheduler", "ddim", "--fid_features", "xrv", "--classifier", "tiny-phantom",
            "--n_boot", "5", "--kid", "--device", "cpu"]


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------- --prompts reports
def test_report_conditioned_auroc_on_a_constructed_case_with_known_answers():
    """Scores equal to the label give AUROC 1, reversed scores 0; uncertain labels are left out and counted; the macro
    is their mean."""
    import numpy as np

    from evaluation.report_prompts import score_strategy

    labels = pd.DataFrame({"Pleural Effusion": [1.0, 1.0, 0.0, np.nan, -1.0, 0.0],
                           "Cardiomegaly": [0.0, 1.0, 1.0, 0.0, 0.0, np.nan]})
    scores = {"Pleural Effusion": np.array([0.9, 0.8, 0.1, 0.2, 0.99, 0.3]),  # perfect, the uncertain one left out
              "Cardiomegaly": np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.6])}       # reversed
    rows = {r["finding"]: r for r in score_strategy("m", scores, labels, ["Pleural Effusion", "Cardiomegaly"], 20, 0)}
    assert rows["Pleural Effusion"]["auroc"] == 1.0 and rows["Pleural Effusion"]["n_uncertain_left_out"] == 1
    assert (rows["Pleural Effusion"]["n_positive"], rows["Pleural Effusion"]["n_negative"]) == (2, 3)
    assert rows["Cardiomegaly"]["auroc"] == 0.0 and rows["macro"]["auroc"] == 0.5


@pytest.fixture(scope="module")
def report_root(tmp_path_factory):
    from synthetic.phantoms import write_phantom_mimic

    root = tmp_path_factory.mktemp("reports") / "mimic"
    write_phantom_mimic(root, n_per_finding={"No Finding": 30, "Pleural Effusion": 30}, size=64, seed=3)
    return root


def test_report_prompts_score_every_finding_the_classifier_knows(report_root, tmp_path, capsys):
    out = tmp_path / "reports"
    args = ["generation", "--prompts", "reports", "--mimic_root", str(report_root), "--base", "tiny-phantom", "--out", str(out),
            "--classifier", "tiny-phantom", "--steps", "2", "--scheduler", "ddim", "--n_boot", "5", "--device", "cpu",
            "--n_reports_per_class", "4"]
    # the default classes are every finding the classifier knows: this root has no cardiomegaly reports
    assert evaluate.main(args) == 2
    assert "too few impressions positive for 'Cardiomegaly': 0 (--n_reports_per_class 4)" in capsys.readouterr().err
    assert evaluate.main([*args, "--report_classes", "Edema"]) == 2
    assert "the classifier tiny-phantom does not know ['Edema']; it scores ['Cardiomegaly', 'Pleural Effusion']" in capsys.readouterr().err
    assert evaluate.main([*args, "--report_classes", "Pleural Effusion", "No Finding", "--images_per_report", "2"]) == 0, \
        capsys.readouterr().err
    table = pd.read_csv(out / "report_auroc.csv")
    assert table["finding"].tolist() == ["Cardiomegaly", "Pleural Effusion", "macro"]
    effusion = table[table.finding == "Pleural Effusion"].iloc[0]
    assert (effusion["n_positive"], effusion["n_negative"]) == (8, 8) and 0 <= effusion["auroc"] <= 1  # 4 reports × 2 images
    drawn = pd.read_csv(out / "report_prompts.csv")
    assert drawn["class"].value_counts().to_dict() == {"Pleural Effusion": 4, "No Finding": 4}
    assert list(drawn.columns) == ["study_id", "subject_id", "class"]  # ids only: no report text leaves the data
    confusion = pd.read_csv(out / "report_confusion.csv")
    assert confusion["asked"].tolist() == ["Pleural Effusion", "No Finding"]
    md = (out / "report_results.md").read_text()
    assert "| Stable Diffusion (base) | CLIP | 77 | 0 of 8 | truncated to CLIP's 77 tokens |" in md
    assert (out / "report_confusion.png").stat().st_size > 5000


def test_a_prompt_longer_than_clips_window_is_counted(tiny_sd):
    from models.generator import Generator

    window = Generator(tiny_sd).prompt_window(["effusion " * 200, "small left effusion"])
    assert window["too_long"] == 1 and window["window"] == tiny_sd.max_token_length and window["encoder"] == "CLIP"


def test_a_projection_counts_prompts_against_its_domain_encoders_window(tiny_sd):
    """Prompts through a textual projection are truncated by the domain encoder, at its own limit, not CLIP's 77."""
    from torch import nn

    from models.domain_encoder import DomainEncoderSpec, load_domain_encoder
    from models.projection import ProjectedConditioning

    domain = load_domain_encoder(DomainEncoderSpec("tiny-bert", max_length=16))
    window = ProjectedConditioning(tiny_sd, domain, nn.Identity(), "document").window(["effusion " * 30, "small effusion"])
    assert (window["window"], window["too_long"]) == (16, 1) and "tiny-bert" in window["encoder"]


def test_an_unreadable_reference_image_is_named_without_advising_a_flag_the_study_lacks(tmp_path):
    """``evaluate.py generation`` has no ``--on_bad_image``: its error for an unreadable real image names the file and
    does not advise the flag (the vae, memorization and utility studies take it and keep the advice)."""
    from datamodules.study_images import ImageSelectionError, reference_images, select_mimic
    from synthetic.phantoms import write_phantom_mimic

    root = write_phantom_mimic(tmp_path / "mimic", n_per_finding={"No Finding": 2, "Pleural Effusion": 6}, size=64, seed=0,
                               split_fractions=(0.0, 0.0, 1.0))
    bad = Path(select_mimic(root, None, 0, "test").query("`Pleural Effusion` == 1.0").path.iloc[0])
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageSelectionError) as err:
        reference_images(str(root), "Pleural Effusion", "test", None, 32, 0)
    assert bad.name in str(err.value) and "--on_bad_image" not in str(err.value)
