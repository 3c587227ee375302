"""Every study takes a Sana run or export (and a Sana base) unchanged: the generation study beside a Stable Diffusion
model (FID/KID on the phantom classifier's features, finding correctness, report prompts counted against Gemma-2's
300-token window), the memorization audit and the training-time monitor, the utility study, the VAE study on the DC
autoencoder; each model samples with its own sampler unless one is asked, one a model cannot use is refused in one
line naming it, and the text-encoder study refuses a Sana base in one line."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import evaluate
from conftest import quiet_trainer

PLAIN, EFFUSION = "a photo of a lung xray", "a photo of a lung xray with a visible pleural effusion"
FINDINGS = ["No Finding", "Pleural Effusion"]


@pytest.fixture(scope="module")
def sana(phantom_root, tmp_path_factory):
    """A tiny Sana trained 2 steps on 4 phantoms with a MemorizationMonitor, its data.json and its export."""
    from callbacks.memorization import MemorizationMonitor
    from datamodules.mimic_cxr import MIMICCXRDataModule
    from lightning_modules.unet import UNetFineTuning

    tmp = tmp_path_factory.mktemp("sana_run")
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=FINDINGS, resolution=64, batch_size=2, max_train_images=4,
                            max_val_images=0, cache_dir=str(tmp / "cache"))
    monitor = MemorizationMonitor(every_n_steps=1, n_per_prompt=1, threshold=0.5, steps=2)
    module = UNetFineTuning(model={"pretrained": "tiny-random-sana"}, learning_rate=1e-3)
    quiet_trainer(2, callbacks=[monitor], default_root_dir=str(tmp)).fit(module, datamodule=dm)
    (tmp / "data.json").write_text(json.dumps(dm.manifest(), default=str))
    return {"dir": tmp, "export": module.export(tmp / "sana_export"), "monitor": monitor}


def generation_args(root, out, *extra):
    return ["generation", "--mimic_root", str(root), "--out", str(out), "--split", "all", "--steps", "2",
            "--fid_features", "xrv", "--classifier", "tiny-phantom", "--n_boot", "0", "--device", "cpu", *extra]


def test_the_generation_study_scores_a_sana_export_beside_stable_diffusion_each_with_its_own_sampler(sana, phantom_root,
                                                                                                      tmp_path, capsys):
    out = tmp_path / "gen"
    assert evaluate.main(generation_args(phantom_root, out, "--base", "tiny-random", "--runs", str(sana["export"]),
                                         "--prompts", PLAIN, EFFUSION, "--n_per_prompt", "2", "--kid")) == 0, \
        capsys.readouterr().err
    fid = pd.read_csv(out / "fid.csv")
    assert list(pd.read_csv(out / "table4.csv", index_col=0).index) == ["Stable Diffusion (base)", "sana_export"]
    assert fid.groupby("strategy")["sampler"].first().to_dict() == {"Stable Diffusion (base)": "pndm", "sana_export": "euler"}
    assert np.isfinite(fid[["fid", "kid"]].to_numpy()).all() and set(fid["guidance"]) == {7.5}
    assert set(fid[fid.prompt == EFFUSION]["reference"]) == {"Pleural Effusion"}
    corr = pd.read_csv(out / "finding_correctness.csv")
    assert corr["strategy"].tolist() == ["Stable Diffusion (base)", "sana_export"] and corr["auroc"].between(0, 1).all()
    md = (out / "results.md").read_text()
    assert "2 steps (samplers: Stable Diffusion (base) pndm, sana_export euler), guidance 7.5 (the same for every model)" in md
    (record,) = json.loads((out / "provenance.json").read_text())["records"]
    strategies = {s["name"]: s for s in record["inputs"]["strategies"]}
    assert strategies["sana_export"]["family"] == "sana" and strategies["sana_export"]["sampler"] == "euler"
    assert record["settings"]["scheduler"] is None and record["settings"]["samplers"]["Stable Diffusion (base)"] == "pndm"


def test_report_prompts_count_long_impressions_against_each_models_own_window(sana, tmp_path_factory, capsys):
    """Impressions of about 110 tokens: over CLIP's 77, within Gemma-2's 300."""
    from synthetic.phantoms import write_phantom_mimic

    root = tmp_path_factory.mktemp("long_reports") / "mimic"
    write_phantom_mimic(root, n_per_finding={"No Finding": 10, "Pleural Effusion": 10}, size=64, seed=3)
    for report in root.rglob("s*.txt"):
        report.write_text(report.read_text().rstrip("\n") + "  " + f"{EFFUSION}. " * 10 + "\n")
    out = tmp_path_factory.mktemp("reports_out")
    args = ["generation", "--prompts", "reports", "--mimic_root", str(root), "--base", "tiny-random", "--runs",
            str(sana["export"]), "--out", str(out), "--classifier", "tiny-phantom", "--steps", "1", "--n_boot", "0",
            "--device", "cpu", "--n_reports_per_class", "2", "--report_classes", "Pleural Effusion", "No Finding"]
    assert evaluate.main(args) == 0, capsys.readouterr().err
    md = (out / "report_results.md").read_text()
    assert "| Stable Diffusion (base) | CLIP | 77 | 4 of 4 | truncated to CLIP's 77 tokens |" in md
    assert "| sana_export | Gemma-2 | 300 | 0 of 4 | truncated to Sana's 300-token Gemma-2 window |" in md
    assert "1 steps (samplers: Stable Diffusion (base) pndm, sana_export euler)" in md


def test_no_sampler_given_is_each_models_own_and_one_a_sana_model_cannot_use_is_refused_in_one_line(sana):
    from evaluation.sources import SourceError, choose_samplers, load_strategies

    strategies = load_strategies("tiny-random-sana", [str(sana["export"])], [PLAIN])
    assert [s.name for s in strategies] == ["Sana (base)", "sana_export"]
    assert choose_samplers(strategies, None, "pndm") == {"Sana (base)": "euler", "sana_export": "euler"}
    assert choose_samplers(strategies, "dpm", "pndm") == {"Sana (base)": "dpm", "sana_export": "dpm"}  # explicit stays
    with pytest.raises(SourceError, match=r"--scheduler ddim: Sana \(base\) \(tiny-random-sana\) is a sana model and "
                                          r"cannot sample with it: .*euler or dpm") as err:
        choose_samplers(strategies, "ddim")
    assert "\n" not in str(err.value)


def test_the_memorization_audit_takes_a_sana_export_and_its_base(sana, tmp_path_factory):
    from evaluation.memorization_study import main
    from synthetic.phantoms import write_phantom_mimic

    heldout = tmp_path_factory.mktemp("heldout") / "mimic"
    write_phantom_mimic(heldout, n_per_finding={"No Finding": 16, "Pleural Effusion": 16}, size=64, seed=11)
    out = tmp_path_factory.mktemp("audit")
    assert main(["--runs", str(sana["export"]), "--train_data", str(sana["dir"] / "data.json"), "--out", str(out),
                 "--features", "pixel", "--quantile", "0.5", "--n_per_prompt", "2", "--steps", "2",
                 "--heldout_root", str(heldout), "--overwrite"]) == 0
    table = pd.read_csv(out / "memorization.csv")
    assert table["model"].tolist() == ["Sana (base)"] * 4 + ["sana_export"] * 4  # --base auto: export.json's tiny-random-sana
    assert set(table["sampler"]) == {"euler"} and table["train_similarity"].between(-1, 1).all()
    summary = pd.read_csv(out / "summary.csv")
    assert summary["copy_rate"].between(0, 1).all() and set(summary["sampler"]) == {"euler"}
    assert "samplers: Sana (base): euler, sana_export: euler" in (out / "memorization.md").read_text()


def test_the_memorization_monitor_checks_a_sana_fit(sana):
    table = pd.read_csv(sana["dir"] / "memorization_monitor.csv")
    assert table["step"].tolist() == [1, 2] and table["copy_rate"].between(0, 1).all() and not table["stopped"].any()
    assert sana["monitor"].threshold_source == "given"


def test_the_utility_study_makes_and_scores_a_sana_synthetic_set(sana, phantom_root, tmp_path):
    from evaluation.utility_study import main

    out = tmp_path / "utility"
    assert main(["--mimic_root", str(phantom_root), "--out", str(out), "--runs", str(sana["export"]), "--classifier",
                 "tiny-phantom", "--findings", "Pleural Effusion", "--steps", "1", "--batch_size", "4", "--seeds", "0",
                 "--gen_steps", "1", "--max_real", "8", "--n_boot", "2", "--device", "cpu"]) == 0
    table = pd.read_csv(out / "utility.csv")
    assert set(table["source"]) == {"sana_export"} and set(table["arm"]) == {"a", "b", "c", "d"}
    record = json.loads((out / "synthetic" / "sana_export" / "synthetic.json").read_text())
    assert record["scheduler"] == "euler" and len(list((out / "synthetic" / "sana_export").glob("*.png"))) == 8
    assert "1 euler steps, guidance 7.5" in (out / "utility.md").read_text()


def test_the_vae_study_reconstructs_through_sanas_deterministic_autoencoder(phantom_root, tmp_path):
    import torch

    from evaluation.vae_study import StudyConfig, reconstruct_all
    from models.stable_diffusion import load_stable_diffusion

    cfg = StudyConfig(out=str(tmp_path), mimic_root=str(phantom_root), pretrained="tiny-random-sana", resolution=64)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    recons, key, how = reconstruct_all(cfg, images, torch.device("cpu"))
    base = load_stable_diffusion("tiny-random-sana")
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1).expand(-1, 3, -1, -1)
    expected = base.vae.decode(base.vae.encode(x).latent).sample.mean(1).clamp(-1, 1).add(1).mul(127.5).round()
    assert np.array_equal(recons, expected.to(torch.uint8).numpy()) and np.array_equal(recons, reconstruct_all(cfg, images, "cpu")[0])
    assert how.startswith("sana autoencoder (AutoencoderDC, deterministic") and key.startswith("tiny-random-sana")


def test_the_text_encoder_study_refuses_a_sana_base_in_one_line(sana, phantom_root, tmp_path, capsys):
    for source in ("tiny-random-sana", str(sana["export"])):
        assert evaluate.main(["text-encoders", "--mimic_root", str(phantom_root), "--encoders", source,
                              "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"encoder '{source}': a sana base; its text encoder (Gemma-2 for Sana) is a decoder-only" in err
        assert "\n" not in err
