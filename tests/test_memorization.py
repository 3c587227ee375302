"""The memorization criterion (metrics/memorization.py) on constructed sets: copies are caught, new images are not, and
the calibrated threshold keeps the false-positive rate it states."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

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
    assert main(audit_args(reference_run, tmp_path / "d", "--features", "image_encoder", "--heldout_root", str(heldout_root))) == 2
    assert "--features image_encoder needs --image_encoder ID_OR_FOLDER" in capsys.readouterr().err
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


# ---------------------------------------------------------------------------------------------- MemorizationMonitor
def monitor_fit(root, tmp_path, monitor, steps: int = 2, **data):
    """A 64-px U-Net fit on 4 training phantoms of ``root`` with ``monitor``, a CSV logger and train.py's checkpoint
    callback; returns the trainer."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from callbacks.checkpointing import RunCheckpoint
    from datamodules.mimic_cxr import MIMICCXRDataModule
    from lightning_modules.unet import UNetFineTuning

    dm = MIMICCXRDataModule(root=str(root), findings=FINDINGS, resolution=64, batch_size=2, max_train_images=4,
                            cache_dir=str(tmp_path / "cache"), **data)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=CSVLogger(tmp_path, name="log"), enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path),
                      callbacks=[monitor, RunCheckpoint(tmp_path / "last.ckpt", every_n_steps=0)], enable_checkpointing=False)
    trainer.fit(UNetFineTuning(model={"pretrained": "tiny-phantom"}), dm)
    return trainer


def test_the_monitor_calibrates_on_validation_images_and_logs_the_copy_rate(heldout_root, tmp_path):
    from callbacks.memorization import MemorizationMonitor

    monitor = MemorizationMonitor(every_n_steps=1, n_per_prompt=2, quantile=0.9, steps=2)
    monitor_fit(heldout_root, tmp_path, monitor)
    table = pd.read_csv(tmp_path / "memorization_monitor.csv")
    assert table["step"].tolist() == [1, 2] and set(table["n"]) == {4}  # 2 images × 2 training prompts
    assert table["copy_rate"].between(0, 1).all() and not table["stopped"].any()
    assert table["threshold_source"][0].startswith("quantile 0.9 of ") and "validation images" in table["threshold_source"][0]
    logged = pd.read_csv(next((tmp_path / "log").rglob("metrics.csv")))
    assert logged["memorization/copy_rate"].dropna().tolist() == table["copy_rate"].tolist()
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]  # no training features: patient pixels
    assert all(state == {} for key, state in saved.items() if "MemorizationMonitor" in key)


def test_the_monitor_stops_a_copying_run_with_a_checkpoint_and_says_why(heldout_root, tmp_path, capsys):
    """A threshold every image passes: the copy rate is 1, above ``stop_above``, so the run stops at the first check."""
    from callbacks.memorization import MemorizationMonitor

    monitor = MemorizationMonitor(every_n_steps=2, n_per_prompt=1, threshold=-1.0, stop_above=0.5, steps=2)
    trainer = monitor_fit(heldout_root, tmp_path, monitor, steps=6)
    assert trainer.global_step == 2 and monitor.stopped_at == 2
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2
    assert "copy rate 1.000 (2/2 generated images closer to a training image than -1.0000) passed stop_above=0.5 at step 2" \
        in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "memorization_monitor.csv")["stopped"].tolist() == [True]


def test_the_monitor_refuses_what_it_cannot_calibrate(phantom_root, tmp_path):
    from callbacks.memorization import MemorizationMonitor

    with pytest.raises(ValueError, match=r"validation image\(s\) of the training findings; calibrating the copy threshold "
                                         r"at quantile 0.99 needs at least 200.*--calibrate_only"):
        monitor_fit(phantom_root, tmp_path, MemorizationMonitor(quantile=0.99))
    with pytest.raises(ValueError, match=r"validation image\(s\) are training images .* give the monitor a threshold"):
        monitor_fit(phantom_root, tmp_path, MemorizationMonitor(quantile=0.5), val_split="train")
    with pytest.raises(ValueError, match="stop_above 1.5"):
        MemorizationMonitor(stop_above=1.5)


def test_the_audit_takes_an_export_with_the_run_it_came_from(reference_run, heldout_root, tmp_path, capsys):
    from core.run_folder import RunFolder
    from evaluation.memorization_study import main
    from lightning_modules.runs import load_run

    module, _ = load_run(RunFolder(reference_run), "last")
    export = module.export(tmp_path / "export")
    args = ["--n_per_prompt", "1", "--steps", "2", "--heldout_root", str(heldout_root)]
    assert main(audit_args(export, tmp_path / "a", *args)) == 2
    assert "an export holds no data.json" in capsys.readouterr().err
    assert main(audit_args(export, tmp_path / "b", "--train_data", str(reference_run / "data.json"), *args)) == 0
    table = pd.read_csv(tmp_path / "b" / "memorization.csv")
    assert table["model"].tolist() == ["Stable Diffusion (base)"] * 2 + ["export"] * 2  # --base auto: from export.json


def test_an_image_encoder_folder_is_a_feature_space_and_a_missing_one_is_named(tiny_dinov2):
    from metrics.features import ImageEncoderError, feature_extractor
    from metrics.memorization import SimilaritySpace

    extractor = feature_extractor("image_encoder", model=str(tiny_dinov2))
    assert extractor.num_features == 32 and extractor.size == 32
    images = (phantoms(range(3), size=64) * 255).astype(np.uint8)
    space = SimilaritySpace("image_encoder", model=str(tiny_dinov2))
    features = space.embed(images)
    assert features.shape == (3, 32) and "image_encoder features" in space.name
    assert np.allclose(np.diag(space.similarity(features, features)), 1.0)
    with pytest.raises(ImageEncoderError, match=r"image encoder microsoft/rad-dino: 'microsoft/rad-dino' is neither a folder "
                                                r"nor in the Hugging Face cache.*huggingface-cli download microsoft/rad-dino"):
        feature_extractor("image_encoder", model="microsoft/rad-dino")
