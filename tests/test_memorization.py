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


@pytest.mark.slow
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


def test_blockwise_nearest_neighbours_equal_the_dense_ones(sets):
    """Nearest neighbours 3 × 3 similarities at a time (running max and argmax over blocks) are the dense matrix's: in
    pixel space (shift alignment per block), in feature space, and leaving a sampled set's self out. The same
    neighbours, exactly; the same similarities up to the rounding of a matrix product of another shape (BLAS rounds a
    3-row product otherwise than a 12-row one: up to 4e-6 seen in float32 pixels, 1e-13 in float64 features)."""
    from metrics.memorization import SimilaritySpace, nearest_blockwise

    train, heldout, _, _ = sets
    space = SimilaritySpace("pixel")
    t, h = (space.embed((x * 255).round().astype(np.uint8)) for x in (train, heldout[:12]))
    dense = nearest(aligned_pixel_similarity(h, t))
    for got, want in ((space.nearest(h, t, block=3), dense), (space.nearest(t, t, block=3, exclude=np.arange(10)),
                                                            nearest(aligned_pixel_similarity(t, t), exclude_self=True))):
        assert np.array_equal(got[0], want[0]) and np.allclose(got[1], want[1], rtol=0, atol=1e-5)
    a, b = np.random.default_rng(2).normal(size=(50, 8)), np.random.default_rng(3).normal(size=(37, 8))
    rows = np.array([3, 10, 36])
    index, value = nearest_blockwise(cosine_similarity, b[rows], b, exclude=rows, block=4)
    want = nearest(cosine_similarity(b, b), exclude_self=True)
    assert np.array_equal(index, want[0][rows]) and np.allclose(value, want[1][rows], rtol=0, atol=1e-12)
    index, value = nearest_blockwise(cosine_similarity, a, b, block=4)
    want = nearest(cosine_similarity(a, b))
    assert np.array_equal(index, want[0]) and np.allclose(value, want[1], rtol=0, atol=1e-12)
    index, value = nearest_blockwise(cosine_similarity, a, b[:0])  # no keys (a rank without training images)
    assert (index == -1).all() and np.isneginf(value).all()


def test_the_audit_takes_blockwise_neighbours_with_the_training_set_size(sets):
    """What the study passes (nearest neighbours found blockwise, the number of training images) gives the dense
    matrix's verdicts; without that number, or without any calibration, the audit says what is missing."""
    from metrics.memorization import SimilaritySpace

    train, heldout, copies, new = sets
    generated = np.concatenate([copies["exact"], new[:5]])
    space = SimilaritySpace("pixel")
    t, g = (space.embed((x * 255).round().astype(np.uint8)) for x in (train, generated))
    dense = audit(aligned_pixel_similarity(generated, train), aligned_pixel_similarity(heldout, train), quantile=0.99)
    blockwise = audit(space.nearest(g, t, block=4), None, calibration=dense["calibration"], n_train=len(train))
    assert blockwise["is_copy"].tolist() == dense["is_copy"].tolist() == [True] * 3 + [False] * 5
    assert blockwise["copies_per_train_image"].tolist() == dense["copies_per_train_image"].tolist()
    with pytest.raises(MetricInputError, match="pass n_train, the number of training images"):
        audit(space.nearest(g, t), None, calibration=dense["calibration"])
    with pytest.raises(MetricInputError, match="heldout_to_train is None and no calibration given"):
        audit(space.nearest(g, t), None, n_train=len(train))


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


