"""export.py beyond the formats: the model card of every export, the Hub upload (private by default) up to the
network call, and --merge only where there are adapters to merge."""
from __future__ import annotations

import pytest

import export
from models.model_card import LAION_NOTICE, MIMIC_NOTICE, SYNTHETIC_NOTICE, model_card


class FakeHub:
    calls: list = []

    def create_repo(self, repo_id, private, exist_ok, repo_type):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type, commit_message):
        self.calls.append(("upload_folder", repo_id, folder_path))


@pytest.mark.slow
def test_every_export_has_a_model_card_and_uploads_privately(reference_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    out = tmp_path / "export"
    export.main([str(reference_run), str(out), "--push_to_hub", "someone/cxr-unet"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\nbase_model: tiny-phantom\n")
    assert "| strategy | UNetFineTuning |" in card and "| optimizer steps | 24 |" in card
    assert "MIMIC-CXR-JPG:" in card and "training images (No Finding, Pleural Effusion)" in card
    assert SYNTHETIC_NOTICE in card  # phantoms, not patients
    assert 'StableDiffusionPipeline.from_pretrained("THIS_FOLDER")' in card
    assert FakeHub.calls == [("create_repo", "someone/cxr-unet", True), ("upload_folder", "someone/cxr-unet", str(out))]
    assert "(private)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failed_upload_is_one_line_and_keeps_the_export(reference_run, tmp_path, monkeypatch):
    import huggingface_hub

    class Offline(FakeHub):
        def create_repo(self, *args, **kwargs):
            raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(SystemExit) as exit_:
        export.main([str(reference_run), str(tmp_path / "e"), "--push_to_hub", "someone/x"])
    message = str(exit_.value.code)
    assert message.startswith("export.py: error: --push_to_hub someone/x: OSError: Temporary failure") and "the export is in" in message
    assert (tmp_path / "e" / "export.json").is_file()


@pytest.mark.slow
def test_merge_applies_to_adapters_only(reference_run, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        export.main([str(reference_run), str(tmp_path / "m"), "--merge"])
    assert "--merge applies to strategies that train adapters (LoRA); UNetFineTuning" in str(exit_.value.code)


def test_a_card_carries_the_data_use_notice_that_applies():
    card = model_card({"kind": "lora", "strategy": "LoRAFineTuning", "base_model": {"pretrained": "CompVis/stable-diffusion-v1-4"}},
                      {"dataset": "MIMIC-CXR-JPG", "root": "/data/mimic-cxr-jpg/2.0.0", "findings": ["No Finding"], "train": [{}] * 10},
                      400, {"FID": "12.3"})
    assert MIMIC_NOTICE in card and "pipe.load_lora_weights" in card and "- FID: 12.3" in card
    assert "preset" not in card  # a Hub id loads as it is
    unmarked = model_card({"kind": "pipeline"}, {"dataset": "MIMIC-CXR-JPG", "root": "/data/phantom-study/mimic"}, 10)
    assert MIMIC_NOTICE in unmarked  # MIMIC's layout counts as patient data unless the datamodule marks it synthetic
    captions = model_card({"kind": "projection"}, {"dataset": "LAION captions", "captions": 1000, "caption_style": "document"}, 10)
    assert LAION_NOTICE in captions and SYNTHETIC_NOTICE not in captions and MIMIC_NOTICE not in captions
    on_preset = model_card({"kind": "textual_inversion", "base_model": {"pretrained": "tiny-phantom"}}, None, 10)
    assert "`tiny-phantom` is a cxr-diffusion preset, not a Hub id" in on_preset
