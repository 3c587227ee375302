"""The memorization criterion (metrics/memorization.py) on constructed sets: copies are caught, new images are not, and
the calibrated threshold keeps the false-positive rate it states."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metrics.memorization import aligned_pixel_similarity, audit, calibrate, cosine_similarity, min_heldout, nearest
from metrics.scores import MetricInputError
from synthetic.phantoms import render_phantom

FINDINGS = ["No Finding", "Pleural Effusion"]


def phantoms(seeds, size: int = 128) -> np.ndarray:
    return np.stack([render_phantom(FINDINGS[s % 2], size, rng=s) for s in seeds]).astype(np.float32) / 255


@pytest.fixture(scope="module")
def sets():
    """10 training phantoms, 200 held-out phantoms (other seeds: other 'patients'), and generated sets: exact copies,
    copies shifted by 3 pixels, copies with noise, contrast-changed copies, and 20 new phantoms."""
    rng = np.random.default_rng(0)
    train = phantoms(range(10))
    copies = {
        "exact": train[:3],
        "shifted": np.stack([np.roll(x, (3, -3), (0, 1)) for x in train[3:6]]),
        "noisy": np.clip(train[6:9] + rng.normal(0, 0.05, train[6:9].shape), 0, 1),
        "contrast": np.clip(0.6 * train[:3] + 0.25, 0, 1),
    }
    return train, phantoms(range(1000, 1200)), copies, phantoms(range(5000, 5020))


def test_copies_are_flagged_and_new_images_are_not(sets):
    train, heldout, copies, new = sets
    generated = np.concatenate([*copies.values(), new])
    result = audit(aligned_pixel_similarity(generated, train), aligned_pixel_similarity(heldout, train), quantile=0.99)
    n_copies = sum(len(v) for v in copies.values())
    assert result["is_copy"][:n_copies].all(), dict(zip(range(n_copies), result["similarity"][:n_copies]))
    assert not result["is_copy"][n_copies:].any(), result["similarity"][n_copies:].max()
    # each copy's nearest training image is the one it was made from
    sources = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]
    assert result["nearest_train"][:n_copies].tolist() == sources
    assert result["copies_per_train_image"].tolist() == [2, 2, 2, 1, 1, 1, 1, 1, 1, 0]
    assert result["copy_rate"]["copies"] == n_copies and result["copy_rate"]["ci_low"] < n_copies / len(generated)


def test_the_threshold_keeps_its_false_positive_rate_on_new_held_out_images(sets):
    """Calibrated at 0.95 on 100 held-out phantoms: of 100 other held-out phantoms about 5% come closer (binomial
    tolerance), and the rate the calibration states is measured (halves), not assumed."""
    train, heldout, _, _ = sets
    calibration = calibrate(nearest(aligned_pixel_similarity(heldout[:100], train))[1], quantile=0.95)
    fresh = nearest(aligned_pixel_similarity(heldout[100:], train))[1]
    assert np.mean(fresh > calibration.threshold) <= 0.12
    assert 0.0 <= calibration.false_positive_rate <= 0.12 and calibration.n_heldout == 100


def test_calibration_on_a_known_distribution_states_the_right_rate():
    values = np.random.default_rng(1).normal(size=4000)
    calibration = calibrate(values, quantile=0.95)
    assert abs(calibration.threshold - 1.645) < 0.1 and abs(calibration.false_positive_rate - 0.05) < 0.01


def test_too_few_held_out_images_are_refused_naming_the_need():
    assert min_heldout(0.99) == 200
    with pytest.raises(MetricInputError, match="50 held-out images: .* 0.99 quantile needs at least 200"):
        calibrate(np.zeros(50), quantile=0.99)


def test_feature_space_similarity_and_self_exclusion():
    feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    sim = cosine_similarity(feats, feats)
    index, value = nearest(sim, exclude_self=True)
    assert index.tolist() == [1, 0, 1] and value[0] == pytest.approx(sim[0, 1])


def test_training_and_held_out_sets_sharing_a_patient_are_refused_naming_them():
    import pandas as pd

    from datamodules.mimic_cxr import MIMICDataError, check_patient_disjoint

    train = pd.DataFrame({"dicom_id": ["a", "b", "c"], "subject_id": [10000001, 10000002, 10000003]})
    other = pd.DataFrame({"dicom_id": ["d", "e"], "subject_id": [10000003, 10000009]})
    with pytest.raises(MIMICDataError, match=r"training and validation images share 1 patient\(s\), subject_id \[10000003\]"):
        check_patient_disjoint(train, other, "root: the training and validation images")
    check_patient_disjoint(train, other.iloc[1:], "disjoint sets pass")


# ---------------------------------------------------------------------------------------------- evaluate.py memorization
@pytest.fixture(scope="module")
def heldout_root(tmp_path_factory):
    """Other patients' phantoms (another seed), with enough test-split images to calibrate at the 0.9 quantile."""
    from synthetic.phantoms import write_phantom_mimic

    root = tmp_path_factory.mktemp("heldout") / "mimic"
    write_phantom_mimic(root, n_per_finding={"No Finding": 60, "Pleural Effusion": 60}, size=64, seed=11)
    return root


