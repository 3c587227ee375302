"""evaluate.py utility on phantoms: the four arms, their bookkeeping (a synthetic set of copies of the real training
images trains exactly as the real set does), resuming, bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import evaluate


@pytest.fixture(scope="module")
def utility_root(tmp_path_factory):
    from synthetic.phantoms import write_phantom_mimic

    root = tmp_path_factory.mktemp("utility") / "mimic"
    write_phantom_mimic(root, n_per_finding={"No Finding": 20, "Pleural Effusion": 20}, size=64, seed=5)
    return root


def adopt(folder, cfg, strategy, prompts) -> None:
    """Write the record that makes the study keep the images placed in ``folder`` as made by ``strategy`` from
    ``prompts`` (the study refuses images without one: nothing would say what made them)."""
    import json

    from evaluation.utility_study import SYNTHETIC_RECORD, synthetic_record

    asked = [strategy.generator.paper_prompt(p) for p in prompts]
    (folder / SYNTHETIC_RECORD).write_text(json.dumps(synthetic_record(cfg, strategy, asked)))


def args(root, out, *extra):
    return ["utility", "--mimic_root", str(root), "--out", str(out), "--base", "tiny-phantom", "--classifier", "tiny-phantom",
            "--findings", "Pleural Effusion", "--steps", "5", "--batch_size", "4", "--seeds", "0", "--n_boot", "10",
            "--gen_steps", "2", "--device", "cpu", *extra]


@pytest.mark.slow
def test_a_synthetic_set_of_copies_trains_exactly_as_the_real_set(utility_root, tmp_path, capsys):
    """The base model's synthetic folder is filled beforehand with the real training images themselves (images already
    written are kept when their record says they were made as asked): arm (b) then sees the same images, labels and
    batches as arm (a) and must score the same."""
    from evaluation.sources import load_strategies
    from evaluation.utility_study import UtilityConfig, build_parser, prompts_for, real_data

    out = tmp_path / "utility"
    cfg = UtilityConfig(**vars(build_parser().parse_args(args(utility_root, out)[1:])))
    real = real_data(cfg, 64)
    folder = out / "synthetic" / "Stable_Diffusion_(base)"
    folder.mkdir(parents=True)
    for i, image in enumerate(real.train_images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    adopt(folder, cfg, load_strategies("tiny-phantom", [], [])[0], prompts_for(cfg, real))
    assert evaluate.main(args(utility_root, out)) == 0, capsys.readouterr().err
    assert f"{len(real.train_images)} synthetic images kept, 0 to generate" in capsys.readouterr().out
    table = pd.read_csv(out / "utility.csv")
    assert set(table["arm"]) == {"a", "b", "c", "d"} and set(table["finding"]) == {"Pleural Effusion", "macro"}
    a, b = (table[table.arm == arm].set_index("finding")["auroc"] for arm in "ab")
    assert np.allclose(a, b) and a.between(0, 1).all()
    diffs = pd.read_csv(out / "differences.csv")
    assert np.allclose(diffs[diffs.arm == "b"]["difference"], 0.0)
    assert table.loc[table.arm == "d", "steps"].eq(10).all() and table.loc[table.arm != "d", "steps"].eq(5).all()  # stated
    md = (out / "utility.md").read_text()
    assert "arms a, b and c train 5 steps of 4 images" in md and "| Stable Diffusion (base) |" in md
    assert (out / "utility.png").stat().st_size > 5000
    # a second run keeps every arm and image
    before = {p: p.stat().st_mtime_ns for p in (out / "arms").rglob("*.npz")}
    assert evaluate.main(args(utility_root, out)) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "arms").rglob("*.npz")} == before and len(before) == 4


@pytest.mark.slow
def test_the_synthetic_set_is_generated_with_the_real_labels_prompts(utility_root, tmp_path, capsys):
    out = tmp_path / "gen"
    assert evaluate.main(args(utility_root, out, "--max_real", "6", "--steps", "2")) == 0, capsys.readouterr().err
    assert len(list((out / "synthetic" / "Stable_Diffusion_(base)").glob("*.png"))) == 6


@pytest.mark.parametrize("extra,message", [
    (["--findings", "Edema"], "the classifier tiny-phantom does not know ['Edema']"),
    (["--findings", "Cardiomegaly"], "has no image positive for ['Cardiomegaly']"),
    (["--device", "tpu9"], "--device 'tpu9': expected auto, cpu, cuda or cuda:N"),
])
def test_bad_input_is_one_clear_error(utility_root, tmp_path, capsys, extra, message):
    assert evaluate.main(args(utility_root, tmp_path / "o", *extra)) == 2
    assert message in capsys.readouterr().err


def test_the_synthetic_set_is_generated_at_native_size_and_resized_as_the_real_images(utility_root, tmp_path, monkeypatch):
    """SD samples at its native size (the U-Net's sample_size x the VAE factor), not at the classifier's: at 32 px a
    tiny-phantom U-Net would run on 16-px latents it never saw. The kept image is then resized by the real images'
    loader: a synthetic set of the real training images at native size comes out pixel for pixel as the real set."""
    from evaluation.sources import load_strategies
    from evaluation.utility_study import UtilityConfig, UtilityStudyError, real_data, synthetic_set

    (strategy,) = load_strategies("tiny-phantom", [], [])
    native = strategy.generator.native_size
    assert native == 64  # tiny-phantom: 32-px latents x VAE factor 2 (= the phantom classifier's 64 px)
    asked, generate = [], strategy.generator.generate
    monkeypatch.setattr(strategy.generator, "generate", lambda *a, **k: asked.append((k["height"], k["width"])) or generate(*a, **k))
    cfg = UtilityConfig(mimic_root=str(utility_root), out=str(tmp_path / "gen"), base="tiny-phantom", gen_steps=1, batch_size=2)
    images, _ = synthetic_set(cfg, strategy, ["lung xray", "lung xray with pleural effusion"], 32, lambda m: None)
    assert asked == [(native, native)] and images.shape == (2, 32, 32)
    assert {Image.open(p).size for p in (tmp_path / "gen" / "synthetic").rglob("*.png")} == {(native, native)}  # kept at native

    cfg.out = str(tmp_path / "copies")
    folder = tmp_path / "copies" / "synthetic" / "Stable_Diffusion_(base)"
    folder.mkdir(parents=True)
    for i, image in enumerate(real_data(cfg, native).train_images):  # the real training images' pixels at native size
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    real = real_data(cfg, 32)
    adopt(folder, cfg, strategy, ["lung xray"] * len(real.train_images))
    assert np.array_equal(synthetic_set(cfg, strategy, ["lung xray"] * len(real.train_images), 32, lambda m: None)[0],
                          real.train_images)
    Image.fromarray(real.train_images[0]).save(folder / "000000.png")  # at 32 px, as the study used to keep them
    with pytest.raises(UtilityStudyError, match="000000.png: not the model's native 64 px"):
        synthetic_set(cfg, strategy, ["lung xray"] * len(real.train_images), 32, lambda m: None)


def test_pretrained_xrv_weights_that_saw_mimic_are_refused_on_mimic_test_scoring(utility_root, tmp_path, capsys):
    """xrv's DenseNet weights "all", "mimic_ch", "mimic_nb" were trained on MIMIC-CXR (not by its official split):
    --init pretrained scored on a MIMIC test split is refused, before any weights or images are read, unless
    --i_know_init_saw_mimic_test; then it warns. Phantom roots (PHANTOMS.json) and weights without MIMIC are not."""
    import shutil

    mimic = tmp_path / "mimic"  # a MIMIC-CXR-JPG root: the phantoms without their marker
    shutil.copytree(utility_root, mimic, ignore=shutil.ignore_patterns("PHANTOMS.json"))
    xrv = ["--xrv_cache_dir", str(tmp_path / "no_weights"), "--init", "pretrained", "--classifier"]
    assert evaluate.main(args(mimic, tmp_path / "o", *xrv, "densenet121-res224-all")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init pretrained" in err and "nih-pc-chex-mimic_ch-google-openi-kaggle" in err
    assert "MIMIC-CXR" in err and "--i_know_init_saw_mimic_test" in err and "not found" not in err
    assert evaluate.main(args(mimic, tmp_path / "o", *xrv, "mimic_nb")) == 2
    assert "--i_know_init_saw_mimic_test" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="MIMIC-CXR"):  # past the refusal: on to the (missing) weights
        assert evaluate.main(args(mimic, tmp_path / "o", *xrv, "mimic_ch", "--i_know_init_saw_mimic_test")) == 2
    assert "torchxrayvision weights 'mimic_ch' not found" in capsys.readouterr().err
    for root, classifier in ((utility_root, "densenet121-res224-all"), (mimic, "densenet121-res224-nih")):
        assert evaluate.main(args(root, tmp_path / "o", *xrv, classifier)) == 2
        assert "not found" in (err := capsys.readouterr().err) and "--i_know_init_saw_mimic_test" not in err


def test_utility_md_records_pretrained_weights_that_saw_mimic(utility_root, tmp_path):
    from evaluation.utility_report import differences, markdown
    from evaluation.utility_study import ARMS, RealData, UtilityConfig, score_rows

    cfg = UtilityConfig(mimic_root=str(tmp_path), out=str(tmp_path / "o"), base="tiny-phantom", init="pretrained",
                        seeds=[0], n_boot=2, i_know_init_saw_mimic_test=True)
    rng = np.random.default_rng(0)
    labels = np.array([[0], [1], [0], [1]], dtype=np.float32)
    real = RealData(pd.DataFrame(), np.zeros((4, 8, 8), np.uint8), labels, np.zeros((4, 8, 8), np.uint8), labels)
    probabilities = {("base", arm, 0): rng.random((4, 1)) for arm in ARMS}
    table = pd.DataFrame([r for (s, arm, seed), p in probabilities.items() for r in score_rows(cfg, s, arm, seed, p, labels)])
    md = markdown(cfg, table, differences(cfg, probabilities, labels), real, 224)
    assert "nih-pc-chex-mimic_ch-google-openi-kaggle" in md and "--i_know_init_saw_mimic_test" in md
    cfg.init = "scratch"
    assert "--i_know_init_saw_mimic_test" not in markdown(cfg, table, differences(cfg, probabilities, labels), real, 224)
