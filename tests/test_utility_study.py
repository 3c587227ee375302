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


def args(root, out, *extra):
    return ["utility", "--mimic_root", str(root), "--out", str(out), "--base", "tiny-phantom", "--classifier", "tiny-phantom",
            "--findings", "Pleural Effusion", "--steps", "5", "--batch_size", "4", "--seeds", "0", "--n_boot", "10",
            "--gen_steps", "2", "--device", "cpu", *extra]


def test_a_synthetic_set_of_copies_trains_exactly_as_the_real_set(utility_root, tmp_path, capsys):
    """The base model's synthetic folder is filled beforehand with the real training images themselves (images already
    written are kept): arm (b) then sees the same images, labels and batches as arm (a) and must score the same."""
    from evaluation.utility_study import UtilityConfig, real_data

    out = tmp_path / "utility"
    real = real_data(UtilityConfig(mimic_root=str(utility_root), out=str(out), base="tiny-phantom"), 64)
    folder = out / "synthetic" / "Stable_Diffusion_(base)"
    folder.mkdir(parents=True)
    for i, image in enumerate(real.train_images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
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


def test_the_synthetic_set_is_generated_with_the_real_labels_prompts(utility_root, tmp_path, capsys):
    out = tmp_path / "gen"
    assert evaluate.main(args(utility_root, out, "--max_real", "6", "--steps", "2")) == 0, capsys.readouterr().err
    assert len(list((out / "synthetic" / "Stable_Diffusion_(base)").glob("*.png"))) == 6


@pytest.mark.parametrize("extra,message", [
    (["--findings", "Edema"], "the classifier tiny-phantom does not know ['Edema']"),
    (["--findings", "Cardiomegaly"], "has no image positive for ['Cardiomegaly']"),
    (["--steps", "0"], "--steps 0 and --batch_size 4: an arm's budget must be at least 1 step"),
    (["--device", "tpu9"], "--device 'tpu9': expected auto, cpu, cuda or cuda:N"),
])
def test_bad_input_is_one_clear_error(utility_root, tmp_path, capsys, extra, message):
    assert evaluate.main(args(utility_root, tmp_path / "o", *extra)) == 2
    assert message in capsys.readouterr().err