@pytest.mark.slow
def test_the_audit_flags_copied_training_images_and_writes_its_report(reference_run, heldout_root, tmp_path, monkeypatch):
    """A folder holding three training images (one shifted, one with its contrast changed) and three images of other
    patients (the held-out root's validation split, not used for calibration):
    the audit from the run's data.json calls exactly the three copies copies, and writes every output. It streams:
    real images are read 4 at a time and never kept, similarities computed 4 × 4 at a time (no train × train matrix)."""
    import json

    from PIL import Image

    import evaluation.memorization_study as study
    import metrics.memorization as memorization
    from datamodules.study_images import load_images, select_mimic
    from evaluation.memorization_study import main

    monkeypatch.setattr(memorization, "CHUNK", 4)
    monkeypatch.setattr(memorization, "BLOCK", 4)
    read, shapes = [], []
    monkeypatch.setattr(study, "load_images", lambda records, *a, **k: (read.append(records), load_images(records, *a, **k))[1])
    similarity = memorization.SimilaritySpace.similarity
    monkeypatch.setattr(memorization.SimilaritySpace, "similarity",
                        lambda self, a, b: (shapes.append((len(a), len(b))), similarity(self, a, b))[1])

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
    record = json.loads((out / "provenance.json").read_text())["records"][0]
    n_train = len(data["train"])
    *real, figure = [r for r in read if "subject_id" in r.columns]  # training, held-out; the pairs figure's last
    assert max(map(len, real)) <= 4 and sum(map(len, real)) == n_train + record["inputs"]["heldout_images"] > 8
    assert len(figure) <= 8 and shapes and max(a for a, _ in shapes) <= 4 and max(b for _, b in shapes) <= 4
    assert record["what"] == "study/memorization"
    assert record["inputs"]["train_self_sample"] == {"images": n_train, "of": n_train, "seed": 0}  # all: fewer than 2,000
    assert main(audit_args(reference_run, out, "--generated", str(folder), "--heldout_root", str(heldout_root))) == 2  # kept


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_each_rank_of_the_monitor_reads_and_keeps_only_its_share_of_the_training_images(heldout_root, tmp_path, monkeypatch):
    """Under DDP rank r embeds training images r, r + 2, ..., 2 at a time: no rank holds every training image, or its
    pixels (the nearest-neighbour maxima are combined over ranks at each check: the two-rank test below checks the
    counts, tests/test_fid_callback.py runs it in a DDP fit)."""
    from types import SimpleNamespace

    import metrics.memorization as memorization
    from callbacks.memorization import MemorizationMonitor
    from datamodules.mimic_cxr import MIMICCXRDataModule

    monkeypatch.setattr(memorization, "CHUNK", 2)
    dm = MIMICCXRDataModule(root=str(heldout_root), findings=FINDINGS, resolution=64, batch_size=2, max_train_images=7,
                            cache_dir=str(tmp_path / "cache"))
    train = [r["dicom_id"] for r in dm.manifest()["train"]]
    read_images, reads = dm.read_images, []
    monkeypatch.setattr(dm, "read_images", lambda ids: (reads.append(list(ids)), read_images(ids))[1])
    for rank in (0, 1):
        reads.clear()
        monitor = MemorizationMonitor(n_per_prompt=2, threshold=0.5)
        monitor.setup(SimpleNamespace(world_size=2, global_rank=rank, datamodule=dm), None, "fit")
        assert sum(reads, []) == train[rank::2] and max(map(len, reads)) == 2


