"""evaluate.py utility re-run into the same --out: kept arms and synthetic images are reused only when they came from
the settings asked now; otherwise they are made again, with one line naming the setting, so utility.md never describes
settings other than its numbers'. Numbers and --out are checked before any work.

The arms' training is replaced by a recorder here (it is run for real in test_utility_study.py): these tests are about
which arms are trained, not what they learn. The synthetic images are generated for real, by the tiny-phantom model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import evaluate

SYNTHETIC = ("synthetic", "Stable_Diffusion_(base)")


@pytest.fixture
def trained(monkeypatch) -> list:
    """``train_arm`` replaced by a recorder of ``(arm, seed, steps)``; its probabilities are seeded noise."""
    import evaluation.utility_study as study

    calls = []

    def train_arm(cfg, arm, seed, real, synthetic, device):
        calls.append((arm, seed, cfg.steps))
        return np.random.default_rng(len(calls)).random((len(real.test_images), len(cfg.findings)))

    monkeypatch.setattr(study, "train_arm", train_arm)
    return calls


def args(root, out, *extra, source=("--base", "tiny-phantom"), max_real=("--max_real", "4")):
    return ["utility", "--mimic_root", str(root), "--out", str(out), *source, "--classifier", "tiny-phantom",
            "--findings", "Pleural Effusion", "--steps", "5", "--batch_size", "4", "--seeds", "0", "--n_boot", "2",
            "--gen_steps", "1", *max_real, "--device", "cpu", *extra]


def images(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
def test_a_rerun_with_another_budget_trains_the_arms_again_and_says_which_setting(phantom_root, tmp_path, capsys, trained):
    """Issue 33 item 3: a re-run with --steps 7 into the same --out used to keep the 5-step arms and write "7 steps"
    over them. Each arm now records its settings: a re-run with the same ones trains nothing; each changed setting
    (the budget, --init, --max_real, --findings) trains every arm again, with one line naming it, and utility.md
    describes what was trained."""
    out = tmp_path / "utility"
    assert evaluate.main(args(phantom_root, out)) == 0
    assert sorted(trained) == [(arm, 0, 5) for arm in "abcd"]
    trained.clear()
    assert evaluate.main(args(phantom_root, out)) == 0 and trained == []  # the same settings: every arm kept
    changed = []
    for option, value, said, described in [
        ("--steps", "7", "--steps 5, now 7", "arms a, b and c train 7 steps of 4 images"),
        ("--batch_size", "2", "--batch_size 4, now 2", "train 7 steps of 2 images"),
        ("--learning_rate", "0.01", "--learning_rate 0.001, now 0.01", "at learning rate 0.01"),
        ("--init", "pretrained", "--init scratch, now pretrained", "tiny-phantom architecture, pretrained"),
        ("--max_real", "5", "--max_real 4, now 5", "Real training set: 5 frontal train-split images"),
        ("--findings", "Cardiomegaly", "--findings ['Pleural Effusion'], now ['Cardiomegaly']", "(Cardiomegaly: "),
    ]:
        changed += [option, value]
        capsys.readouterr()
        assert evaluate.main(args(phantom_root, out, *changed)) == 0
        text = capsys.readouterr().out
        assert sorted(arm for arm, _, _ in trained) == list("abcd"), option
        assert text.count(f"the kept one was trained with {said}") == 4, text
        assert described in (out / "utility.md").read_text(), option
        trained.clear()
    record = json.loads(str(np.load(out / "arms" / "real" / "a-seed0.npz")["settings"]))
    assert record["steps"] == 7 and record["batch_size"] == 2 and record["findings"] == ["Cardiomegaly"]


@pytest.mark.slow
def test_a_rerun_with_other_sampler_settings_makes_the_synthetic_images_again(phantom_root, tmp_path, capsys, trained):
    """Issue 33 item 4: a re-run with --gen_steps 2 used to keep the 1-step images and report "2 ddim steps". The
    folder's synthetic.json records what made its images: a changed sampler setting makes them all again (one line
    naming it) and trains arms b, c and d again, not (a); a changed real training set makes again only the images whose
    prompt changed; an unreadable image is made again; images without a record are refused. (Each other generator
    setting: test_each_generator_setting_makes_every_synthetic_image_again.)"""
    out = tmp_path / "utility"
    folder = out.joinpath(*SYNTHETIC)
    assert evaluate.main(args(phantom_root, out)) == 0
    first = images(folder)
    assert len(first) == 4 and json.loads((folder / "synthetic.json").read_text())["gen_steps"] == 1
    trained.clear()
    capsys.readouterr()
    assert evaluate.main(args(phantom_root, out, "--gen_steps", "2")) == 0
    text = capsys.readouterr().out
    assert "the 4 synthetic images in" in text and "were made with --gen_steps 1, now 2: generating them again" in text
    second = images(folder)
    assert second.keys() == first.keys() and all(second[k] != first[k] for k in first)
    assert "1 ddim steps" not in (md := (out / "utility.md").read_text()) and "2 ddim steps" in md
    assert sorted(arm for arm, _, _ in trained) == list("bcd")
    assert "synthetic images of --gen_steps 1, now 2: training it again" in text
    trained.clear()
    settings = ["--gen_steps", "2"]  # every other generator setting: test_each_generator_setting_...
    kept = images(folder)
    assert evaluate.main(args(phantom_root, out, *settings, "--max_real", "6")) == 0
    text = capsys.readouterr().out
    grown = images(folder)
    same = [k for k in kept if grown[k] == kept[k]]
    assert len(grown) == 6 and same and f"{4 - len(same)} of the 4 synthetic images in" in text
    (folder / "000001.png").write_bytes(grown["000001.png"][:100])  # damaged outside the study
    assert evaluate.main(args(phantom_root, out, *settings, "--max_real", "6")) == 0
    assert "000001.png is unreadable" in capsys.readouterr().out and images(folder)["000001.png"] == grown["000001.png"]
    (folder / "synthetic.json").unlink()
    assert evaluate.main(args(phantom_root, out, *settings, "--max_real", "6")) == 2
    assert "6 synthetic images without synthetic.json" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_retrained_under_the_same_name_makes_its_synthetic_images_again(phantom_root, tmp_path, capsys, trained):
    """Issue 33 item 4, second case: the synthetic images are keyed by the generator's weights (a fingerprint of every
    tensor it samples with), not by its folder name, so a model saved again under the same name with other weights has
    its images made again, and its arms b, c and d trained again."""
    import torch

    from models.stable_diffusion import load_stable_diffusion

    sd = load_stable_diffusion("tiny-phantom")
    model = tmp_path / "model"
    sd.pipeline().save_pretrained(model)  # a diffusers pipeline folder: an export of kind pipeline
    common = args(phantom_root, tmp_path / "utility", source=("--runs", str(model)))
    assert evaluate.main(common) == 0
    folder = tmp_path / "utility" / "synthetic" / "model"
    first = images(folder)
    trained.clear()
    with torch.no_grad():
        sd.unet.conv_out.bias.add_(0.5)  # "retrained"
    sd.pipeline().save_pretrained(model)
    capsys.readouterr()
    assert evaluate.main(common) == 0
    text = capsys.readouterr().out
    assert "were made with other model weights (fingerprint): generating them again" in text
    assert all(images(folder)[k] != first[k] for k in first)
    assert sorted(arm for arm, _, _ in trained) == list("bcd")
    assert "synthetic images of other model weights (fingerprint): training it again" in text


@pytest.mark.parametrize("setting,now,said", [
    ("generator", "f00d", "other model weights (fingerprint)"), ("gen_steps", 4, "--gen_steps 2, now 4"),
    ("guidance", 3.0, "--guidance 7.5, now 3.0"), ("scheduler", "pndm", "--scheduler ddim, now pndm"),
    ("native_px", 32, "other native size"), ("seed", 1, "--seed 0, now 1"),
    ("prompt_source", "impression", "--prompt_source template, now impression"),
])
def test_each_generator_setting_makes_every_synthetic_image_again(tmp_path, setting, now, said):
    """Issue 33 item 4, each setting the synthetic record holds: any one differing marks every kept image stale, and
    the line names it; only the source's path differing (the same weights elsewhere) keeps them."""
    from PIL import Image

    from evaluation.utility_study import SYNTHETIC_RECORD, stale_images

    record = {"generator": "beef", "gen_steps": 2, "guidance": 7.5, "scheduler": "ddim", "native_px": 64, "seed": 0,
              "prompt_source": "template", "source": "tiny-phantom", "prompts": ["p0", "p1"]}
    for i in range(2):
        Image.new("L", (64, 64)).save(tmp_path / f"{i:06d}.png")
    (tmp_path / SYNTHETIC_RECORD).write_text(json.dumps(record))
    said_lines = []
    assert stale_images(tmp_path, {**record, "source": "elsewhere/tiny-phantom"}, 2, "base", said_lines.append) == []
    stale = stale_images(tmp_path, {**record, setting: now}, 2, "base", said_lines.append)
    assert sorted(p.name for p in stale) == ["000000.png", "000001.png"]
    assert said_lines == [f"base: the 2 synthetic images in {tmp_path} were made with {said}: generating them again"]


