"""EMA of whatever a strategy trains: updated once per optimizer step, in every checkpoint, exact on resume, used for
sampling and export when asked (and saying so), refused where nothing trains."""
from __future__ import annotations

import json

import pytest
import torch

from callbacks.checkpointing import RunCheckpoint
from conftest import phantom_dm, quiet_trainer, straight_and_resumed
from lightning_modules.base import TrainedStateMismatch
from lightning_modules.unet import UNetFineTuning

TINY = {"pretrained": "tiny-random"}
EMA = {"decay": 0.9, "warmup": False}



def shadow(module) -> list[torch.Tensor]:
    return [s.detach().clone() for s in module.ema.model.shadow_params]


def test_ema_follows_each_optimizer_step_and_resumes_bit_identically(phantom_root, tmp_path):
    def fresh():
        return UNetFineTuning(model=TINY, learning_rate=1e-3, ema=EMA)

    straight, resumed, half = straight_and_resumed(fresh, phantom_root, tmp_path)
    assert straight.ema.model.optimization_step == 4
    trained = [p.detach() for p in straight.trainable_parameters()]
    assert any(not torch.equal(s, p) for s, p in zip(shadow(straight), trained))  # an average, not a copy
    assert torch.load(half, weights_only=True)["ema"]["optimization_step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(shadow(straight), shadow(resumed)))
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampling_and_export_use_the_ema_weights_and_say_so(phantom_root, tmp_path):
    module = UNetFineTuning(model=TINY, learning_rate=1e-2, ema=EMA)
    quiet_trainer(3).fit(module, datamodule=phantom_dm(phantom_root, tmp_path))
    trained = [p.detach().clone() for p in module.trainable_parameters()]
    with_ema = module.generate(["a photo of a lung xray"], seeds=[0], steps=2)
    assert all(torch.equal(a, b) for a, b in zip(trained, module.trainable_parameters()))  # swapped back after sampling
    with module.ema.swapped_in():
        assert all(torch.equal(s, p) for s, p in zip(module.ema.model.shadow_params, module.trainable_parameters()))
    module.ema.settings.use_for_sampling = False
    assert module.weights_in_use == "trained"
    assert not torch.allclose(module.generate(["a photo of a lung xray"], seeds=[0], steps=2), with_ema)
    module.ema.settings.use_for_sampling = True
    out = module.export(tmp_path / "export")
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["weights"] == "EMA" and manifest["ema"]["decay"] == 0.9
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    ema_by_name = dict(zip(names, module.ema.model.shadow_params))
    assert torch.equal(exported["conv_in.weight"], ema_by_name["sd.unet.conv_in.weight"])


@pytest.mark.parametrize("cls, kwargs", [
    ("lightning_modules.textual_inversion.TextualInversion", {}),
    ("lightning_modules.lora.LoRAFineTuning", {"rank": 2}),
    ("lightning_modules.unet_text_encoder.UNetTextEncoderFineTuning", {}),
])
def test_every_strategy_averages_exactly_what_it_trains(cls, kwargs):
    import importlib

    module_name, name = cls.rsplit(".", 1)
    module = getattr(importlib.import_module(module_name), name)(model=TINY, ema=EMA, **kwargs)
    assert module.ema.parameters == module.trainable_parameters() and module.ema.parameters


def test_ema_is_refused_where_nothing_trains_and_a_mismatched_resume_is_refused(phantom_root, tmp_path):
    from lightning_modules.projection import TextualProjection

    with pytest.raises(ValueError, match="ema: TextualProjection as configured trains nothing"):
        TextualProjection(model={"pretrained": "tiny-phantom"}, domain_encoder={"pretrained": "tiny-bert"}, projection="none", ema=EMA)
    ckpt = tmp_path / "plain.ckpt"
    quiet_trainer(1, callbacks=[RunCheckpoint(ckpt, every_n_steps=0)]).fit(UNetFineTuning(model=TINY), datamodule=phantom_dm(phantom_root, tmp_path))
    with pytest.raises(TrainedStateMismatch, match="holds no EMA"):
        quiet_trainer(2).fit(UNetFineTuning(model=TINY, ema=EMA), datamodule=phantom_dm(phantom_root, tmp_path), ckpt_path=str(ckpt))
