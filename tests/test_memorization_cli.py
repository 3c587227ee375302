"""evaluate.py memorization's command line: a generate.py output as --generated (its prompts and seeds, not its grid),
--out checked before any work, --on_bad_image, numbers refused at parse.

No trained run is needed: ``--train_data`` takes a data.json, here one written by hand listing a phantom root's
train-split images (what a run trained on), and the held-out images are that root's test split (other patients)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from evaluation.memorization_study import main

FINDINGS = ["No Finding", "Pleural Effusion"]


@pytest.fixture(scope="module")
def audit_root(tmp_path_factory) -> Path:
    """Phantoms whose test split holds 7 images of the findings: enough to calibrate at the 0.5 quantile (the threshold
    is not what these tests are about)."""
    from synthetic.phantoms import write_phantom_mimic

    root = tmp_path_factory.mktemp("audit") / "mimic"
    write_phantom_mimic(root, n_per_finding={"No Finding": 20, "Pleural Effusion": 20}, size=64, seed=3)
    return root


def training_data(root: Path, path: Path) -> Path:
    """A run's data.json as train.py writes it: the train-split frontal images of ``root`` were its training images."""
    from datamodules.study_images import select_mimic

    train = select_mimic(root, None, 0, "train")
    path.write_text(json.dumps({"dataset": "MIMIC-CXR-JPG", "root": str(root), "findings": FINDINGS, "resolution": 64,
                                "train": train[["dicom_id", "subject_id", "study_id"]].to_dict("records")}))
    return path


def audit(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--runs", str(data), "--train_data", str(data), "--out", str(out), "--features", "pixel", "--quantile", "0.5",
            "--base", "none", *extra]


@pytest.mark.slow
def test_a_generate_py_output_is_audited_with_its_prompts_and_seeds_and_without_its_grid(audit_root, tmp_path):
    """Issue 33 W-5: --generated on a generate.py output used to audit its labelled grid.png as a generated image and
    give every image an empty prompt and seed -1, although generation.json holds them. Now the images it lists come
    with their prompts and seeds, and the grid is left out; an image generate.py did not write is kept, unknown."""
    import generate
    from PIL import Image

    folder = tmp_path / "generated"
    generate.main(["--pretrained", "tiny-phantom", "--out", str(folder), "--n", "2", "--steps", "1", "--seed", "7",
                   "--device", "cpu", "--prompt", "lung xray", "--prompt", "lung xray with pleural effusion"])
    Image.new("L", (64, 64)).save(folder / "extra.png")  # placed by hand: no record of its prompt or seed
    data = training_data(audit_root, tmp_path / "data.json")
    assert main(audit(data, tmp_path / "audit", "--generated", str(folder))) == 0
    table = pd.read_csv(tmp_path / "audit" / "memorization.csv", keep_default_na=False).sort_values("image_id")
    assert table["image_id"].tolist() == ["extra.png", "p00_s7.png", "p00_s8.png", "p01_s7.png", "p01_s8.png"]
    assert table["prompt"].tolist() == ["", "lung xray", "lung xray", *["lung xray with pleural effusion"] * 2]
    assert table["seed"].tolist() == [-1, 7, 8, 7, 8]

    (folder / "p00_s8.png").unlink()
    assert main(audit(data, tmp_path / "audit2", "--generated", str(folder))) == 2  # listed, but gone


def test_an_out_that_is_a_file_is_refused_before_any_work(audit_root, tmp_path, capsys, monkeypatch):
    """Issue 33 W-6: --out FILE used to fail with a traceback after the whole audit. Now it is one line, first."""
    import evaluation.memorization_study as study

    monkeypatch.setattr(study, "real_sets", lambda cfg: pytest.fail("read the training images"))
    data = training_data(audit_root, tmp_path / "data.json")
    (tmp_path / "file").write_text("x")
    assert main(audit(data, tmp_path / "file")) == 2
    assert capsys.readouterr().err == f"evaluate.py memorization: error: --out {tmp_path / 'file'} is a file, not a folder\n"
    assert main(audit(data, tmp_path / "file", "--calibrate_only")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unreadable_training_image_is_named_or_skipped_with_on_bad_image(audit_root, tmp_path, capsys):
    """Issue 33 W-7: the error for an unreadable image advises --on_bad_image skip, which the audit did not take. It
    takes it now: the image is left out of the training set with a warning, listed in provenance.json and counted in
    memorization.md (a copy of it cannot be found)."""
    from datamodules.study_images import select_mimic

    root = tmp_path / "mimic"
    shutil.copytree(audit_root, root)
    data = training_data(root, tmp_path / "data.json")
    broken = Path(select_mimic(root, None, 0, "train")["path"].iloc[3])
    broken.write_bytes(broken.read_bytes()[:200])
    assert main(audit(data, tmp_path / "a", "--calibrate_only")) == 2
    err = capsys.readouterr().err
    line = re.split(r"[\r\n]", err.rstrip())[-1]  # after the progress bar, on the same stream
    assert line.startswith("evaluate.py memorization: error: ") and err.count("error:") == 1
    assert broken.name in line and "--on_bad_image skip" in line
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        assert main(audit(data, tmp_path / "b", "--generated", str(root / "files"), "--on_bad_image", "skip")) == 0
    record = json.loads((tmp_path / "b" / "provenance.json").read_text())["records"][0]
    n_train = len(json.loads(data.read_text())["train"])
    assert record["inputs"]["training_images"] == n_train - 1
    assert [s["path"] for s in record["inputs"]["skipped_images"]] == [str(broken)] * 2  # a training and a --generated image
    assert "**Left out**: 2 unreadable image(s)" in (tmp_path / "b" / "memorization.md").read_text()
    assert broken.stem not in set(pd.read_csv(tmp_path / "b" / "memorization.csv")["nearest_train"])


@pytest.mark.parametrize("extra,message", [
    (["--n_per_prompt", "0"], "argument --n_per_prompt: 0: expected an integer of at least 1"),
    (["--steps", "0"], "argument --steps: 0: expected an integer of at least 1"),
    (["--guidance", "-2"], "argument --guidance: -2: expected a number of at least 0"),
    (["--quantile", "1.5"], "argument --quantile: 1.5: expected a number between 0 and 1"),
    (["--quantile", "0"], "argument --quantile: 0: expected a number between 0 and 1"),
    (["--max_heldout", "0"], "argument --max_heldout: 0: expected an integer of at least 1"),
    (["--seed", "-1"], "argument --seed: -1: a seed is an integer from 0 to 2**32-1"),
    (["--on_bad_image", "ignore"], "argument --on_bad_image: invalid choice: 'ignore'"),
])
def test_impossible_numbers_are_refused_at_parse(tmp_path, capsys, extra, message):
    """Issue 33 W-12, for the audit: its numbers are checked at parse (one line, exit 2), before any work."""
    with pytest.raises(SystemExit) as exit:
        main(audit(tmp_path / "data.json", tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("error:") == 1, err
    assert not (tmp_path / "out").exists()
