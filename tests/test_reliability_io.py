"""Reliability of what the suite reads and writes (issue 19, second pass): reader kits that are never overwritten,
MIMIC CSVs with repeated rows, a resized-image cache that notices changed JPEGs, score sheets and prompt files in the
wrong encoding, seeds beyond 64 bits, exports that never mix, and one error line from every entry point."""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evaluate
import export
import generate
from conftest import PYTHON, REPO
from core.errors import UserError
from datamodules import mimic_cxr
from datamodules.mimic_cxr import MIMICCXRDataModule, MIMICDataError
from evaluation.reader_kit import KEY_FILE, ReaderKitExistsError, make_reader_kit, summarize_by_source, summarize_scores
from models.exports import ExportError, kinds_in, read_manifest, write_manifest

LATIN1 = "a photo of a lung xray, pleural effusion \u00e9panchement\n"  # "é": one byte 0xe9 in cp1252 / latin-1


def fill(sheet: Path, score: int = 4, **answers: str) -> None:
    """A reader's sheet: every case scored ``score`` (and each yes/no question answered)."""
    lines = sheet.read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    columns = lines[header].split(",")
    rows = [",".join(answers.get(c, str(score) if c == "score" else "") if c != "case" else line.split(",")[0] for c in columns)
            for line in lines[header + 1:]]
    sheet.write_text("\n".join(lines[:header + 1] + rows) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- A: reader kits
def images(n: int = 4) -> list[np.ndarray]:
    return [np.full((16, 16), 40 * i, np.uint8) for i in range(n)]


def test_a_kit_is_never_overwritten_silently_and_a_filled_sheet_is_kept_aside(tmp_path):
    kit = make_reader_kit(images(), tmp_path / "kit", seed=0, ids=["a", "b", "c", "d"])
    fill(kit / "scores.csv", 5)
    sheet, key = (kit / "scores.csv").read_text(), (kit / KEY_FILE).read_text()
    with pytest.raises(ReaderKitExistsError, match=r"kit: holds a reader kit already \(scores.csv, key_PRIVATE.csv.*pass --overwrite"):
        make_reader_kit(images(), kit, seed=1)
    assert (kit / "scores.csv").read_text() == sheet and (kit / KEY_FILE).read_text() == key  # untouched

    said = []
    make_reader_kit(images(2), kit, seed=1, overwrite=True, log=said.append)
    (kept_sheet,) = kit.glob("scores.filled-*.csv")
    (kept_key,) = kit.glob("key_PRIVATE.*.csv")
    assert kept_sheet.read_text() == sheet and kept_key.read_text() == key
    assert len(said) == 1 and kept_sheet.name in said[0] and kept_key.name in said[0] and "\n" not in said[0]
    assert summarize_scores(kept_sheet, key=kept_key)["n"] == 4  # the reader's work still adds up with its own key
    new_rows = list(csv.DictReader(l for l in (kit / "scores.csv").read_text().splitlines() if not l.startswith("#")))
    assert [r["score"] for r in new_rows] == ["", ""]  # a new, empty sheet
    assert len(list((kit / "cases").glob("*.png"))) == 2  # no case of the earlier kit left to mix with the new ones


def test_an_unfilled_sheet_is_replaced_but_the_key_is_still_kept(tmp_path):
    kit = make_reader_kit(images(), tmp_path / "kit", seed=0)
    said = []
    make_reader_kit(images(), kit, seed=1, overwrite=True, log=said.append)
    assert not list(kit.glob("scores.filled-*")) and len(list(kit.glob("key_PRIVATE.*.csv"))) == 1 and len(said) == 1


def vae_study(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["vae", "--image_folder", str(folder), "--out", str(out), "--resolution", "64", "--pretrained", "tiny-phantom",
            "--device", "cpu", "--classifier", "none", "--fid_features", "none", "--reader_pairs", "2", "--n_examples", "2", *extra]


def test_studies_refuse_an_out_folder_with_a_kit_before_any_work(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64), dtype=np.uint8)).save(folder / f"x{i}.png")
    out = tmp_path / "study"
    assert evaluate.main(vae_study(folder, out)) == 0
    fill(out / "reader_kit" / "scores.csv", 3)
    filled = (out / "reader_kit" / "scores.csv").read_text()
    (out / "summary.md").unlink()
    capsys.readouterr()
    assert evaluate.main(vae_study(folder, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py vae: error:") and "reader_kit: holds a reader kit" in err[0], err
    assert not (out / "summary.md").exists()  # refused before the study ran
    assert evaluate.main(vae_study(folder, out, "--overwrite")) == 0
    assert "kept as" in capsys.readouterr().out
    assert [p.read_text() for p in (out / "reader_kit").glob("scores.filled-*.csv")] == [filled]

    generation = ["generation", "--mimic_root", str(tmp_path / "unused"), "--out", str(out), "--base", "tiny-phantom",
                  "--reader_kit", "2"]
    assert evaluate.main(generation) == 2
    assert "reader_kit: holds a reader kit already" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- B: repeated CSV rows
def root_with(phantom_root: Path, tmp_path: Path, name: str, edit) -> Path:
    """The phantom root's CSVs (``name`` edited) beside a link to its images."""
    root = tmp_path / "mimic"
    root.mkdir()
    (root / "files").symlink_to(phantom_root / "files")
    for csv_name in (mimic_cxr.METADATA_CSV, mimic_cxr.CHEXPERT_CSV, mimic_cxr.SPLIT_CSV):
        df = pd.read_csv(phantom_root / csv_name, dtype={"dicom_id": str})
        (edit(df) if csv_name == name else df).to_csv(root / csv_name, index=False)
    return root


@pytest.mark.parametrize("name,key", [(mimic_cxr.METADATA_CSV, "dicom_id"), (mimic_cxr.SPLIT_CSV, "dicom_id"),
                                      (mimic_cxr.CHEXPERT_CSV, "(subject_id, study_id)")])
def test_repeated_rows_in_a_mimic_csv_are_refused_naming_the_file_and_the_keys(phantom_root, tmp_path, name, key):
    root = root_with(phantom_root, tmp_path, name, lambda df: pd.concat([df, df.iloc[[2, 0, 2]]]))
    first = pd.read_csv(phantom_root / name, dtype={"dicom_id": str}).iloc[[2, 0]]
    shown = list(first["dicom_id"]) if key == "dicom_id" else [f"({r.subject_id}, {r.study_id})" for r in first.itertuples()]
    dm = MIMICCXRDataModule(root=str(root), findings=["No Finding"], resolution=64, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MIMICDataError) as err:
        dm.build_records()
    message = str(err.value)
    assert message.startswith(f"{root / name}: 2 {key} value(s) appear on more than one row, e.g. {', '.join(shown)};"), message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------- C: the image cache
def test_a_jpeg_that_changed_after_caching_is_read_again(phantom_root, tmp_path):
    root = tmp_path / "mimic"
    shutil.copytree(phantom_root, root)
    make = lambda **kw: MIMICCXRDataModule(root=str(root), findings=["No Finding", "Pleural Effusion"], resolution=64,
                                           max_val_images=0, cache_dir=str(tmp_path / "cache"), **kw)
    dm = make()
    dm.setup()
    first, second = dm.train_records.iloc[0], dm.train_records.iloc[1]
    jpeg = lambda r: mimic_cxr.image_path(root, r.subject_id, r.study_id, r.dicom_id)
    latents_key = dm.training_images().key_parts
    # replaced by text, with a new modification time
    stat = jpeg(first).stat()
    jpeg(first).write_text("this is not a JPEG any more")
    os.utime(jpeg(first), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(MIMICDataError, match=re.escape(f"{jpeg(first)}: cannot read image (") + ".*on_bad_image: skip"):
        make().setup()
    assert not (dm.image_cache_dir / f"{first.dicom_id}.png").exists()  # the stale copy is never served
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image"):
        skipping = make(on_bad_image="skip")
        skipping.prepare_data()
    skipping.setup()
    assert first.dicom_id not in set(skipping.train_records.dicom_id) and len(skipping.train_records) == len(dm.train_records) - 1
    # a valid new image: its resized copy and the latent-cache key follow it
    Image.fromarray(np.full((96, 96), 200, np.uint8)).save(jpeg(first), format="JPEG")
    fresh = make()
    fresh.setup()
    assert abs(int(np.asarray(Image.open(fresh.image_cache_dir / f"{first.dicom_id}.png")).mean()) - 200) <= 2
    assert fresh.training_images().key_parts["sources_sha1"] != latents_key["sources_sha1"]
    # zeroed in place: the same size, only the modification time tells
    stat = jpeg(second).stat()
    jpeg(second).write_bytes(bytes(stat.st_size))
    os.utime(jpeg(second), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(MIMICDataError, match=re.escape(f"{jpeg(second)}: cannot read image (")):
        make().prepare_data()


# ---------------------------------------------------------------------------------------------- D: text encodings
def test_score_sheets_in_another_encoding_are_named_and_a_byte_order_mark_is_harmless(tmp_path, capsys):
    kit = make_reader_kit(images(), tmp_path / "kit", seed=0, ids=["s1", "s1", "s2", "s2"], questions={"finding_present": "Seen?"})
    sheet = kit / "scores.csv"
    fill(sheet, 4, finding_present="yes", comment="\u00e9panchement visible")
    rows = [line for line in sheet.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    sheet.write_bytes("\n".join(rows).encode("cp1252"))  # saved by a spreadsheet program in the Windows code page
    with pytest.raises(UserError, match="^" + re.escape(f"{sheet}: this score sheet is not UTF-8 text (byte 0xe9 at offset")):
        summarize_scores(sheet)
    with pytest.raises(UserError, match="not UTF-8"):
        evaluate.main(["generation-scores", str(sheet)])  # one line through run_main, see test_entry_points_...
    # "CSV UTF-8" from a spreadsheet program: a byte-order mark right before the header "case"
    sheet.write_bytes("\n".join(rows).encode("utf-8-sig"))
    (kit / KEY_FILE).write_bytes((kit / KEY_FILE).read_text(encoding="utf-8").encode("utf-8-sig"))
    assert summarize_scores(sheet)["n"] == 4
    by_source = summarize_by_source(sheet, questions=("finding_present",))
    assert [(r["source"], r["n"], r["finding_present_yes_share"]) for r in by_source] == [("s1", 2, 1.0), ("s2", 2, 1.0)]
    assert evaluate.main(["generation-scores", str(sheet)]) == 0


def test_prompt_files_in_another_encoding_are_named_and_a_byte_order_mark_is_harmless(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(LATIN1.encode("latin-1"))
    expected = f"{prompts}: this prompt file is not UTF-8 text (byte 0xe9 at offset {LATIN1.index(chr(0xe9))})"
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        generate.main(["--pretrained", "tiny-random", "--prompt_file", str(prompts), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    prompts.write_bytes(("a photo of a lung xray\n" + LATIN1).encode("utf-8-sig"))
    args = argparse.Namespace(prompt=None, prompt_file=str(prompts))
    assert generate.read_prompts(args) == ["a photo of a lung xray", LATIN1.strip()]


# ---------------------------------------------------------------------------------------------- E: seeds
def test_seeds_outside_what_torch_takes_are_refused_at_parse(tmp_path, capsys):
    torch.Generator().manual_seed(2**64 - 1)  # the largest seed torch takes
    with pytest.raises((RuntimeError, ValueError, OverflowError)):
        torch.Generator().manual_seed(2**64)
    for seed in (str(2**64), "-1", "1e3"):
        with pytest.raises(SystemExit) as exc:
            generate.main(["--pretrained", "tiny-random", f"--seed={seed}", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2 and err.startswith("generate.py: error: argument --seed:") and "0 to 2**64-1" in err, err
    assert generate.build_parser().parse_args(["--seed", str(2**64 - 1), "--out", "o"]).seed == 2**64 - 1
    with pytest.raises(SystemExit):
        generate.main(["--pretrained", "tiny-random", "--seed", str(2**64 - 1), "--n", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"the last image's seed {2**64} is beyond 2**64-1; give --seed {2**64 - 2} or less" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- F: exports
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder as train.py leaves it (config.yaml, checkpoints/last.ckpt) for an untrained tiny U-Net: no training."""
    import yaml

    from lightning_modules.unet import UNetFineTuning

    run = tmp_path_factory.mktemp("runs") / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    model = {"class_path": "lightning_modules.unet.UNetFineTuning", "init_args": {"model": {"pretrained": "tiny-random"}}}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    module = UNetFineTuning(model={"pretrained": "tiny-random"})
    checkpoint = {"state_dict": module.state_dict(), "global_step": 1}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    return run


def export_error(*argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        export.main(list(argv))
    message = str(exc.value.code)
    assert message.startswith("export.py: error:") and "\n" not in message, message
    return message


def test_export_refuses_a_file_and_a_folder_with_something_in_it(tiny_run, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "file: exists and is not a folder" in export_error(str(tiny_run), str(tmp_path / "file"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("x")
    for extra in ([], ["--overwrite"]):  # --overwrite never empties a folder that holds no export
        assert "notes: the folder is not empty (thesis.tex) and holds no export" in export_error(str(tiny_run), str(tmp_path / "notes"), *extra)
    assert (tmp_path / "notes" / "thesis.tex").is_file()


def test_export_replaces_an_earlier_export_only_with_overwrite_and_never_mixes_two(tiny_run, tmp_path, capsys):
    out = tmp_path / "export"
    write_manifest(out, "textual_inversion", "TextualInversion", {"pretrained": "tiny-random"})  # an earlier export
    (out / "learned_embeds.safetensors").write_bytes(b"old")
    assert "export: holds an earlier export (export.json, learned_embeds.safetensors); pass --overwrite" in export_error(
        str(tiny_run), str(out))
    assert "--merge applies to strategies that train adapters" in export_error(str(tiny_run), str(out), "--overwrite", "--merge")
    assert (out / "learned_embeds.safetensors").read_bytes() == b"old"  # a failed export leaves the earlier one as it was
    assert not list(tmp_path.glob(".*partial*"))
    export.main([str(tiny_run), str(out), "--overwrite"])
    assert "removed the earlier export (export.json, learned_embeds.safetensors)" in capsys.readouterr().out
    assert kinds_in(out) == {"pipeline": ["model_index.json"]} and read_manifest(out)["kind"] == "pipeline"
    assert (out / "README.md").is_file() and not list(tmp_path.glob(".*partial*"))


def test_generate_refuses_a_folder_holding_two_kinds_of_export(tmp_path, capsys):
    folder = tmp_path / "mixed"
    write_manifest(folder, "pipeline", "UNetFineTuning", {"pretrained": "tiny-random"})
    (folder / "model_index.json").write_text("{}")
    (folder / "learned_embeds.safetensors").write_bytes(b"")
    for manifest in (True, False):
        with pytest.raises(SystemExit) as exc:
            generate.main(["--export", str(folder), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, err
        assert ("mixed: holds the files of 2 kinds of export: pipeline (model_index.json); textual_inversion "
                "(learned_embeds.safetensors); two exports were written into one folder") in err[0]
        (folder / "export.json").unlink(missing_ok=True)
    write_manifest(folder, "projection", "TextualProjection", {"pretrained": "tiny-random"})
    (folder / "learned_embeds.safetensors").unlink()
    with pytest.raises(ExportError, match=r"2 kinds of export: pipeline \(model_index.json\); projection \(export.json\)"):
        read_manifest(folder)  # export.json names one kind, the files show another


# ---------------------------------------------------------------------------------------------- G: entry points
@pytest.mark.slow
def test_entry_points_print_one_error_line_and_debug_shows_the_traceback(tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_bytes(f"case,score,comment\ncase_001,4,{LATIN1}".encode("cp1252"))
    run = lambda *args: subprocess.run([PYTHON, str(REPO / "evaluate.py"), *args], cwd=REPO, capture_output=True, text=True,
                                       timeout=120)
    plain = run("vae-scores", str(sheet))
    lines = plain.stderr.strip().splitlines()
    assert plain.returncode == 1 and len(lines) == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert lines[0].startswith(f"evaluate.py: error: {sheet}: this score sheet is not UTF-8 text (byte 0xe9")
    assert lines[0].endswith("(--debug shows the traceback)")
    debug = run("vae-scores", str(sheet), "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr and "not UTF-8" in debug.stderr
    for script in ("evaluate.py", "generate.py", "export.py", "reproduce.py"):
        main_block = (REPO / script).read_text().split('if __name__ == "__main__":')[1]
        assert "run_main(" in main_block, script


def test_a_missing_score_sheet_is_one_line(tmp_path, capsys):
    assert evaluate.main(["vae-scores", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"evaluate.py vae-scores: error: {tmp_path / 'missing.csv'}: scoring sheet not found"]
