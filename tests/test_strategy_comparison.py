"""benchmarks/strategy_comparison.py compares the strategies on both phantom-trained bases in one table with a base
column (tiny-phantom, Stable Diffusion; tiny-phantom-sana, Sana): each base's own row, the selected strategy's row, the
JSON fields a reader of comparison.json relies on, the cached-run reuse, and a one-line error for an unknown base."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "strategy_comparison.py"


def comparison(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one torch thread is the faster on shared cores
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lora4(tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    proc = comparison("--out", str(out), "--steps", "2", "--n", "4", "--only", "lora4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.slow
def test_one_strategy_on_both_bases_gives_a_row_per_base_and_model(lora4):
    out, proc = lora4
    rows = json.loads((out / "comparison.json").read_text())
    assert [(r["base"], r["model"]) for r in rows] == [
        ("tiny-phantom", "base (tiny-phantom)"), ("tiny-phantom", "LoRA, rank 4"),
        ("tiny-phantom-sana", "base (tiny-phantom-sana)"), ("tiny-phantom-sana", "LoRA, rank 4")]
    assert [(r["family"], r["sampler"]) for r in rows] == [("stable-diffusion", "ddim")] * 2 + [("sana", "euler")] * 2
    for r in rows:
        assert r["n_per_prompt"] == 4 and r["sampling_steps"] == 25 and r["guidance"] == 4.0
        assert 0.0 <= r["ci_low"] <= r["auroc"] <= r["ci_high"] <= 1.0
    base, tuned = rows[2], rows[3]
    assert (base["strategy"], base["training_steps"]) == ("base", 0) and "checkpoint_mib" not in base
    assert (tuned["strategy"], tuned["ema"], tuned["training_steps"]) == ("lora4", False, 2)
    assert tuned["checkpoint_mib"] > 0 and tuned["seconds_per_step"] > 0
    assert (out / "runs" / "lora_sana_phantom_demo_r4" / "finding_correctness.png").is_file()
    assert (out / "runs" / "lora_unet_demo_r4" / "finding_correctness.png").is_file()
    table = (out / "comparison.md").read_text()
    assert table.startswith("| base | model | training steps | AUROC")
    assert "| tiny-phantom-sana | LoRA, rank 4 | 2 |" in table and "| tiny-phantom | base (tiny-phantom) | – |" in table
    assert "tiny-phantom ddim, tiny-phantom-sana euler" in table and table in proc.stdout


@pytest.mark.slow
def test_a_finished_run_is_reused_and_one_of_another_length_refused(lora4):
    out, _ = lora4
    ckpt = out / "runs" / "lora_sana_phantom_demo_r4" / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    proc = comparison("--out", str(out), "--steps", "2", "--n", "4", "--only", "lora4", "--bases", "tiny-phantom-sana")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ckpt.stat().st_mtime_ns == before
    assert [r["model"] for r in json.loads((out / "comparison.json").read_text())] == ["base (tiny-phantom-sana)", "LoRA, rank 4"]
    # a cached run of another length (a stopped run, or another --steps) is not passed off as this one
    proc = comparison("--out", str(out), "--steps", "3", "--n", "4", "--only", "lora4", "--bases", "tiny-phantom-sana")
    assert proc.returncode != 0 and ckpt.stat().st_mtime_ns == before
    assert f"{ckpt.parents[1]}: its last.ckpt is at step 2, not --steps 3" in proc.stderr.strip().splitlines()[-1]


def test_an_unknown_base_is_one_line_naming_the_value_and_the_choices(tmp_path):
    proc = comparison("--out", str(tmp_path), "--bases", "tiny-phantom-sdxl")
    assert proc.returncode == 2 and not list(tmp_path.iterdir())
    error = proc.stderr.strip().splitlines()[-1]
    assert "--bases" in error and "'tiny-phantom-sdxl'" in error and "'tiny-phantom', 'tiny-phantom-sana'" in error
