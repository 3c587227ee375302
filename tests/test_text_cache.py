"""The text-condition cache on disk (``text_cache: disk``): one safetensors file per prompt under core/cache.py's rules,
read back bit for bit; a fresh module reads it without running the text encoder; a run with it resumes bit-identically,
encodes every training prompt at fit start and then moves the frozen encoder off the accelerator (not called again while
training); it is refused where the text encoder trains; a damaged or foreign file is named in one line."""
from __future__ import annotations

import pytest
import torch

from conftest import straight_and_resumed
from core.cache import CacheError
from models.families import PromptCache, TextCondition, condition_bytes, read_condition

SANA = {"pretrained": "tiny-random-sana"}
PROMPT = "a photo of a lung xray with a visible pleural effusion"


def test_a_condition_round_trips_through_its_file_bit_for_bit_in_its_own_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    condition = TextCondition(torch.randn(1, 7, 5, generator=g).to(torch.bfloat16), torch.tensor([[1, 1, 1, 0, 0, 0, 0]]),
                              torch.randn(1, 3, generator=g).half())
    path = tmp_path / "c.safetensors"
    path.write_bytes(condition_bytes(PROMPT, condition))
    back = read_condition(path, PROMPT)
    for name in ("embeds", "mask", "pooled"):
        a, b = getattr(condition, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(CacheError, match="holds the condition of another prompt") as err:
        read_condition(path, "another prompt")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_the_cache_reads_memory_then_disk_then_encodes_and_writes(tmp_path):
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return TextCondition(torch.full((1, 2, 3), float(len(prompts[0]))), torch.ones(1, 2, dtype=torch.long))

    like = torch.zeros((), dtype=torch.float32)
    first = PromptCache(1)
    first.use_disk(tmp_path, lambda: {"model": "m"})
    out = first(["ab", "abc", "ab"], encode, like)
    assert calls == [["ab"], ["abc"]] and out.embeds[:, 0, 0].tolist() == [2.0, 3.0, 2.0]
    second = PromptCache(1)  # a fresh process: empty memory, the same entry
    second.use_disk(tmp_path, lambda: {"model": "m"})
    again = second(["abc", "ab"], encode, like)
    assert len(calls) == 2 and second.counts == {"encoded": 0, "read": 2}
    assert torch.equal(again.embeds, out.embeds[[1, 0]]) and torch.equal(again.mask, out.mask[[1, 0]])
    other = PromptCache(1)
    other.use_disk(tmp_path, lambda: {"model": "another"})  # another part: another entry, nothing stale is read
    other(["ab"], encode, like)
    assert other.counts == {"encoded": 1, "read": 0}


@pytest.fixture(scope="module")
def disk_runs(phantom_root, tmp_path_factory):
    """tiny-random-sana's transformer with the disk cache, straight for 4 steps and stopped at 2 then resumed, all three
    fits sharing one cache folder; each module counts its Gemma-2 calls before and after the encoder left for the CPU."""
    from lightning_modules.unet import UNetFineTuning

    tmp = tmp_path_factory.mktemp("text_cache")
    calls = []

    def fresh():
        module = UNetFineTuning(model=SANA, learning_rate=1e-3, text_cache="disk", text_cache_dir=str(tmp / "texts"))
        mine = {"before": 0, "after": 0}
        calls.append(mine)
        module.sd.text_encoder.register_forward_pre_hook(
            lambda *_: mine.__setitem__("after" if hasattr(module, "text_offload") else "before",
                                        mine["after" if hasattr(module, "text_offload") else "before"] + 1))
        return module

    straight, resumed, _ = straight_and_resumed(fresh, phantom_root, tmp)
    return straight, resumed, calls, tmp


def test_a_run_with_the_disk_cache_resumes_bit_identically_and_never_runs_the_encoder_while_training(disk_runs):
    straight, resumed, calls, _ = disk_runs
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = straight.text_offload
    prompts = len(set(straight.trainer.datamodule.training_prompts())) + 1  # and guidance's empty prompt
    assert record["prompts"] == prompts and record["encoded"] == prompts and record["read"] == 0
    assert record["moved"] and record["to"] == "cpu" and record["parameter_bytes"] == sum(
        p.numel() * p.element_size() for p in straight.sd.text_encoder.parameters())
    assert all(p.device.type == "cpu" for p in straight.sd.text_encoder.parameters())
    assert [c["after"] for c in calls] == [0, 0, 0]  # training read every prompt from the cache
    # the first fit encoded each prompt once; the stopped and the resumed fits (fresh modules) read them all from disk
    assert [c["before"] for c in calls] == [prompts, 0, 0]
    assert resumed.text_offload["encoded"] == 0 and resumed.text_offload["read"] == prompts


def test_a_damaged_or_foreign_file_in_the_entry_is_named_in_one_line(disk_runs):
    straight, _, _, tmp = disk_runs
    prompts = sorted(set(straight.trainer.datamodule.training_prompts()))
    conditioning = straight.sd.conditioning(4)
    conditioning.use_disk(tmp / "texts")
    like = next(straight.sd.text_encoder.parameters())
    entry = conditioning.cache.disk.entry(like.dtype, like.device.type)
    first, second = entry.file(prompts[0], ".safetensors"), entry.file(prompts[1], ".safetensors")
    assert first.is_file() and second.is_file()
    second.write_bytes(first.read_bytes())  # another prompt's condition under this prompt's name
    with pytest.raises(CacheError, match="holds the condition of another prompt") as err:
        conditioning([prompts[1]])
    assert str(second) in str(err.value) and "\n" not in str(err.value)
    first.write_bytes(first.read_bytes()[:100])  # cut short
    with pytest.raises(CacheError, match="not a readable safetensors file") as err:
        conditioning([prompts[0]])
    assert str(first) in str(err.value) and "\n" not in str(err.value)


def test_the_disk_cache_is_refused_where_the_text_encoder_trains_or_it_does_not_apply():
    from lightning_modules.base import ModuleConfigError
    from lightning_modules.unet import UNetFineTuning
    from lightning_modules.unet_text_encoder import UNetTextEncoderFineTuning
    from models.stable_diffusion import load_stable_diffusion

    with pytest.raises(ModuleConfigError, match="text_cache: disk .* trains the text encoder") as err:
        UNetTextEncoderFineTuning(model=SANA, text_cache="disk")
    assert "\n" not in str(err.value)
    with pytest.raises(ModuleConfigError, match="text_cache: 'ram'; expected one of memory, disk"):
        UNetFineTuning(model=SANA, text_cache="ram")
    with pytest.raises(ModuleConfigError, match="cache_text is false"):
        UNetFineTuning(model=SANA, text_cache="disk", cache_text=False)
    with pytest.raises(ModuleConfigError, match="Stable Diffusion's CLIP is cached in memory"):
        UNetFineTuning(model={"pretrained": "tiny-random"}, text_cache="disk")
    rewriting = load_stable_diffusion(SANA).conditioning(4, rewrite=lambda p: p)  # textual inversion's token rows
    with pytest.raises(Exception, match="rewrites prompts into trained token rows"):
        rewriting.use_disk("unused")
