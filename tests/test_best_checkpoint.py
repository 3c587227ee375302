"""best.ckpt: the best validation metric among the checkpoints whose monitored copy rate is within a limit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from callbacks.best_checkpoint import BestCheckpoint, BestCheckpointError
from conftest import REPO, demo_args, run_train


def test_the_rule_takes_the_lowest_metric_among_checks_within_the_limit_and_survives_a_resume():
    best = BestCheckpoint(copy_rate_limit=0.1, metric="val/fid")
    check = lambda step, rate: {"step": step, "copy_rate": rate}
    assert best.metric_value({"val/fid/a": 30.0, "val/fid/b": 50.0, "val/loss": 0.1}) == 40.0  # the prompts' mean
    assert best.consider(100, 80.0, check(100, 0.0))            # the first eligible one
    assert best.consider(200, 60.0, check(200, 0.05))           # lower and within the limit
    assert not best.consider(300, 40.0, check(300, 0.25))       # lower, but it copies
    assert not best.consider(400, 50.0, check(300, 0.0))        # no check at its own step
    assert not best.consider(500, 70.0, check(500, 0.0))        # within the limit, but worse
    assert best.best == {"step": 200, "value": 60.0, "copy_rate": 0.05}
    assert [c["why_not"] for c in best.candidates] == [None, None, "copy rate above 0.1", "no copy-rate check at this step", None]
    resumed = BestCheckpoint(copy_rate_limit=0.1, metric="val/fid")
    resumed.load_state_dict(best.state_dict())
    assert not resumed.consider(600, 65.0, check(600, 0.0)) and resumed.consider(700, 55.0, check(700, 0.0))

    highest = BestCheckpoint(copy_rate_limit=1.0, metric="val/auroc", mode="max")
    assert highest.consider(1, 0.6, check(1, 0.0)) and highest.consider(2, 0.7, check(2, 0.0))
    for bad, message in (({"copy_rate_limit": 1.5}, "copy_rate_limit: 1.5; expected a fraction from 0 to 1"),
                         ({"copy_rate_limit": 0.1, "mode": "lowest"}, "mode: 'lowest'; expected min or max")):
        with pytest.raises(BestCheckpointError, match=message):
            BestCheckpoint(**bad)


@pytest.mark.slow
def test_a_run_keeps_best_ckpt_and_export_ckpt_best_exports_it_with_the_rule(tmp_path):
    callbacks = tmp_path / "best.yaml"
    callbacks.write_text("""trainer:
  max_steps: 4
  val_check_interval: 2
  limit_val_batches: 1
  callbacks:
    - class_path: callbacks.memorization.MemorizationMonitor
      init_args: {every_n_steps: 2, n_per_prompt: 1, threshold: 1.0, steps: 2}
    - class_path: callbacks.best_checkpoint.BestCheckpoint
      init_args: {copy_rate_limit: 0.0, metric: val/loss}
""")
    run_train(*demo_args(tmp_path, "--config", str(callbacks), "--run_name", "best"))
    run = tmp_path / "runs" / "best"
    record = json.loads((run / "best.json").read_text())
    steps = [c["step"] for c in record["candidates"]]
    assert steps == [2, 4] and all(c["copy_rate"] == 0.0 and c["eligible"] for c in record["candidates"])
    lowest = min(record["candidates"], key=lambda c: c["value"])
    assert record["chosen_step"] == lowest["step"] and record["rule"].startswith("the lowest val/loss among the validations")
    assert torch.load(run / "checkpoints" / "best.ckpt", weights_only=False, map_location="cpu")["global_step"] == lowest["step"]

    out = tmp_path / "export"
    done = subprocess.run([sys.executable, str(REPO / "export.py"), str(run), str(out), "--ckpt", "best"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["checkpoint_selection"]["chosen_step"] == lowest["step"]
    assert f"step {lowest['step']}: the lowest val/loss" in (out / "README.md").read_text()



def test_best_without_a_monitor_or_without_a_best_ckpt_is_one_line_saying_why(tmp_path):
    from types import SimpleNamespace

    from core.run_folder import RunFolder, RunFolderError

    with pytest.raises(BestCheckpointError, match="BestCheckpoint needs a MemorizationMonitor in trainer.callbacks"):
        BestCheckpoint(copy_rate_limit=0.05).setup(SimpleNamespace(callbacks=[]), None, "fit")

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunFolderError, match="no best.ckpt: the run has no BestCheckpoint callback"):
        RunFolder(run).checkpoint("best")
    (run / "best.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"no best.ckpt: no validation met its copy-rate limit \(see best.json\)"):
        RunFolder(run).checkpoint("best")