def test_a_kept_arm_without_or_with_a_damaged_record_is_trained_again(tmp_path):
    """Arms kept by an earlier version (no settings) or damaged (a killed save: the study now writes them whole) are not
    trusted: each is trained again, with one line saying why."""
    from evaluation.utility_study import kept_arm

    said, settings = [], {"steps": 5}
    old = tmp_path / "a-seed0.npz"
    np.savez(old, probabilities=np.zeros((3, 1)))
    assert kept_arm(old, settings, "arm (a)", said.append) is None
    assert said[-1] == "arm (a): the kept one was trained with no record of its settings (an earlier version of the " \
                       "study): training it again"
    old.write_bytes(old.read_bytes()[:50])
    assert kept_arm(old, settings, "arm (a)", said.append) is None and "is unreadable" in said[-1]
    np.savez(old, probabilities=np.ones((3, 1)), settings=np.array(json.dumps(settings)))
    assert np.array_equal(kept_arm(old, settings, "arm (a)", said.append), np.ones((3, 1))) and len(said) == 2


@pytest.mark.parametrize("extra,message", [
    (["--seeds", "-1"], "argument --seeds: -1: a seed is an integer from 0 to 2**32-1"),  # W-10
    (["--seeds", str(2**32)], "argument --seeds: 4294967296: a seed is an integer from 0 to 2**32-1"),
    (["--seeds", "0", "0"], "argument --seeds: [0] given more than once; each seed is one replicate"),  # W-11
    (["--seeds", "0", "1", "2", "1"], "argument --seeds: [1] given more than once"),
    (["--max_real", "0"], "argument --max_real: 0: expected an integer of at least 1"),  # W-12
    (["--steps", "0"], "argument --steps: 0: expected an integer of at least 1"),
    (["--batch_size", "0"], "argument --batch_size: 0: expected an integer of at least 1"),
    (["--gen_steps", "0"], "argument --gen_steps: 0: expected an integer of at least 1"),
    (["--n_boot", "0"], "argument --n_boot: 0: expected an integer of at least 1"),
    (["--resolution", "-64"], "argument --resolution: -64: expected an integer of at least 1"),
    (["--learning_rate", "0"], "argument --learning_rate: 0: expected a number above 0"),
    (["--learning_rate", "nan"], "argument --learning_rate: nan: expected a number above 0"),
    (["--guidance", "-1"], "argument --guidance: -1: expected a number of at least 0"),
    (["--seed", "-3"], "argument --seed: -3: a seed is an integer from 0 to 2**32-1"),
])
def test_impossible_numbers_are_refused_at_parse(tmp_path, capsys, trained, extra, message):
    """Issue 33 W-10/W-11/W-12: --seeds -1 used to fail after generating images (numpy), --seeds 0 0 counted one
    replicate twice, --max_real 0 said "all 0 selected images were unreadable". Now each is refused at parse: one
    line naming the option, exit 2, nothing read or written."""
    with pytest.raises(SystemExit) as exit:
        evaluate.main(args(tmp_path / "no_root", tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("error:") == 1, err
    assert not (tmp_path / "out").exists() and trained == []


def test_an_out_that_is_a_file_is_refused_before_any_work(phantom_root, tmp_path, capsys, trained, monkeypatch):
    """Issue 33 W-6 (the utility study too): --out FILE is one line before anything is read, generated or trained."""
    import evaluation.utility_study as study

    monkeypatch.setattr(study, "real_data", lambda *a: pytest.fail("read the real images"))
    (tmp_path / "file").write_text("x")
    assert evaluate.main(args(phantom_root, tmp_path / "file")) == 2
    assert capsys.readouterr().err == f"evaluate.py utility: error: --out {tmp_path / 'file'} is a file, not a folder\n"
    assert evaluate.main(args(phantom_root, tmp_path / "file" / "sub")) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err and trained == []


@pytest.mark.slow
def test_an_unreadable_real_image_is_named_or_skipped_with_on_bad_image(phantom_root, tmp_path, capsys, trained):
    """Issue 33 W-7 (the utility study): the error for an unreadable image advises --on_bad_image skip, which the study
    now takes: the image is left out with a warning, listed in provenance.json and counted in utility.md."""
    from datamodules.study_images import select_mimic

    root = tmp_path / "mimic"
    shutil.copytree(phantom_root, root)
    train = select_mimic(root, None, 0, "train")
    broken = Path(train[train["Pleural Effusion"] == 1.0]["path"].iloc[0])  # a real training image
    broken.write_bytes(broken.read_bytes()[:200])
    every = args(root, tmp_path / "u", max_real=())  # every real training image: the broken one too
    assert evaluate.main(every) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and broken.name in err and "--on_bad_image skip" in err
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        assert evaluate.main([*every, "--on_bad_image", "skip"]) == 0
    record = json.loads((tmp_path / "u" / "provenance.json").read_text())["records"][0]
    assert [s["path"] for s in record["inputs"]["skipped_images"]] == [str(broken)]
    assert "**Left out**: 1 unreadable real image(s)" in (tmp_path / "u" / "utility.md").read_text()
