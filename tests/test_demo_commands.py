"""The documented demos, run as the pages show them and in the order a reader meets them (issue 33, item 5): the
README's quickstart, the studies' phantom command (``docs/vae-study.md``), then the commands of the report-conditioned
demo (``docs/generation-study.md``) and of the utility demo (``docs/utility-study.md``): the held-out phantoms' command
and the demo that reads them. Each is taken from its page (``tests/test_docs_commands.py`` extracts them) and run in a
subprocess in an empty working folder, so a demo that needs a folder no earlier command writes fails here as it would
for a reader.

What is not run as shown, to keep the suite's time (what it costs: the end-to-end test's docstring):

* the quickstart's ``python train.py --config demo.yaml`` (300 steps, about 3 minutes): ``runs/demo`` is the shared
  ``reference_run`` (the same config, 24 steps on 6 phantoms per finding), and ``data/phantoms`` is written as the
  quickstart's run writes it (its config's data module, in this process);
* a few numbers, each named in :data:`SHRUNK` (the command must still show the flag, or the test fails), and the
  utility demo's replicates, one seed instead of its default three (:data:`ADDED`).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from test_docs_commands import COMMANDS, QUICKSTART, demo_inputs, writes

# (page, program, flag) -> the value run instead of the page's, and why
SHRUNK = {
    # 300 held-out phantoms instead of 1,000 (~20 s instead of ~60 s): still >= 20 test-split impressions per class
    ("docs/generation-study.md", "synthetic.phantoms", "--n-per-finding"): "150",
    ("docs/utility-study.md", "synthetic.phantoms", "--n-per-finding"): "150",
    # 24 real training images and 4 steps per arm instead of 300 and 200: every arm trains and is scored, in seconds
    ("docs/utility-study.md", "utility", "--max_real"): "24",
    ("docs/utility-study.md", "utility", "--steps"): "4",
}
# (page, program) -> arguments added to the shown command, and why
ADDED = {
    # one replicate of every arm instead of --seeds' default 0 1 2: 7 classifier fits instead of 21
    ("docs/utility-study.md", "utility"): ["--seeds", "0"],
}
# the folder each page's demo commands read or write
DEMO_FOLDERS = {"docs/vae-study.md": "data/phantoms", "docs/generation-study.md": "data/phantoms_heldout",
                "docs/utility-study.md": "data/phantoms_heldout"}


def demo_sequence() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of the pages' demo commands in reading order: on each page of :data:`DEMO_FOLDERS`, the
    commands that read or write its folder (on the VAE page only the one that writes it: the data step)."""
    out = []
    for page, folder in DEMO_FOLDERS.items():
        for where, argv in COMMANDS:
            if where.split(":")[0] != page or argv[0] != "python":
                continue
            touched = folder in writes(argv) or folder in demo_inputs(argv)
            if touched and (page != "docs/vae-study.md" or argv[1:3] == ["-m", "synthetic.phantoms"]):
                out.append((where, argv))
    return out


def as_run(where: str, argv: list[str]) -> list[str]:
    """The command line run for a shown one: this interpreter, the repository's scripts, :data:`SHRUNK` and
    :data:`ADDED` applied."""
    page = where.split(":")[0]
    argv = list(argv)
    for (on_page, program, flag), value in SHRUNK.items():
        if on_page == page and program in argv[1:3]:
            assert flag in argv, f"{where}: `{shlex.join(argv)}` no longer shows {flag}: update SHRUNK"
            argv[argv.index(flag) + 1] = value
    for (on_page, program), extra in ADDED.items():
        if on_page == page and program in argv[1:3]:
            assert extra[0] not in argv, f"{where}: `{shlex.join(argv)}` shows {extra[0]} now: update ADDED"
            argv += extra
    script = [str(REPO / argv[1])] if argv[1].endswith(".py") else argv[1:3]
    return [sys.executable, *script, *argv[1 + len(script):]]


def test_the_demo_sequence_is_what_the_pages_show():
    """The sequence below holds the data step of each demo before the demo itself (a fast check of the selection)."""
    shown = [(where.split(":")[0], argv[1:3]) for where, argv in demo_sequence()]
    assert shown == [("docs/vae-study.md", ["-m", "synthetic.phantoms"]),
                     ("docs/generation-study.md", ["-m", "synthetic.phantoms"]),
                     ("docs/generation-study.md", ["evaluate.py", "generation"]),
                     ("docs/utility-study.md", ["-m", "synthetic.phantoms"]),
                     ("docs/utility-study.md", ["evaluate.py", "utility"])]
    assert QUICKSTART[1:] == ["train.py", "--config", "demo.yaml"]


@pytest.mark.slow
def test_every_documented_demo_command_runs_in_order(reference_run, tmp_path, monkeypatch):
    """The quickstart (standing in: see the module docstring), then every demo command of :func:`demo_sequence` in a
    subprocess in an empty folder: each exits 0, prints no traceback, and leaves what its page says. Its own cost
    (``reference_run`` is shared): measured on 2 cores shared with other test runs (load average 3.5-9), the
    quickstart's data 8 s, the two ``data/phantoms`` commands 13-21 s each (mostly imports), the held-out phantoms
    71 s, the report-conditioned demo 38-333 s, the utility demo 84 s; about 3.5 minutes at load 3.5, not measured
    on idle cores."""
    from synthetic.phantoms import PhantomCXRDataModule

    config = yaml.safe_load((REPO / "configs" / QUICKSTART[3]).read_text())
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / config["run_name"]).symlink_to(reference_run, target_is_directory=True)
    with monkeypatch.context() as here:  # the data module writes its root relative to the working folder, as the run does
        here.chdir(tmp_path)
        PhantomCXRDataModule(**config["data"]["init_args"])._ensure_data()
    said = {}
    for where, argv in demo_sequence():
        done = subprocess.run(as_run(where, argv), cwd=tmp_path, capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert done.returncode == 0 and "Traceback" not in done.stderr, (
            f"{where}: `{shlex.join(argv)}` failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        said[where] = done.stdout
    phantoms_line = next(out for where, out in said.items() if where.startswith("docs/vae-study.md"))
    assert phantoms_line.startswith("kept data/phantoms: it already holds these phantoms"), phantoms_line
    assert (tmp_path / "data/phantoms_heldout/PHANTOMS.json").is_file()
    reports = tmp_path / "studies/generation_reports_demo"
    assert {"report_results.md", "report_auroc.csv", "report_prompts.csv"} <= {p.name for p in reports.iterdir()}
    utility = tmp_path / "results/utility_demo"
    assert {"utility.md", "utility.csv", "differences.csv"} <= {p.name for p in utility.iterdir()}
