"""reproduce.py: the plan, resuming and skipping, SLURM scripts, the hand-picked image helper, and the whole
reproduction at demo scale (the one end-to-end run of all ten training configs and three studies)."""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import reproduce
from datamodules.candidates import propose, read_selection
from datamodules.mimic_cxr import CHEXPERT_CLASSES, MIMICDataError

REPO = Path(__file__).resolve().parents[1]
PAPER_PROMPTS = ["a photo of a lung xray", "a photo of a lung xray with a visible pleural effusion",
                 "a photo in the style of a lung xray"]


# ----------------------------------------------------------------------------------- hand-picked images
def _write_csv_gz(df: pd.DataFrame, path: Path) -> None:
    with gzip.open(path, "wt") as fh:
        df.to_csv(fh, index=False)


def _mimic_csvs(root: Path, rows: list[dict]) -> Path:
    """A MIMIC-CXR-JPG root holding only the three CSVs, one row per image (labels as given, others blank)."""
    root.mkdir(parents=True, exist_ok=True)
    meta = pd.DataFrame([{"dicom_id": r["dicom_id"], "subject_id": r["subject"], "study_id": r["study"],
                          "ViewPosition": r.get("view", "PA")} for r in rows])
    labels = pd.DataFrame([{"subject_id": r["subject"], "study_id": r["study"],
                            **{c: r.get("labels", {}).get(c) for c in CHEXPERT_CLASSES}} for r in rows]).drop_duplicates("study_id")
    split = pd.DataFrame([{"dicom_id": r["dicom_id"], "study_id": r["study"], "subject_id": r["subject"],
                           "split": r.get("split", "train")} for r in rows])
    _write_csv_gz(meta, root / "mimic-cxr-2.0.0-metadata.csv.gz")
    _write_csv_gz(labels, root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    _write_csv_gz(split, root / "mimic-cxr-2.0.0-split.csv.gz")
    return root


def test_candidates_are_frontal_train_single_label_without_devices_one_per_patient(tmp_path):
    eff = {"Pleural Effusion": 1.0}
    rows = [
        {"dicom_id": "nf-pa", "subject": 10000001, "study": 50000001, "labels": {"No Finding": 1.0}},
        {"dicom_id": "nf-ap", "subject": 10000002, "study": 50000002, "view": "AP", "labels": {"No Finding": 1.0}},
        {"dicom_id": "nf-lat", "subject": 10000003, "study": 50000003, "view": "LATERAL", "labels": {"No Finding": 1.0}},
        {"dicom_id": "nf-test", "subject": 10000004, "study": 50000004, "split": "test", "labels": {"No Finding": 1.0}},
        {"dicom_id": "nf-dev", "subject": 10000005, "study": 50000005, "labels": {"No Finding": 1.0, "Support Devices": 1.0}},
        {"dicom_id": "nf-same-patient", "subject": 10000001, "study": 50000006, "labels": {"No Finding": 1.0}},
        {"dicom_id": "eff-only", "subject": 10000007, "study": 50000007, "labels": {**eff, "Cardiomegaly": 0.0}},
        {"dicom_id": "eff-edema", "subject": 10000008, "study": 50000008, "labels": {**eff, "Edema": 1.0}},
        {"dicom_id": "eff-uncertain-other", "subject": 10000009, "study": 50000009, "labels": {**eff, "Atelectasis": -1.0}},
        {"dicom_id": "eff-uncertain", "subject": 10000010, "study": 50000010, "labels": {"Pleural Effusion": -1.0}},
        {"dicom_id": "eff-device", "subject": 10000011, "study": 50000011, "labels": {**eff, "Support Devices": 1.0}},
        {"dicom_id": "eff-ap", "subject": 10000012, "study": 50000012, "view": "AP", "labels": eff},
    ]
    root = _mimic_csvs(tmp_path / "mimic", rows)
    df = propose(root, n=5, k=1, seed=0)
    got = {f: list(part["dicom_id"]) for f, part in df.groupby("finding")}
    assert got["Pleural Effusion"] == ["eff-only", "eff-ap"]  # PA ranks before AP; every other one breaks a rule
    # patient 10000001 has two eligible PA images: one of them (seeded order), then the AP image
    assert got["No Finding"] in (["nf-pa", "nf-ap"], ["nf-same-patient", "nf-ap"])
    assert df.groupby("finding")["subject_id"].apply(lambda s: s.is_unique).all()  # one image per patient
    assert list(df.loc[df["selected"], "dicom_id"]) == [got["No Finding"][0], "eff-only"]
    assert all(p.endswith(".jpg") and "/files/p10/" in p for p in df["path"])
    pd.testing.assert_frame_equal(df, propose(root, n=5, k=1, seed=0))  # deterministic

    with pytest.raises(MIMICDataError, match="only 2 patients .*'No Finding'"):
        propose(root, n=5, k=3)
    with pytest.raises(MIMICDataError, match="'Effusion' is not a CheXpert class"):
        propose(root, findings=["Effusion"])


def test_the_helper_cli_writes_candidates_selection_and_contact_sheets(phantom_root, tmp_path, capsys):
    from datamodules.candidates import main

    assert main(["--mimic", str(phantom_root), "--out", str(tmp_path / "img"), "--n", "4", "--k", "2"]) == 0
    sel = read_selection(tmp_path / "img" / "selected.csv")
    assert sel.groupby("finding").size().to_dict() == {"No Finding": 2, "Pleural Effusion": 2}
    for name in ("contact_sheet_no_finding.png", "contact_sheet_pleural_effusion.png"):
        from PIL import Image

        with Image.open(tmp_path / "img" / name) as im:
            assert im.width == 5 * 192 and im.height > 192
    assert "edit selected.csv" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("dicom,finding\na,No Finding\n", "missing column.*dicom_id"),
    ("dicom_id,finding\na,No Finding\na,Pleural Effusion\n", "listed twice: \\['a'\\]"),
    ("dicom_id,finding\na,Effusion\n", "'Effusion'\\] are not CheXpert classes"),
    ("dicom_id,finding\na,\n", "every row needs a dicom_id and a finding"),
])
def test_a_bad_image_list_is_named(tmp_path, text, message):
    path = tmp_path / "selected.csv"
    path.write_text(text)
    with pytest.raises(MIMICDataError, match=message) as err:
        read_selection(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------------- the plan
@pytest.fixture()
def real_inputs(tmp_path, phantom_root):
    laion = tmp_path / "laion"
    from synthetic.laion import write_synthetic_laion

    write_synthetic_laion(laion, n_captions=20)
    reports = tmp_path / "mimic-cxr-reports"
    (reports / "files").mkdir(parents=True)
    images = tmp_path / "selected.csv"
    images.write_text("dicom_id,finding\nnf1,No Finding\nnf2,No Finding\neff1,Pleural Effusion\n")
    return {"mimic": phantom_root, "laion": laion, "reports": reports, "images": images, "out": tmp_path / "results"}


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = reproduce.main(list(argv))
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def test_dry_run_prints_every_step_with_its_command_and_every_training_command_parses(real_inputs, monkeypatch):
    i = real_inputs
    rc, out, _ = _main("--mimic", str(i["mimic"]), "--laion", str(i["laion"]), "--reports", str(i["reports"]),
                       "--images", str(i["images"]), "--out", str(i["out"]), "--dry-run")
    assert rc == 0
    assert not i["out"].exists()  # a dry run writes nothing
    args = reproduce.build_parser().parse_args(["--mimic", str(i["mimic"]), "--laion", str(i["laion"]), "--reports",
                                                str(i["reports"]), "--images", str(i["images"]), "--out", str(i["out"])])
    reproduce.absolute(args)
    steps = reproduce.build_plan(args)
    names = [s.name for s in steps]
    assert names == ["base"] + [f"train/{r.config}" for r in reproduce.RUNS] + ["study/vae", "study/text-encoders", "study/generation",
                                                                                  "study/memorization", "study/generation-reports",
                                                                                  "study/utility"]
    for n, s in enumerate(steps, 1):
        assert f"{n:2d}. {s.name}  [to run]" in out and s.command() in out
    by = {s.name: s.argv for s in steps}
    assert by["train/unet_no_findings"][by["train/unet_no_findings"].index("--data.init_args.dicom_ids") + 1] == "[nf1, nf2]"
    assert "[nf1, nf2, eff1]" in by["train/unet_prior"] and "[nf1, nf2, eff1]" in by["train/textual_inversion_style_lung"]
    assert "--data.init_args.dicom_ids" not in by["train/projection_token"]
    assert by["train/projection_document"][by["train/projection_document"].index("--data.init_args.data_files") + 1] == str(i["laion"])
    assert by["study/text-encoders"][by["study/text-encoders"].index("--reports") + 1] == str(i["reports"])
    assert all("--ckpt_path" in a and a[a.index("--ckpt_path") + 1] == "last" for n, a in by.items() if n.startswith("train/"))
    assert set(steps[-4].needs) == {f"train/{r.config}" for r in reproduce.RUNS}
    # the audit: every run trained on images (not the caption-trained projections), a command its parser accepts
    from evaluation.memorization_study import build_parser as audit_parser

    assert set(steps[-3].needs) == {f"train/{r.config}" for r in reproduce.RUNS if r.family != "projection"}
    assert audit_parser().parse_args(by["study/memorization"][2:]).max_heldout == 1000
    from evaluation.generation_study import build_parser as generation_parser
    from evaluation.utility_study import build_parser as utility_parser

    reports = generation_parser().parse_args(by["study/generation-reports"][2:])
    assert reports.prompts == ["reports"] and reports.reports_root == str(i["reports"])
    assert utility_parser().parse_args(by["study/utility"][2:]).runs == [str(i["out"] / "runs" / r.config) for r in reproduce.RUNS]

    # every planned training command is accepted by train.py as it stands (keys, types, the config name)
    import train

    monkeypatch.setattr(sys, "argv", ["train.py"])
    for s in steps:
        if not s.name.startswith("train/"):
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_:
            train.main([*s.argv[1:], "--print_config"])
        assert exit_.value.code in (0, None), s.name
        assert f"run_name: {s.name.split('/')[1]}" in buf.getvalue()


def test_bad_driver_inputs_are_named(real_inputs, tmp_path):
    i = real_inputs
    rc, _, err = _main("--out", str(tmp_path / "r"))
    assert rc == 2 and "--mimic and --laion required (or --demo" in err
    rc, _, err = _main("--mimic", str(tmp_path), "--laion", str(i["laion"]), "--out", str(tmp_path / "r"), "--dry-run")
    assert rc == 2 and f"--mimic {tmp_path}: not a MIMIC-CXR-JPG v2.0.0 root" in err
    rc, _, err = _main("--mimic", str(i["mimic"]), "--laion", str(i["laion"]), "--out", str(tmp_path / "r"), "--dry-run")
    assert rc == 2 and "--reports required" in err and "mimic-cxr-reports.zip" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _main("--mimic", str(i["mimic"]), "--laion", str(empty), "--reports", str(i["reports"]), "--out", str(tmp_path / "r"))
    assert rc == 2 and f"--laion {empty}: folder holds no *.parquet files" in err
    only_effusion = tmp_path / "eff.csv"
    only_effusion.write_text("dicom_id,finding\neff1,Pleural Effusion\n")
    rc, _, err = _main("--mimic", str(i["mimic"]), "--laion", str(i["laion"]), "--reports", str(i["reports"]),
                       "--images", str(only_effusion), "--out", str(tmp_path / "r"), "--dry-run")
    assert rc == 2 and f"{only_effusion}: no image for ['No Finding'] (run unet_no_findings)" in err


# ----------------------------------------------------------------------------------- running steps
def _args(out: Path, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{"out": str(out), "only": None, "redo": None, "quiet": True, "demo": False, **kw})


def _py(code: str) -> list[str]:
    return ["-c", code]


def test_steps_run_once_changed_commands_are_refused_and_redo_moves_the_output_aside(tmp_path, capsys):
    out = tmp_path / "results"
    target = tmp_path / "made"
    step = reproduce.Step("one", "writes a file", _py(f"open({str(target)!r}, 'a').write('x')"), "", str(target))
    other = reproduce.Step("two", "needs one", _py("print('two ran')"), "", str(tmp_path / "two"), needs=("one",))
    # --only two without one done: refused, naming what is missing
    with pytest.raises(reproduce.ReproduceError, match=r"two needs \['one'\]"):
        reproduce.execute(_args(out, only=["two"]), [step, other])
    assert reproduce.execute(_args(out), [step, other]) == 0
    assert target.read_text() == "x" and json.loads((out / "steps" / "one.json").read_text())["exit"] == 0
    assert "two ran" in (out / "logs" / "two.log").read_text()
    assert reproduce.execute(_args(out), [step, other]) == 0
    assert target.read_text() == "x"  # skipped: not run twice
    assert "one: done, skipped" in capsys.readouterr().out

    changed = reproduce.Step("one", "writes a file", _py(f"open({str(target)!r}, 'a').write('y')"), "", str(target))
    with pytest.raises(reproduce.ReproduceError, match="one: finished earlier with a different command.*--redo one"):
        reproduce.execute(_args(out), [changed, other])
    assert reproduce.execute(_args(out, redo=["one"]), [changed, other]) == 0
    assert target.read_text() == "y"
    assert [p.read_text() for p in tmp_path.glob("made.old-*")] == ["x"]  # kept aside, not deleted


def test_a_failing_step_stops_the_driver_with_its_log_tail(tmp_path, capsys):
    out = tmp_path / "results"
    bad = reproduce.Step("bad", "fails", _py("import sys; print('the reason it failed'); sys.exit(3)"), "", "")
    after = reproduce.Step("after", "never runs", _py("print('no')"), "", "")
    assert reproduce.execute(_args(out), [bad, after]) == 1
    err = capsys.readouterr().err
    assert "step bad failed (exit 3)" in err and "the reason it failed" in err and str(out / "logs" / "bad.log") in err
    assert not (out / "steps" / "bad.json").exists() and not (out / "logs" / "after.log").exists()


def test_steps_run_side_by_side_on_their_own_gpus_and_a_step_waits_for_what_it_needs(tmp_path):
    out = tmp_path / "results"
    code = ("import json, os, sys, time; t0 = time.time(); time.sleep(1.0); "
            "json.dump([t0, time.time(), os.environ.get('CUDA_VISIBLE_DEVICES')], open(sys.argv[1], 'w'))")
    a = reproduce.Step("a", "first", ["-c", code, str(tmp_path / "a.json")], "", "")
    b = reproduce.Step("b", "second", ["-c", code, str(tmp_path / "b.json")], "", "")
    c = reproduce.Step("c", "needs both", ["-c", code, str(tmp_path / "c.json")], "", "", needs=("a", "b"))
    assert reproduce.execute(_args(out, jobs=2, gpus=["0", "1"]), [c, a, b]) == 0
    (a0, a1, ga), (b0, b1, gb), (c0, c1, gc) = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc"]
    assert b0 < a1 and a0 < b1  # a and b overlapped
    assert c0 >= max(a1, b1)  # c started after both ended
    assert {ga, gb} == {"0", "1"} and gc in ("0", "1")


def test_sigterm_reaches_the_running_step_and_the_driver_exits_143(tmp_path):
    out = tmp_path / "results"
    ready = tmp_path / "ready"
    child = (f"import signal, sys, time, pathlib\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (print('child saved and stopped', flush=True), sys.exit(143)))\n"
             f"pathlib.Path({str(ready)!r}).write_text('1')\ntime.sleep(60)\n")
    driver = (f"import argparse, sys, reproduce\n"
              f"step = reproduce.Step('long', 'waits', ['-c', {child!r}], '', '')\n"
              f"args = argparse.Namespace(out={str(out)!r}, only=None, redo=None, quiet=True, demo=False)\n"
              f"sys.exit(reproduce.execute(args, [step]))\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "Run the same command again to continue" in stderr
    assert "child saved and stopped" in (out / "logs" / "long.log").read_text()
    assert not (out / "steps" / "long.json").exists()  # not done: the next invocation runs it again


def test_slurm_writes_an_array_a_final_job_and_a_submit_script(real_inputs):
    i = real_inputs
    rc, out, _ = _main("--mimic", str(i["mimic"]), "--laion", str(i["laion"]), "--reports", str(i["reports"]),
                       "--out", str(i["out"]), "--slurm", "--slurm_opt", "partition=gpu", "--slurm_time", "04:00:00")
    assert rc == 0 and "submit.sh" in out
    folder = i["out"] / "slurm"
    array, final, submit = [(folder / n).read_text() for n in ("array.sbatch", "final.sbatch", "submit.sh")]
    independent = ["base"] + [f"train/{r.config}" for r in reproduce.RUNS] + ["study/vae", "study/text-encoders"]
    assert f"#SBATCH --array=0-{len(independent) - 1}" in array
    assert "STEPS=(" + " ".join(independent) + ")" in array
    for text in (array, final):
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:TERM@300" in text and "#SBATCH --partition=gpu" in text
        assert "#SBATCH --time=04:00:00" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
        assert f"--out {i['out']}" in text and f"--mimic {i['mimic']}" in text and "--slurm " not in text
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert '--only "$STEP"' in array and "--only" not in final
    assert "--dependency=afterok:" in submit and subprocess.run(["bash", "-n", str(folder / "submit.sh")]).returncode == 0


@pytest.mark.parametrize("signalled", [True, False])
def test_the_slurm_task_passes_sigterm_on_and_requeues_only_after_a_signal(tmp_path, signalled):
    """The scripts' runner under bash, with a stand-in driver and a fake scontrol: SIGTERM to the batch shell (what
    --signal=B:TERM@300 sends) reaches the driver, the shell waits for it to save and exit 143, then requeues the job.
    A driver that finishes normally is not requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.txt"
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" $([ -f {saved} ] && echo after-save || echo before-save) >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    driver = (f"import pathlib, signal, sys, time\n"
              f"def stop(*_):\n    time.sleep(0.5); pathlib.Path({str(saved)!r}).write_text('1'); sys.exit(143)\n"
              f"signal.signal(signal.SIGTERM, stop)\npathlib.Path({str(ready)!r}).write_text('1')\n"
              f"time.sleep(60 if {signalled} else 0.2)\n")
    script = tmp_path / "task.sbatch"
    script.write_text("set -- " + " ".join(map(shlex.quote, [sys.executable, "-c", driver])) + "\n" + reproduce.SLURM_RUNNER)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if signalled:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    if signalled:
        assert proc.returncode == 143 and saved.exists()  # the shell waited for the save, not just for the signal
        assert calls.read_text().split() == ["requeue", "4242", "after-save"] and "requeueing" in out
    else:
        assert proc.returncode == 0 and not calls.exists()


# ----------------------------------------------------------------------------------- the demo, end to end
@pytest.mark.slow
def test_demo_reproduces_every_table_and_figure_and_a_second_run_skips_everything(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "reproduce.py"), "--demo", "--out", str(out), "--jobs", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    summary = json.loads((out / "summary.json").read_text())
    tables = summary["tables"]
    assert set(tables["table1"]["rows"]) == {"Pleural Effusion", "Cardiomegaly"}
    assert {"acc_original_pct", "acc_recon_pct", "f1_original_pct", "f1_recon_pct"} <= set(tables["table1"]["columns"])
    assert tables["table2"]["rows"] == ["tiny-bert", "tiny-cxr-bert", "tiny-phantom"]
    assert tables["table2"]["columns"] == ["CLS hidden state", "Mean hidden states", "Pooler output", "Model specific"]
    assert tables["table3"]["rows"] == ["Cardiomegaly", "No Finding", "Pleural Effusion", "Macro"]
    assert tables["table3"]["columns"] == ["Base", "tiny-bert", "tiny-cxr-bert", "tiny-phantom"]
    assert tables["table4"]["rows"] == ["Stable Diffusion (base)"] + [r.config for r in reproduce.RUNS]
    assert tables["table4"]["columns"] == PAPER_PROMPTS
    table4 = pd.read_csv(out / tables["table4"]["file"], index_col=0)
    assert table4.notna().all().all() and (table4.values >= 0).all()
    figures = {f for fig in summary["figures"] for f in fig["files"]}
    for name in ("studies/generation/figure1.png", "studies/vae/examples.png", "studies/vae/metrics_distribution.png",
                 "studies/generation/figure4.png"):
        assert name in figures and (out / name).stat().st_size > 1000
    memorization = pd.read_csv(out / "studies" / "memorization" / "summary.csv")  # one audit per training set
    assert set(memorization["training set of"]) == {"textual_inversion_object_radiology", "unet_no_findings"}
    assert set(memorization["model"]) == {"Stable Diffusion (base)"} | {r.config for r in reproduce.RUNS if r.family != "projection"}
    assert memorization["copy_rate"].between(0, 1).all()
    md = (out / "summary.md").read_text()
    assert set(pd.read_csv(out / "studies" / "utility" / "utility.csv")["arm"]) == {"a", "b", "c", "d"}
    assert "macro" in set(pd.read_csv(out / "studies" / "generation_reports" / "report_auroc.csv")["finding"])
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Figure 1", "Figure 3", "Figure 4", "Memorization audit",
                  "Report-conditioned generation", "Downstream utility"):
        assert f"## {title}" in md
    assert "**Demo scale**" in md and "Rows beyond the paper" in md and "lora_unet (LoRA on the U-Net (rank 4))" in md

    (prov,) = json.loads((out / "provenance.json").read_text())["records"]
    assert prov["what"] == "reproduce"
    assert len(prov["inputs"]["steps"]) == 19 and all(s["exit"] == 0 and s["argv"] for s in prov["inputs"]["steps"])
    assert prov["git"]["commit"] and prov["packages"]["torch"]
    selected = pd.read_csv(out / "data" / "selected.csv")
    assert prov["inputs"]["image_ids"] == selected.astype(str).to_dict("records")
    for run in reproduce.RUNS:  # each run trained on what it was given, and says so
        data = json.loads((out / "runs" / run.config / "data.json").read_text())
        assert (out / "runs" / run.config / "config.yaml").is_file()
        # runs shorter than checkpoint_every_n_steps leave exactly one last.ckpt (no last-v1.ckpt beside it)
        assert [p.name for p in (out / "runs" / run.config / "checkpoints").iterdir()] == ["last.ckpt"]
        if run.config == "projection_none":  # the baseline trains nothing, logs its MSE and checkpoints nothing
            losses = pd.read_csv(out / "runs" / run.config / "losses.csv")
            assert len(losses) == 10 and (losses["loss"] > 0).all() and (losses["step"] == 0).all()
            ckpt = torch.load(out / "runs" / run.config / "checkpoints" / "last.ckpt", weights_only=True)
            assert ckpt["state_dict"] == {}
        if run.family == "projection":
            assert data["dataset"] == "LAION captions" and data["captions"] > 0
        else:
            want = selected if run.config != "unet_no_findings" else selected[selected["finding"] == "No Finding"]
            assert sorted(d["dicom_id"] for d in data["train"]) == sorted(want["dicom_id"])
            assert data["selection"] == "explicit dicom_ids"

    before = {p: p.stat().st_mtime_ns for p in (out / "steps").glob("*.json")}
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == 19 and "all 19 steps done" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "steps").glob("*.json")} == before
