"""Unit behaviour of small parts the end-to-end tests otherwise reach only in the slow tier: the step progress bar, the
utility study's labelled batches, the memorization report's figures and the reproduction summary's tables."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch


def test_the_progress_bar_shows_the_step_of_max_steps_and_hides_the_version():
    from callbacks.progress import _StepMetrics

    class Base:
        def get_metrics(self, trainer, module):
            return {"v_num": 3, "train/loss": 0.5}

    class Bar(_StepMetrics, Base):
        pass

    shown = Bar().get_metrics(SimpleNamespace(global_step=120, max_steps=400), None)
    assert shown == {"step": "120/400", "train/loss": 0.5}
    assert "step" not in Bar().get_metrics(SimpleNamespace(global_step=5, max_steps=-1), None)  # epoch-bounded run


def test_labelled_batches_are_the_same_for_one_seed_and_bad_shapes_are_named():
    from datamodules.labelled_images import LabelledImages, LabelledImagesError

    images = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4)
    labels = (np.arange(10) % 2)[:, None]

    def batches(seed):
        return [b[0].clone() for b in LabelledImages(images, labels, steps=3, batch_size=4, seed=seed).train_dataloader()]

    first, again, other = batches(0), batches(0), batches(1)
    assert len(first) == 3 and all(len(b) == 4 for b in first)  # the budget: exactly steps × batch_size images
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not all(torch.equal(a, b) for a, b in zip(first, other))
    with pytest.raises(LabelledImagesError, match=r"images: expected uint8 \[N, H, W\], got float64"):
        LabelledImages(images.astype(float), labels, steps=1)
    with pytest.raises(LabelledImagesError, match=r"labels: expected \[10, F\], got \(9, 1\)"):
        LabelledImages(images, labels[:9], steps=1)
    with pytest.raises(LabelledImagesError, match="a training budget of 0 steps"):
        LabelledImages(images, labels, steps=0)


def test_the_memorization_figures_read_only_the_training_images_they_show_and_say_when_training_is_sampled(tmp_path,
                                                                                                        monkeypatch):
    from PIL import Image

    from evaluation.memorization_report import pairs_figure, similarity_histogram

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"model": ["a"] * 5 + ["b"] * 5, "seed": list(range(5)) * 2,
                          "train_similarity": np.linspace(0.5, 0.99, 10), "nearest_train": [f"dicom{i:04d}" for i in range(10)],
                          "copy": [False] * 9 + [True]})
    pools = {m: rng.integers(0, 256, (5, 16, 16), dtype=np.uint8) for m in ("a", "b")}
    asked = []

    def read_train(ids):
        asked.append(list(ids))
        return rng.integers(0, 256, (len(ids), 16, 16), dtype=np.uint8)

    pairs_figure(table, pools, read_train, tmp_path / "pairs.png", n=3)
    assert asked == [["dicom0009", "dicom0008", "dicom0007"]]  # the three closest pairs, nothing else read
    assert Image.open(tmp_path / "pairs.png").size[0] > 32
    import matplotlib.pyplot as plt

    labels = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (labels.extend(fig.axes[0].get_legend_handles_labels()[1]), close(fig)))
    similarity_histogram(table, rng.uniform(0.4, 0.9, 50), rng.uniform(0.4, 0.9, 20), 0.95, tmp_path / "hist.png",
                         train_of=1000)
    assert (tmp_path / "hist.png").is_file()
    assert "training (self excluded, a random 20 of 1000) (N=20)" in labels and "held-out (other patients) (N=50)" in labels


def test_the_reproduction_summary_tables_say_n_a_and_name_a_missing_table(tmp_path):
    from evaluation.reproduction_summary import markdown_table, read_table

    df = pd.DataFrame({"fid": [1.23456, float("nan")], "note": ["x", None]}, index=pd.Index(["unet", "ti"], name="strategy"))
    assert markdown_table(df, index=True).splitlines() == ["| strategy | fid | note |", "|---|---|---|",
                                                           "| unet | 1.23 | x |", "| ti | n/a | n/a |"]
    with pytest.raises(FileNotFoundError, match=r"studies/vae/table1.csv: missing; the study that writes it did not finish"):
        read_table(tmp_path, "studies/vae/table1.csv", 0)


def test_data_json_is_written_by_global_rank_zero_for_training_data_only(tmp_path):
    import json

    from callbacks.manifest import DataManifest
    from core.run_folder import RunFolder

    class Data:  # what datamodules.contract.TrainingData asks for, and a manifest
        def training_prompts(self): return []
        def training_findings(self): return ["No Finding"]
        def training_images(self): return None
        def training_captions(self): return None
        def use_prepared(self, prepared): pass
        def manifest(self): return {"train": [{"dicom_id": "d1"}]}

    for rank_zero, datamodule, name in ((False, Data(), "rank1"), (True, object(), "other"), (True, Data(), "zero")):
        run = RunFolder(tmp_path / name)
        DataManifest(run).on_train_start(SimpleNamespace(is_global_zero=rank_zero, datamodule=datamodule), None)
        assert run.data_file.is_file() == (name == "zero")
    assert json.loads(RunFolder(tmp_path / "zero").data_file.read_text())["train"] == [{"dicom_id": "d1"}]
