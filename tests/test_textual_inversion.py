"""Textual inversion: only the new rows train, prompts, bad input, resume, export to plain diffusers, DDP."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from callbacks.loss_log import read_loss_log
from conftest import PYTHON, REPO, demo_args, run_train, train_and_signal
from datamodules.mimic_cxr import MIMICCXRDataModule
from lightning_modules.base import TrainedStateMismatch, step_generator
from models.stable_diffusion import StableDiffusionSpec, load_stable_diffusion
from lightning_modules.textual_inversion import (
    DEFAULT_FINDING_PHRASES,
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    TextualInversion,
    TextualInversionConfigError,
    fix_legacy_eos_pooling,
)

TINY = StableDiffusionSpec(pretrained="tiny-random")
PAPER_CONFIGS = [f"textual_inversion_{p}_{i}" for p in ("object", "style") for i in ("radiology", "lung")]


def new_rows_key(module: TextualInversion) -> str:
    (key,) = module.trained_state_keys()
    return key


def checkpoint_rows(checkpoint: dict) -> torch.Tensor:
    """The only tensor a textual-inversion checkpoint holds (its key depends on the transformers version)."""
    (key,) = checkpoint["state_dict"]
    assert key.startswith("sd.text_encoder.") and key.endswith(".token_embedding.new_rows") and checkpoint["trained_keys"] == [key]
    return checkpoint["state_dict"][key]


def phantom_dm(root: Path, tmp_path: Path, **kwargs) -> MIMICCXRDataModule:
    return MIMICCXRDataModule(root=str(root), findings=["No Finding", "Pleural Effusion"], resolution=64, batch_size=4,
                              cache_dir=str(tmp_path / "cache"), **kwargs)


def fit(module, dm, ckpt_path=None, **trainer_kwargs) -> Trainer:
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                      limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------------- in process, tiny model
def test_only_the_new_rows_train_and_everything_else_is_bit_identical(phantom_root, tmp_path):
    # a large learning rate and weight decay: AdamW on the whole matrix would move every row
    module = TextualInversion(model=TINY, learning_rate=0.1, weight_decay=0.5)
    key = new_rows_key(module)
    assert module.token_embedding.new_rows.shape == (1, 32)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    table = module.token_embedding.base.weight.detach().clone()
    trainer = fit(module, phantom_dm(phantom_root, tmp_path), max_steps=3)
    after = module.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == [key]
    assert torch.equal(module.token_embedding.weight[: table.shape[0]], table)  # every existing row, bit for bit
    (group,) = trainer.optimizers[0].param_groups
    assert group["params"] == [module.token_embedding.new_rows]
    state = trainer.optimizers[0].state[module.token_embedding.new_rows]
    assert state["exp_avg"].shape == (1, 32)  # optimizer state: one row, not the vocabulary
    assert not any(p.requires_grad for n, p in module.named_parameters() if n != key)


def test_new_rows_start_from_the_initializer_and_prompts_use_the_new_id():
    module = TextualInversion(model=TINY, placeholder_tokens=[{"token": "<lung-xray>", "initializer": "lung"}])
    tok = module.sd.tokenizer
    lung = tok("lung", add_special_tokens=False).input_ids
    assert torch.equal(module.token_embedding.new_rows[0], module.token_embedding.base.weight[lung[0]])
    ids = tok("a photo of a <lung-xray>").input_ids
    assert module.token_ids["<lung-xray>"] in ids and len(ids) == 7
    # the token's row shapes the conditioning, and gradients reach it
    cond = module.conditioning(["a photo of a <lung-xray>"])
    cond.pow(2).sum().backward()
    assert module.token_embedding.new_rows.grad.abs().sum() > 0


def test_loss_goes_down_on_a_fixed_phantom_batch(phantom_root, tmp_path):
    """On a fixed batch with fixed noise, training the token lowers the loss.

    (The random tiny U-Net barely listens to its conditioning, so the per-step training loss of the
    demo is dominated by the noise draw; a fixed batch and fixed noise make the effect measurable.)"""
    dm = phantom_dm(phantom_root, tmp_path)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = TextualInversion(model=TINY)
    batch = module.with_prompts(batch)
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=0.05, weight_decay=0.0)

    def loss():
        return module.diffusion_loss(batch, step_generator(0, 99))["loss"]

    with torch.no_grad():
        first = loss().item()
    for _ in range(10):
        loss().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        last = loss().item()
    assert last < first * (1 - 1e-4), (first, last)


def test_bf16_mixed_fit_keeps_the_text_encoder_fp32_and_generates(phantom_root, tmp_path):
    module = TextualInversion(model=TINY, learning_rate=0.1)
    start = module.token_embedding.new_rows.detach().clone()
    fit(module, phantom_dm(phantom_root, tmp_path), precision="bf16-mixed", max_steps=2)
    assert next(module.sd.vae.parameters()).dtype == torch.bfloat16
    assert next(module.sd.unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.sd.text_encoder.parameters())
    assert not torch.equal(module.token_embedding.new_rows, start)
    images = module.generate(["a photo of a <lung-xray>"], steps=2)
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.float32 and torch.isfinite(images).all()


def test_prompts_follow_templates_and_findings_deterministically():
    obj = TextualInversion(model=TINY)
    assert obj.prompt_for("No Finding") == "a photo of a <lung-xray>"
    assert obj.prompt_for("Pleural Effusion") == "a photo of a <lung-xray> with a visible pleural effusion"
    style = TextualInversion(model=TINY, learnable_property="style")
    assert style.prompt_for("No Finding") == "a photo in the style of a <lung-xray>"
    assert style.to_token_prompt("a photo in the style of a lung xray") == "a photo in the style of a <lung-xray>"
    findings = ["No Finding", "Pleural Effusion"] * 8
    a = obj.training_prompts(findings, step_generator(0, 5))
    assert a == obj.training_prompts(findings, step_generator(0, 5))  # same step, same prompts (resume)
    assert a != obj.training_prompts(findings, step_generator(0, 6))
    assert len(set(a)) > 2 and all("<lung-xray>" in p and "{}" not in p for p in a)
    assert all(p.startswith(tuple(t[:-3] for t in OBJECT_TEMPLATES)) for p in a)
    assert all(("pleural effusion" in p) == (f == "Pleural Effusion") for p, f in zip(a, findings))
    assert "style" not in " ".join(a) and all("style" in t for t in STYLE_TEMPLATES)
    batch = {"instance": {"pixel_values": torch.zeros(2, 3, 8, 8), "prompt": ["x", "y"], "finding": ["No Finding", "Pleural Effusion"]}}
    assert obj.with_prompts(batch)["instance"]["prompt"] == [obj.prompt_for("No Finding"), obj.prompt_for("Pleural Effusion")]
    with pytest.raises(TextualInversionConfigError, match="'Edema' has no entry in finding_phrases"):
        obj.prompt_for("Edema")


def test_finding_phrases_rebuild_the_datamodules_paper_prompts():
    """Textual inversion and U-Net runs describe a finding with the same words (datamodules/prompts.py)."""
    from datamodules.mimic_cxr import DEFAULT_TEMPLATES

    assert set(DEFAULT_FINDING_PHRASES) == set(DEFAULT_TEMPLATES)
    for finding, prompt in DEFAULT_TEMPLATES.items():
        assert " ".join(filter(None, [OBJECT_TEMPLATES[0].format("lung xray"), DEFAULT_FINDING_PHRASES[finding]])) == prompt


def test_several_tokens_each_with_its_initializer_and_place(tmp_path):
    tokens = [
        {"token": "<lung-xray>", "initializer": "radiology"},
        {"token": "<pleural-effusion>", "initializer": "effusion"},
        {"token": "<no-findings>", "initializer": "normal"},
    ]
    module = TextualInversion(model=TINY, placeholder_tokens=tokens,
                              finding_phrases={"No Finding": "with <no-findings>", "Pleural Effusion": "with a visible <pleural-effusion>"})
    tok, table = module.sd.tokenizer, module.token_embedding.base.weight
    for row, t in zip(module.token_embedding.new_rows, tokens):
        assert torch.equal(row, table[tok(t["initializer"], add_special_tokens=False).input_ids[0]])
    assert module.prompt_for("Pleural Effusion") == "a photo of a <lung-xray> with a visible <pleural-effusion>"
    # a pleural-effusion prompt trains <lung-xray> and <pleural-effusion>, not <no-findings>
    module.conditioning([module.prompt_for("Pleural Effusion")]).pow(2).sum().backward()
    grad = module.token_embedding.new_rows.grad.abs().sum(1)
    assert grad[0] > 0 and grad[1] > 0 and grad[2] == 0
    out = module.export(tmp_path / "export")
    manifest = json.loads((out / "textual_inversion.json").read_text())
    files = [out / e["file"] for e in manifest["tokens"]]
    assert [e["token"] for e in manifest["tokens"]] == [t["token"] for t in tokens] and all(f.is_file() for f in files)

    pipe = load_stable_diffusion(TINY).pipeline()
    pipe.load_textual_inversion([str(f) for f in files])
    for t, row in zip(tokens, module.token_embedding.new_rows):
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(t["token"])], row)


def test_multi_vector_tokens_expand_like_diffusers(tmp_path):
    module = TextualInversion(model=TINY, placeholder_tokens=[{"token": "<lung-xray>", "initializer": "lung", "num_vectors": 3}])
    assert module.token_embedding.new_rows.shape == (3, 32)
    assert module.expand_prompt("a photo of a <lung-xray> with x") == "a photo of a <lung-xray> <lung-xray>_1 <lung-xray>_2 with x"
    module.conditioning(["a photo of a <lung-xray>"]).pow(2).sum().backward()
    assert (module.token_embedding.new_rows.grad.abs().sum(1) > 0).all()
    out = module.export(tmp_path / "export")
    from safetensors.torch import load_file

    assert load_file(out / "learned_embeds.safetensors")["<lung-xray>"].shape == (3, 32)
    pipe = load_stable_diffusion(TINY).pipeline()
    pipe.load_textual_inversion(str(out))
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a <lung-xray>", pipe.tokenizer)).input_ids
    assert ids[2:5] == pipe.tokenizer.convert_tokens_to_ids(["<lung-xray>", "<lung-xray>_1", "<lung-xray>_2"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"placeholder_tokens": [{"token": "lung", "initializer": "radiology"}]}, r"'lung' already exists in the tokenizer's vocabulary \(as 'lung</w>'"),
        ({"placeholder_tokens": [{"token": "<|endoftext|>", "initializer": "lung"}]}, "already exists in the tokenizer's vocabulary"),
        ({"placeholder_tokens": [{"token": "<x>", "initializer": "opossum"}]}, r"initializer 'opossum' of '<x>' is 5 tokens .*multi_token_initializer: average"),
        ({"templates": ["a photo of a lung xray"]}, r"templates: 'a photo of a lung xray' must contain \{\} exactly once"),
        ({"templates": ["a {} of a {}"]}, "exactly once"),
        ({"placeholder_tokens": [{"token": "<a>", "initializer": "lung"}, {"token": "<b>", "initializer": "lung"}]},
         r"\['<b>'\] appear in no training prompt"),
        ({"placeholder_tokens": [{"token": "<a>", "initializer": "lung"}, {"token": "<a>", "initializer": "xray"}]}, "occur more than once"),
        ({"placeholder_tokens": ["<a>"]}, "needs an initializer word"),
        ({"placeholder_tokens": [{"token": "<a b>", "initializer": "lung"}]}, "without spaces"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(TextualInversionConfigError, match=message):
        TextualInversion(model=TINY, **kwargs)


def test_data_that_cannot_train_the_token_is_refused_at_fit_start(tmp_path):
    from types import SimpleNamespace

    from lightning_modules.preparation import PriorPreservation

    module = TextualInversion(model=TINY)
    dm = MIMICCXRDataModule(root=str(tmp_path), findings=["No Finding", "Edema"], prompt_templates={"No Finding": "x", "Edema": "y"})
    module._trainer = SimpleNamespace(datamodule=dm)
    with pytest.raises(TextualInversionConfigError, match=r"finding\(s\) \['Edema'\] that have no entry in model.init_args.finding_phrases"):
        module.on_fit_start()
    with pytest.raises(TextualInversionConfigError, match="remove prior_preservation"):
        TextualInversion(model=TINY, prior_preservation=PriorPreservation())
    module._trainer = SimpleNamespace(datamodule=MIMICCXRDataModule(root=str(tmp_path), hflip_probability=0.5))
    with pytest.warns(UserWarning, match="flipped chest X-rays"):
        module.on_fit_start()


def test_multi_token_initializer_can_be_averaged():
    module = TextualInversion(model=TINY, placeholder_tokens=[{"token": "<x>", "initializer": "opossum"}], multi_token_initializer="average")
    ids = module.sd.tokenizer("opossum", add_special_tokens=False).input_ids
    assert len(ids) == 5
    assert torch.allclose(module.token_embedding.new_rows[0], module.token_embedding.base.weight[ids].mean(0))


def test_pooled_output_finds_eos_with_new_tokens():
    """SD v1.4's config says eos_token_id 2, with which CLIP pools at argmax(input_ids): a new token's id."""
    module = TextualInversion(model=TINY)
    te, tok = module.sd.text_encoder, module.sd.tokenizer
    ids = tok(["a photo of a <lung-xray>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos_pos = int((ids[0] == tok.eos_token_id).nonzero()[0])
    text_model = getattr(te, "text_model", te)
    text_model.eos_token_id = 2  # as SD v1.4's text_encoder/config.json
    with torch.no_grad():
        out = te(ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, ids[0].argmax()])  # pools at the new token
    assert fix_legacy_eos_pooling(te, tok.eos_token_id)
    with torch.no_grad():
        fixed = te(ids)
    assert torch.equal(fixed.pooler_output[0], fixed.last_hidden_state[0, eos_pos])
    assert torch.equal(fixed.last_hidden_state, out.last_hidden_state)  # SD's conditioning is unaffected either way


def test_checkpoint_of_other_tokens_is_refused():
    module = TextualInversion(model=TINY)
    checkpoint = {"state_dict": {}, "trained_keys": [new_rows_key(module)],
                  "placeholder_tokens": [{"token": "<lung-xray>", "initializer": "lung", "num_vectors": 2}]}
    with pytest.raises(TrainedStateMismatch, match=r"checkpoint holds tokens \[\('<lung-xray>', 2\)\]"):
        module.on_load_checkpoint(checkpoint)


def test_paper_configs_are_the_table_4_rows():
    from jsonargparse import ArgumentParser

    from lightning_modules.base import DiffusionModule

    seen = set()
    for name in PAPER_CONFIGS:
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        args = config["model"]["init_args"]
        (token,) = args["placeholder_tokens"]
        seen.add((args["learnable_property"], token["initializer"]))
        assert name == f"textual_inversion_{args['learnable_property']}_{token['initializer']}" == config["run_name"]
        assert token["token"] == "<lung-xray>" and args["model"]["pretrained"] == "CompVis/stable-diffusion-v1-4"
        assert config["trainer"]["max_steps"] == 3000
        assert config["data"]["init_args"]["findings"] == ["No Finding", "Pleural Effusion"]
        assert config["data"]["init_args"]["train_images_per_finding"] == 5
        assert config["data"]["init_args"]["hflip_probability"] == 0
        prompts = config["trainer"]["callbacks"][0]["init_args"]["prompts"]
        assert prompts == ["a photo of a <lung-xray>", "a photo of a <lung-xray> with a visible pleural effusion",
                           "a photo in the style of a <lung-xray>"]
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(DiffusionModule, "model", required=True)
        parser.parse_object({"model": config["model"]})  # every model key is known and well typed
    assert seen == {("object", "radiology"), ("object", "lung"), ("style", "radiology"), ("style", "lung")}


# ---------------------------------------------------------------------- train.py end to end
def ti_args(tmp: Path, *extra: str) -> list[str]:
    return demo_args(tmp, *extra, config="textual_inversion_demo")


@pytest.mark.slow
def test_demo_run_checkpoint_is_kilobytes_and_holds_only_the_new_rows(ti_run):
    path = ti_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint_rows(checkpoint).shape == (1, 32)
    assert checkpoint["global_step"] == 20 and checkpoint["placeholder_tokens"][0]["token"] == "<lung-xray>"
    (state,) = checkpoint["optimizer_states"][0]["state"].values()
    assert state["exp_avg"].shape == (1, 32)
    assert path.stat().st_size < 32_000, path.stat().st_size
    assert (ti_run / "samples" / "step_000020.png").is_file()
    losses = read_loss_log(ti_run / "losses.csv")
    assert sorted(losses) == list(range(20)) and all(0 < v < 10 for v in losses.values())


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(ti_run, tmp_path):
    """SIGTERM mid-run: last.ckpt is saved at the batch it finished (exit 143); --ckpt_path last ends where an
    uninterrupted run ends: the same losses, the same new rows, the same optimizer state."""
    common = ti_args(tmp_path, "--run_name", "resumed", "--trainer.callbacks=[]", "--wandb_mode", "disabled")
    run = tmp_path / "runs" / "resumed"
    code, _, err = train_and_signal([*common, "--trainer.max_steps", "20"], run / "losses.csv", signal.SIGTERM)
    assert code == 143 and "received SIGTERM: saved" in err, err[-3000:]
    assert 10 <= torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 20
    proc = run_train(*common, "--trainer.max_steps", "20", "--ckpt_path", "last")
    assert "resuming" in proc.stdout
    assert read_loss_log(run / "losses.csv") == read_loss_log(ti_run / "losses.csv")
    a = torch.load(ti_run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(checkpoint_rows(a), checkpoint_rows(b))
    (sa,), (sb,) = a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_export_loads_in_plain_diffusers_and_the_token_changes_the_image(ti_run, tmp_path):
    out = tmp_path / "export"
    subprocess.run([PYTHON, str(REPO / "export.py"), str(ti_run), str(out)], check=True, capture_output=True, cwd=REPO)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "export.json", "learned_embeds.safetensors", "textual_inversion.json"]
    assert json.loads((out / "export.json").read_text())["kind"] == "textual_inversion"
    manifest = json.loads((out / "textual_inversion.json").read_text())
    assert manifest["base_model"]["pretrained"] == "tiny-phantom" and manifest["tokens"][0]["token"] == "<lung-xray>"
    trained = checkpoint_rows(torch.load(ti_run / "checkpoints" / "last.ckpt", weights_only=True))

    # the base model as a plain diffusers folder, reloaded the way a user would
    from diffusers import StableDiffusionPipeline

    load_stable_diffusion(manifest["base_model"]).pipeline().save_pretrained(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a <lung-xray>"

    def image(p):
        return pipe(p, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images

    before = image(prompt)
    pipe.load_textual_inversion(str(out))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<lung-xray>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], trained[0])
    with_token = image(prompt)
    assert not torch.allclose(with_token, before) and not torch.allclose(with_token, image("a photo of a"))

    # plain diffusers draws what the trained module draws
    from lightning_modules.runs import load_run

    module, _ = load_run(ti_run)
    ours = module.generate([prompt], seeds=[0], steps=3, scheduler="ddim")
    assert torch.allclose(ours, with_token.float().cpu(), atol=1e-4)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    run_train(*ti_args(tmp_path, "--run_name", "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                       "--trainer.max_steps", "4", "--trainer.callbacks=[]", "--wandb_mode", "disabled"))
    checkpoint = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint_rows(checkpoint).shape == (1, 32)


# ---------------------------------------------------------------------- padded vocabulary (issue 19)
def padded_model(folder: Path, padding: int) -> StableDiffusionSpec:
    """tiny-random with ``padding`` rows past its tokenizer in the text encoder's embedding table, as a diffusers folder
    (as many checkpoints are: a tokenizer of N entries, a table of N + padding rows)."""
    sd = load_stable_diffusion(TINY)
    sd.text_encoder.resize_token_embeddings(len(sd.tokenizer) + padding, mean_resizing=False)
    sd.pipeline().save_pretrained(folder)
    return StableDiffusionSpec(pretrained=str(folder), local_files_only=True)


def plain_diffusers(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_padded_vocabulary_token_takes_the_first_padding_row_only_it_trains_and_diffusers_loads_it(phantom_root, tmp_path):
    """A table padded past the tokenizer: the new token takes id len(tokenizer), a padding row's place; training moves
    only its row (the frozen table, other padding rows included, stays bit-identical); plain diffusers loads the export
    into the same padded base with the same row and draws the same image."""
    spec = padded_model(tmp_path / "base", padding=16)
    module = TextualInversion(model=spec, learning_rate=0.1, weight_decay=0.5)
    emb, n_tok = module.token_embedding, len(module.sd.tokenizer) - 1  # tokenizer entries before the new token
    assert module.token_ids == {"<lung-xray>": n_tok} and emb.base.num_embeddings == n_tok + 16 == emb.num_embeddings
    assert emb.new_rows.shape == (1, 32) and emb.padding_rows == 15
    table = emb.base.weight.detach().clone()
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fit(module, phantom_dm(phantom_root, tmp_path), max_steps=3)
    after = module.state_dict()
    assert sorted(k for k in before if not torch.equal(before[k], after[k])) == [new_rows_key(module)]
    assert torch.equal(emb.base.weight, table) and not torch.equal(emb.new_rows[0], table[n_tok])
    weight = emb.weight
    assert weight.shape == table.shape and torch.equal(weight[n_tok], emb.new_rows[0])
    assert torch.equal(weight[:n_tok], table[:n_tok]) and torch.equal(weight[n_tok + 1 :], table[n_tok + 1 :])
    with torch.no_grad():  # lookups: the token's id gives its row, a padding id the untouched padding row
        assert torch.equal(emb(torch.tensor([n_tok, n_tok + 5, 3])), torch.stack([emb.new_rows[0], table[n_tok + 5], table[3]]))

    out = module.export(tmp_path / "export")
    pipe = plain_diffusers(tmp_path / "base")
    assert pipe.text_encoder.get_input_embeddings().num_embeddings == n_tok + 16
    pipe.load_textual_inversion(str(out))
    assert pipe.tokenizer.convert_tokens_to_ids("<lung-xray>") == n_tok
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[n_tok], emb.new_rows[0])
    prompt = "a photo of a <lung-xray>"
    theirs = pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = module.generate([prompt], seeds=[0], steps=3, scheduler="ddim")
    assert torch.allclose(ours, theirs.float().cpu(), atol=1e-4)


def test_padded_vocabulary_checkpoint_resumes_bit_identically(phantom_root, tmp_path):
    """Stopped after 1 step (mid-epoch, saved as train.py saves) and resumed to 2: the checkpoint holds the one new row;
    the result is the uninterrupted run's."""
    from callbacks.checkpointing import RunCheckpoint

    spec = padded_model(tmp_path / "base", padding=16)
    whole = TextualInversion(model=spec, learning_rate=0.1)
    whole_trainer = fit(whole, phantom_dm(phantom_root, tmp_path), max_steps=2)
    first = TextualInversion(model=spec, learning_rate=0.1)
    fit(first, phantom_dm(phantom_root, tmp_path), max_steps=1, callbacks=[RunCheckpoint(tmp_path / "step1.ckpt")])
    checkpoint = torch.load(tmp_path / "step1.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(checkpoint_rows(checkpoint), first.token_embedding.new_rows.detach())
    assert checkpoint_rows(checkpoint).shape == (1, 32)
    resumed = TextualInversion(model=spec, learning_rate=0.1)
    trainer = fit(resumed, phantom_dm(phantom_root, tmp_path), max_steps=2, ckpt_path=str(tmp_path / "step1.ckpt"))
    assert trainer.global_step == 2 and not torch.equal(resumed.token_embedding.new_rows, first.token_embedding.new_rows)
    assert torch.equal(resumed.token_embedding.new_rows, whole.token_embedding.new_rows)
    assert torch.equal(resumed.token_embedding.weight, whole.token_embedding.weight)
    (sa,), (sb,) = whole_trainer.optimizers[0].state.values(), trainer.optimizers[0].state.values()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_more_new_tokens_than_padding_rows_extend_the_table_past_it(tmp_path):
    """3 new ids, 2 padding rows: the ids run on past the table (no resize: the frozen table keeps its shape)."""
    spec = padded_model(tmp_path / "base", padding=2)
    module = TextualInversion(model=spec, placeholder_tokens=[{"token": "<lung-xray>", "initializer": "lung", "num_vectors": 3}])
    emb, n_tok = module.token_embedding, len(module.sd.tokenizer) - 3
    assert list(module.token_ids.values()) == [n_tok, n_tok + 1, n_tok + 2]
    assert emb.base.num_embeddings == n_tok + 2 and emb.num_embeddings == n_tok + 3 and emb.padding_rows == 0
    assert emb.weight.shape == (n_tok + 3, 32) and torch.equal(emb.weight[:n_tok], emb.base.weight[:n_tok])
    with torch.no_grad():
        emb.new_rows.add_(torch.randn(emb.new_rows.shape, generator=torch.Generator().manual_seed(0)))  # "trained" rows
    prompt = "a photo of a <lung-xray>"
    module.conditioning([prompt]).pow(2).sum().backward()
    assert (emb.new_rows.grad.abs().sum(1) > 0).all() and emb.base.weight.grad is None

    out = module.export(tmp_path / "export")
    pipe = plain_diffusers(tmp_path / "base")
    pipe.load_textual_inversion(str(out))
    names = ["<lung-xray>", "<lung-xray>_1", "<lung-xray>_2"]
    assert pipe.tokenizer.convert_tokens_to_ids(names) == [n_tok, n_tok + 1, n_tok + 2]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[n_tok : n_tok + 3], emb.new_rows)
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids)[0], module.conditioning([prompt]), atol=1e-5)

    from models.exports import load_export  # and our own loader, onto the padded base named in the export

    loaded = load_export(out).sd.text_encoder.get_input_embeddings()
    assert torch.equal(loaded.new_rows, emb.new_rows) and loaded.first_new_id == n_tok