class CopyingModule:
    """Stands in for a DiffusionModule at a check: seed ``s`` of prompt ``p`` is an exact copy of training phantom
    ``COPIED[p][s // 2]`` when ``s`` is even, and noise when odd (so under 2 ranks rank 0 generates every copy)."""

    COPIED = {"a": [0, 1], "b": [3, 4]}  # training phantoms 0 and 4 lie in rank 0's shard, 1 and 3 in rank 1's
    training = True
    weights_in_use = "trained"

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def generator(self):
        from types import SimpleNamespace

        return SimpleNamespace(paper_prompt=lambda prompt: prompt)

    def generate(self, prompts, seeds, **_):
        train = phantoms(range(6), size=64)
        images = [torch.from_numpy(train[self.COPIED[p][s // 2]]) if s % 2 == 0 else
                  torch.from_numpy(np.random.default_rng(100 + s + 10 * len(p)).random((64, 64), dtype=np.float32))
                  for p, s in zip(prompts, seeds)]
        return torch.stack(images)[:, None].expand(-1, 3, -1, -1)


def monitor_on_shard(rank: int, world: int):
    """A monitor holding training phantoms ``rank, rank + world, ...`` of 6, and the trainer it sees."""
    from types import SimpleNamespace

    from callbacks.memorization import MemorizationMonitor
    from metrics.memorization import SimilaritySpace

    monitor = MemorizationMonitor(n_per_prompt=4, prompts=["a", "b"], threshold=0.9, steps=1)
    monitor._space = SimilaritySpace("pixel")
    monitor._train = monitor._space.embed((phantoms(range(6), size=64)[rank::world] * 255).round().astype(np.uint8))
    strategy = None
    if world > 1:  # Lightning's own DDP reduce and all_gather, on the gloo group the caller started
        from lightning.fabric.plugins.environments import LightningEnvironment
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(parallel_devices=[torch.device("cpu")] * world, cluster_environment=LightningEnvironment(),
                               process_group_backend="gloo")
    return monitor, SimpleNamespace(world_size=world, global_rank=rank, strategy=strategy)


def monitor_rank_main(rank: int, world: int, out) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=(out / "port").read_text(), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        monitor, trainer = monitor_on_shard(rank, world)
        heldout = monitor._space.embed((phantoms([0, 3, 1000, 1001], size=64) * 255).round().astype(np.uint8))
        result = {"check": monitor._check(trainer, CopyingModule()),
                  "nearest": monitor._nearest_similarity(trainer, heldout).tolist()}
        (out / f"monitor.{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_disjoint_shards_count_the_copies_a_single_process_counts(tmp_path):
    """Two gloo ranks, each holding half the training phantoms and generating half the images (rank 0 every copy, of
    training images in either shard): through Lightning's all_gather and all-reduce max both ranks find each image's
    nearest training image over both shards, so both count the 4 copies of 8 that one process holding every training
    image counts, with the same similarities (a per-rank count against its own shard would find 2)."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        (tmp_path / "port").write_text(str(s.getsockname()[1]))
    # spawn, not fork: a child forked after this process ran torch's OpenMP pool hangs in its first parallel op
    mp.start_processes(monitor_rank_main, args=(2, tmp_path), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"monitor.{r}.json").read_text()) for r in (0, 1)]
    monitor, trainer = monitor_on_shard(0, 1)
    copies, count, total = monitor._check(trainer, CopyingModule())
    heldout = monitor._space.embed((phantoms([0, 3, 1000, 1001], size=64) * 255).round().astype(np.uint8))
    single = monitor._nearest_similarity(trainer, heldout)
    assert (copies, count) == (4, 8)
    for rank in ranks:
        assert rank["check"][:2] == [copies, count] and rank["check"][2] == pytest.approx(total, abs=1e-9)
        assert np.allclose(rank["nearest"], single, rtol=0, atol=1e-12) and np.allclose(single[:2], 1.0)


def test_the_monitor_refuses_what_it_cannot_calibrate(phantom_root, tmp_path):
    from callbacks.memorization import MemorizationMonitor

    with pytest.raises(ValueError, match=r"validation image\(s\) of the training findings; calibrating the copy threshold "
                                         r"at quantile 0.99 needs at least 200.*--calibrate_only"):
        monitor_fit(phantom_root, tmp_path, MemorizationMonitor(quantile=0.99))
    with pytest.raises(ValueError, match=r"validation image\(s\) are training images .* give the monitor a threshold"):
        monitor_fit(phantom_root, tmp_path, MemorizationMonitor(quantile=0.5), val_split="train")
    with pytest.raises(ValueError, match="stop_above 1.5"):
        MemorizationMonitor(stop_above=1.5)


@pytest.mark.slow
def test_the_audit_takes_an_export_with_the_run_it_came_from(reference_run, reference_export, heldout_root, tmp_path, capsys):
    from evaluation.memorization_study import main

    export = reference_export  # load_run(RunFolder(reference_run), "last")[0].export(...), shared with test_generate.py
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


def test_the_monitor_samples_a_textual_inversion_run_through_its_token(phantom_root, tmp_path):
    """The monitor asks a textual-inversion model what FIDCallback asks it (the training prompt with the token for "lung
    xray"). The learning rate is 0, so only the token's row, moved between the two checks, can change what it samples."""
    from lightning.pytorch import Callback

    from callbacks.memorization import MemorizationMonitor
    from conftest import phantom_dm, quiet_trainer
    from lightning_modules.textual_inversion import TextualInversion

    class MoveTheRow(Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            if trainer.global_step == 1:  # after the monitor's first check
                with torch.no_grad():
                    rows = module.token_embedding.new_rows
                    rows.add_(10 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)))

    monitor = MemorizationMonitor(every_n_steps=1, n_per_prompt=1, max_prompts=1, threshold=0.5, steps=2)
    module = TextualInversion(model={"pretrained": "tiny-random"}, learning_rate=0.0, weight_decay=0.0)
    quiet_trainer(2, callbacks=[monitor, MoveTheRow()], default_root_dir=str(tmp_path)).fit(
        module, datamodule=phantom_dm(phantom_root, tmp_path))
    assert monitor.prompts == ["a photo of a lung xray"]  # the datamodule's words; the module maps them to its token
    first, second = pd.read_csv(tmp_path / "memorization_monitor.csv")["mean_train_similarity"].tolist()
    assert first != second
