"""generate.py: images, grid and generation.json from a run, an export or a base model; clear errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import generate
from conftest import REPO

FAST = ["--steps", "2", "--n", "2"]


def gen(*argv: str) -> dict:
    return generate.main([*FAST, *argv])


def check_output(out: Path, prompts: list[str], n: int = 2, seed: int = 0) -> list[np.ndarray]:
    names = sorted(p.name for p in out.glob("p*_s*.png"))
    assert names == sorted(f"p{i:02d}_s{seed + j}.png" for i in range(len(prompts)) for j in range(n))
    assert (out / "grid.png").is_file()
    record = json.loads((out / "generation.json").read_text())
    assert record["prompts"] == prompts and record["seeds"] == [seed + j for j in range(n)]
    assert record["steps"] == 2 and record["scheduler"] in ("ddim", "pndm", "euler", "dpm")
    return [np.asarray(Image.open(out / f"p00_s{seed + j}.png"), dtype=np.int16) for j in range(n)]


def expect_error(capsys, *argv: str, match: str) -> None:
    with pytest.raises(SystemExit) as exc:
        generate.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("generate.py: error:") and match in err[-1], err


# ---------------------------------------------------------------------- U-Net fine-tuning
@pytest.mark.slow
def test_unet_run_writes_images_grid_and_record_and_seeds_differ(reference_run, tmp_path):
    prompts = ["a photo of a lung xray", "a photo of a lung xray with a visible pleural effusion"]
    out = tmp_path / "out"
    record = gen("--run", str(reference_run), "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "3",
                 "--scheduler", "euler", "--negative_prompt", "blurry", "--out", str(out))
    a, b = check_output(out, prompts, seed=3)
    assert np.abs(a - b).mean() > 1.0  # another seed, another image
    assert record["scheduler"] == "euler" and record["negative_prompt"] == "blurry" and record["guidance"] == 7.5
    assert record["source"]["kind"] == "run" and record["source"]["strategy"] == "UNetFineTuning"
    assert record["source"]["checkpoint"].endswith("last.ckpt")
    # the same seeds again: the same images, whatever the batching (float rounding of batched kernels aside)
    again = tmp_path / "again"
    gen("--run", str(reference_run), "--prompt", prompts[0], "--seed", "3", "--scheduler", "euler",
        "--negative_prompt", "blurry", "--batch_size", "1", "--out", str(again))
    assert np.abs(np.asarray(Image.open(again / "p00_s4.png"), dtype=np.int16) - b).max() <= 2


@pytest.mark.slow
def test_unet_export_generates_what_the_run_generates(reference_run, reference_export, tmp_path):
    export = reference_export
    from_export, from_run = tmp_path / "from_export", tmp_path / "from_run"
    record = gen("--export", str(export), "--prompt", "a photo of a lung xray", "--n", "1", "--out", str(from_export))
    assert record["source"]["export_kind"] == "pipeline" and record["source"]["strategy"] == "UNetFineTuning"
    gen("--run", str(reference_run), "--prompt", "a photo of a lung xray", "--n", "1", "--out", str(from_run))
    check_output(from_export, ["a photo of a lung xray"], n=1)
    a = np.asarray(Image.open(from_export / "p00_s0.png"), dtype=np.int16)
    b = np.asarray(Image.open(from_run / "p00_s0.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 2  # the export holds the run's weights (PNG rounding aside)


def test_base_model_preset_with_default_prompts(tmp_path):
    from datamodules.prompts import PAPER_PROMPTS

    record = gen("--pretrained", "tiny-random", "--n", "1", "--scheduler", "dpm", "--device", "cpu", "--out", str(tmp_path))
    check_output(tmp_path, list(PAPER_PROMPTS), n=1)
    assert record["source"] == {"kind": "pretrained", "pretrained": "tiny-random", "strategy": "base model",
                                "base_model": record["source"]["base_model"]}


# ---------------------------------------------------------------------- textual inversion
@pytest.mark.slow
def test_textual_inversion_run_with_the_token_prompt(ti_run, tmp_path, capsys):
    prompts = ["a photo of a <lung-xray>"]
    record = gen("--run", str(ti_run), "--prompt", prompts[0], "--out", str(tmp_path / "token"))
    check_output(tmp_path / "token", prompts)
    assert record["source"]["strategy"] == "TextualInversion"
    assert "warning" not in capsys.readouterr().err
    # defaults: the paper's prompts with the token
    record = gen("--run", str(ti_run), "--n", "1", "--out", str(tmp_path / "defaults"))
    assert record["prompts"][0] == "a photo of a <lung-xray>" and len(record["prompts"]) == 3
    # a prompt without the token: generated, with a one-line warning
    gen("--run", str(ti_run), "--prompt", "a photo of a lung xray", "--n", "1", "--out", str(tmp_path / "plain"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "<lung-xray>" in warnings[0]


@pytest.mark.slow
def test_textual_inversion_export_generates_what_the_run_generates(ti_run, tmp_path):
    from lightning_modules.runs import load_run

    export = load_run(ti_run)[0].export(tmp_path / "export")
    args = ["--prompt", "a photo of a <lung-xray>", "--n", "1"]
    record = gen("--export", str(export), *args, "--out", str(tmp_path / "from_export"))
    assert record["source"]["export_kind"] == "textual_inversion"
    gen("--run", str(ti_run), *args, "--out", str(tmp_path / "from_run"))
    a = np.asarray(Image.open(tmp_path / "from_export" / "p00_s0.png"))
    b = np.asarray(Image.open(tmp_path / "from_run" / "p00_s0.png"))
    assert np.array_equal(a, b)
    # plain diffusers embeddings (no textual_inversion.json, no export.json) need the base model
    (export / "textual_inversion.json").unlink()
    (export / "export.json").unlink()
    with pytest.raises(SystemExit):
        gen("--export", str(export), *args, "--out", str(tmp_path / "no_base"))
    gen("--export", str(export), "--pretrained", "tiny-phantom", *args, "--out", str(tmp_path / "with_base"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "with_base" / "p00_s0.png")), b)


# ---------------------------------------------------------------------- textual projection
def test_projection_export(tmp_path):
    import torch
    import yaml

    from lightning_modules.projection import TextualProjection

    init_args = yaml.safe_load((REPO / "configs" / "projection_demo.yaml").read_text())["model"]["init_args"]
    module = TextualProjection(**init_args)
    with torch.no_grad():
        for p in module.projection.parameters():
            p.add_(0.01)  # not the initial weights
    export = module.export(tmp_path / "export")
    record = gen("--export", str(export), "--prompt", "a photo of a lung xray", "--out", str(tmp_path / "out"))
    check_output(tmp_path / "out", ["a photo of a lung xray"])
    assert record["source"]["export_kind"] == "projection" and record["source"]["strategy"] == "TextualProjection"


# ---------------------------------------------------------------------- bad input
def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    expect_error(capsys, "--export", str(tmp_path), *out, match="not an export folder")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    expect_error(capsys, "--run", str(tmp_path / "run"), *out, match="no checkpoint")
    expect_error(capsys, "--export", str(tmp_path / "run"), *out, match="use --run")
    expect_error(capsys, "--pretrained", "tiny-random", "--prompt", "", *out, match="empty")
    expect_error(capsys, "--pretrained", "tiny-random", "--prompt", "  ", *out, match="empty")
    (tmp_path / "prompts.txt").write_text("\n\n")
    expect_error(capsys, "--pretrained", "tiny-random", "--prompt_file", str(tmp_path / "prompts.txt"), *out, match="no prompts")
    expect_error(capsys, "--pretrained", "tiny-random", "--n", "0", *out, match="--n must be >= 1")
    expect_error(capsys, "--pretrained", "tiny-random", "--steps", "0", *out, match="--steps must be >= 1")
    expect_error(capsys, *out, match="nothing to generate from")
    expect_error(capsys, "--run", "a", "--export", "b", *out, match="not both")
    assert not (tmp_path / "out").exists()


def test_help_mentions_the_placeholder_token(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    assert "a photo of a <lung-xray>" in capsys.readouterr().out
