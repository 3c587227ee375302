"""Textual projection: the MLP learns CLIP's space from LAION captions, caches, resumes, generates, exports."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from callbacks.loss_log import read_loss_log
from conftest import PYTHON, REPO, run_train, train_and_signal
from lightning_modules.projection import ProjectionConfigError, ProjectionMLP, TextualProjection, align_token_states
from models.exports import load_export
from models.projection import load_projection


def projection_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "--config", "projection_demo",
        "--runs_dir", str(tmp / "runs"),
        "--data.init_args.root", str(tmp.parent / "laion_synthetic"),  # shared by the tests of one session
        "--data.init_args.n_captions", "600",
        "--data.init_args.val_captions", "40",
        "--data.init_args.batch_size", "32",
        "--trainer.val_check_interval", "10",
        "--trainer.log_every_n_steps", "1",
        "--checkpoint_every_n_steps", "5",
        "--trainer.callbacks=[]",
        "--wandb_mode", "disabled",
        *extra,
    ]


@pytest.fixture(scope="module")
def projection_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 30-step document-level run (the demo config, smaller)."""
    tmp = tmp_path_factory.mktemp("projection")
    proc = run_train(*projection_args(tmp, "--run_name", "doc", "--trainer.max_steps", "30"))
    return tmp / "runs" / "doc", proc


@pytest.mark.slow
def test_document_level_mse_goes_down_and_the_cache_is_written_once(projection_run, tmp_path):
    run, proc = projection_run
    assert "document embeddings: encoding" in proc.stdout + proc.stderr
    losses = list(read_loss_log(run / "losses.csv").values())
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    # a second run over the same caption set and models reuses the cache instead of re-encoding
    again = run_train(*projection_args(tmp_path, "--run_name", "again", "--trainer.max_steps", "2"))
    out = again.stdout + again.stderr
    assert "document embeddings: reusing" in out and "document embeddings: encoding" not in out


@pytest.mark.slow
def test_token_level_mse_goes_down(tmp_path):
    run_train(*projection_args(tmp_path, "--run_name", "tok", "--trainer.max_steps", "30",
                               "--model.init_args.level", "token", "--model.init_args.learning_rate", "3e-3"))
    losses = list(read_loss_log(tmp_path / "runs" / "tok" / "losses.csv").values())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@pytest.mark.slow
def test_sigterm_then_resume_is_exact(projection_run, tmp_path):
    """SIGTERM mid-run saves last.ckpt (exit 143); resuming ends bit-identical to the uninterrupted run."""
    reference, _ = projection_run
    common = projection_args(tmp_path, "--run_name", "resumed")
    run = tmp_path / "runs" / "resumed"
    code, _, err = train_and_signal([*common, "--trainer.max_steps", "30"], run / "losses.csv", signal.SIGTERM)
    assert code == 143 and "received SIGTERM: saved" in err, err[-3000:]
    assert 10 <= torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 30
    proc = run_train(*common, "--trainer.max_steps", "30", "--ckpt_path", "last")
    assert "resuming" in proc.stdout
    assert read_loss_log(run / "losses.csv") == read_loss_log(reference / "losses.csv")
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(k.startswith("projection.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


# The no-projection baseline through train.py (nothing trains, its MSE is logged, the checkpoint holds nothing):
# tests/test_reproduce.py::test_demo_reproduces_every_table_and_figure_and_a_second_run_skips_everything runs it.


@pytest.fixture(scope="module")
def document_module():
    return TextualProjection(model={"pretrained": "tiny-phantom"}, domain_encoder={"pretrained": "tiny-bert"},
                             level="document", cache_embeddings=False)


def test_generation_through_the_projection(document_module):
    token = TextualProjection(model={"pretrained": "tiny-phantom"}, domain_encoder={"pretrained": "tiny-bert"}, level="token")
    for module in (document_module, token):
        images = module.generate(["a photo of a lung xray", "a photo of a lung xray with a visible pleural effusion"], steps=2)
        assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1


def test_document_vector_becomes_a_77_row_sequence_after_clips_start_state(document_module):
    m = document_module
    cond = m.conditioning(["a photo of a lung xray"])
    assert cond.shape == (1, 77, 32)
    assert torch.equal(cond[0, 0], m.sd.encode_prompts([""])[0, 0])  # CLIP's start-token state
    assert torch.equal(cond[0, 1], cond[0, 76])
    v = m.projection(m.conditioning.inputs(["a photo of a lung xray"]).float())
    assert torch.allclose(cond[0, 1], v[0])


def test_unconditional_input_is_clips_empty_prompt(document_module):
    assert torch.equal(document_module.conditioning.negative([""]), document_module.sd.encode_prompts([""]))


def test_token_alignment_truncates_and_pads_with_the_last_real_state():
    states = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = align_token_states(states, mask, 7)
    assert out[0, :, 0].tolist() == [0, 1, 2, 2, 2, 2, 2]
    assert out[1, :, 0].tolist() == [5, 6, 7, 8, 9, 9, 9]
    assert align_token_states(states, mask, 3)[1, :, 0].tolist() == [5, 6, 7]


def test_mlp_shape_and_depth():
    mlp = ProjectionMLP(16, 32, hidden_features=24, depth=3)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU", "Linear"]
    assert mlp(torch.zeros(4, 9, 16)).shape == (4, 9, 32)
    assert [type(m).__name__ for m in ProjectionMLP(8, 8).net] == ["Linear", "LayerNorm", "ReLU", "Linear"]  # the paper's


def test_width_mismatch_without_projection_names_both_sizes():
    with pytest.raises(ProjectionConfigError, match=r"16 wide.*CLIP's width, 32"):
        TextualProjection(model={"pretrained": "tiny-phantom"}, projection="none",
                          domain_encoder={"pretrained": "tiny-cxr-bert", "extraction": "projected"})


def test_unknown_level_is_a_clear_error():
    with pytest.raises(ProjectionConfigError, match=r"level: 'sentence'; expected one of document, token"):
        TextualProjection(model={"pretrained": "tiny-phantom"}, domain_encoder={"pretrained": "tiny-bert"}, level="sentence")


@pytest.mark.slow
def test_export_reloads_and_generates(projection_run, tmp_path):
    run, _ = projection_run
    out = tmp_path / "export"
    subprocess.run([PYTHON, str(REPO / "export.py"), str(run), str(out)], check=True, capture_output=True, cwd=REPO)
    assert (out / "projection.safetensors").is_file() and (out / "projection.json").is_file()
    trained = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    generator = load_export(out)
    assert generator.info["kind"] == "projection" and generator.info["strategy"] == "TextualProjection"
    for k, v in generator.conditioning.projection.state_dict().items():
        assert torch.equal(v, trained["projection." + k])
    assert generator.generate(["a photo of a lung xray"], steps=2).shape == (1, 3, 64, 64)


def test_missing_export_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="projection.json: missing"):
        load_projection(tmp_path)


@pytest.mark.slow
def test_export_for_another_encoder_width_names_both_sizes(projection_run, tmp_path):
    import json

    run, _ = projection_run
    out = tmp_path / "export"
    subprocess.run([PYTHON, str(REPO / "export.py"), str(run), str(out)], check=True, capture_output=True, cwd=REPO)
    config = json.loads((out / "projection.json").read_text())
    config["domain_encoder"] = {"pretrained": "tiny-cxr-bert", "extraction": "projected"}  # 16 wide, not 32
    (out / "projection.json").write_text(json.dumps(config))
    with pytest.raises(ProjectionConfigError, match=r"maps 32 -> 32 wide vectors.*'tiny-cxr-bert' \(projected\) gives 16"):
        load_export(out)