def audit_args(run, out, *extra):
    return ["--runs", str(run), "--out", str(out), "--features", "pixel", "--quantile", "0.9", *extra]


def test_the_audit_flags_copied_training_images_and_writes_its_report(reference_run, heldout_root, tmp_path):
    """A folder holding three training images (one shifted, one with its contrast changed) and three images of other
    patients (the held-out root's validation split, not used for calibration):
    the audit from the run's data.json calls exactly the three copies copies, and writes every output."""
    import json

    from PIL import Image

    from datamodules.study_images import load_images, select_mimic
    from evaluation.memorization_study import main

    data = json.loads((reference_run / "data.json").read_text())
    records = select_mimic(data["root"], None, 0, "all")
    records = records[records["dicom_id"].isin([r["dicom_id"] for r in data["train"][:3]])]
    _, train, _ = load_images(records, data["resolution"])
    _, new, _ = load_images(select_mimic(heldout_root, 3, 0, "validate"), data["resolution"])  # other patients, unseen
    made = [train[0], np.roll(train[1], (2, -2), (0, 1)), np.clip(0.7 * train[2].astype(float) + 40, 0, 255), *new]
    folder = tmp_path / "generated"
    folder.mkdir()
    for i, image in enumerate(made):
        Image.fromarray(np.asarray(image).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "audit"
    assert main(audit_args(reference_run, out, "--generated", str(folder), "--heldout_root", str(heldout_root))) == 0
    table = pd.read_csv(out / "memorization.csv").sort_values("image_id")
    assert table["copy"].tolist() == [True, True, True, False, False, False]
    report = (out / "memorization.md").read_text()
    assert "3 | 50.0% [" in report and "the 0.9 quantile of the held-out images' nearest-training similarities" in report
    assert (out / "closest_pairs.png").is_file() and (out / "similarities.png").is_file()
    assert json.loads((out / "provenance.json").read_text())["records"][0]["what"] == "study/memorization"
    assert main(audit_args(reference_run, out, "--generated", str(folder), "--heldout_root", str(heldout_root))) == 2  # kept


def test_the_audit_refuses_bad_input_clearly(reference_run, heldout_root, tmp_path, capsys):
    import gzip

    from evaluation.memorization_study import main

    (tmp_path / "no_data").mkdir()
    assert main(audit_args(tmp_path / "no_data", tmp_path / "a")) == 2
    assert "data.json: missing" in capsys.readouterr().err
    assert main(audit_args(reference_run, tmp_path / "b", "--quantile", "0.99", "--heldout_root", str(heldout_root))) == 2
    assert "needs at least 200" in capsys.readouterr().err
    # a held-out split that holds a training patient
    import json
    import shutil

    data = json.loads((reference_run / "data.json").read_text())
    overlap = tmp_path / "overlap"
    shutil.copytree(data["root"], overlap)
    split = pd.read_csv(overlap / "mimic-cxr-2.0.0-split.csv.gz")
    split.loc[split["dicom_id"] == data["train"][0]["dicom_id"], "split"] = "test"
    with gzip.open(overlap / "mimic-cxr-2.0.0-split.csv.gz", "wt") as fh:
        split.to_csv(fh, index=False)
    with pytest.raises(Exception, match=rf"share 1 patient\(s\), subject_id \[{data['train'][0]['subject_id']}\]"):
        main(audit_args(reference_run, tmp_path / "c", "--heldout_root", str(overlap)))
