"""Domain text encoder: tiny presets, each extraction, padding, the local CXR-BERT class and its checkpoint keys, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.domain_encoder import CXRBertConfig, CXRBertModel, DomainEncoderLoadError, DomainEncoderSpec, load_domain_encoder
from synthetic.presets import TINY_BERT_TOKENIZER_DIR, TINY_PROJECTION_SIZE, load_tiny_bert_tokenizer, tiny_bert_config

TEXTS = ["a photo of a lung xray", "a photo of a lung xray with a visible pleural effusion and cardiomegaly", "zebra"]
# The projection head's parameter names in microsoft/BiomedVLP-CXR-BERT-specialized's checkpoint.
REAL_HEAD_KEYS = {
    "cls_projection_head.dense_to_hidden.weight",
    "cls_projection_head.dense_to_hidden.bias",
    "cls_projection_head.LayerNorm.weight",
    "cls_projection_head.LayerNorm.bias",
    "cls_projection_head.dense_to_output.weight",
    "cls_projection_head.dense_to_output.bias",
}


@pytest.mark.parametrize(
    "preset, extraction, doc_size",
    [
        ("tiny-bert", "cls", 32),
        ("tiny-bert", "mean", 32),
        ("tiny-bert", "pooler", 32),
        ("tiny-cxr-bert", "cls", 32),
        ("tiny-cxr-bert", "mean", 32),
        ("tiny-cxr-bert", "projected", TINY_PROJECTION_SIZE),
    ],
)
def test_extractions_shapes(preset, extraction, doc_size):
    enc = load_domain_encoder(DomainEncoderSpec(preset, extraction=extraction))
    states, mask, doc = enc.encode(TEXTS)
    T = mask.shape[1]
    assert states.shape == (3, T, 32) and mask.shape == (3, T) and doc.shape == (3, doc_size)
    assert mask.sum(1).tolist()[2] < T  # the short text is padded
    assert enc.hidden_size == 32 and enc.output_size == doc_size
    assert not any(p.requires_grad for p in enc.parameters())
    assert not states.requires_grad
    if extraction == "cls":
        assert torch.equal(doc, states[:, 0])
    if extraction == "projected":
        assert torch.allclose(doc.norm(dim=1), torch.ones(3), atol=1e-5)


def test_presets_are_seeded_and_frozen_in_eval():
    a = load_domain_encoder("tiny-bert")
    b = load_domain_encoder(DomainEncoderSpec("tiny-bert"))
    c = load_domain_encoder(DomainEncoderSpec("tiny-bert", seed=1))
    assert torch.equal(a.encode(TEXTS).document, b.encode(TEXTS).document)
    assert not torch.equal(a.encode(TEXTS).document, c.encode(TEXTS).document)
    # a parent module switching to train mode does not turn the encoder's dropout on
    parent = torch.nn.Module()
    parent.enc = a
    parent.train()
    assert not a.model.training
    assert torch.equal(a.encode(TEXTS).document, b.encode(TEXTS).document)


@pytest.mark.parametrize("extraction", ["mean", "cls", "pooler"])
def test_padding_does_not_change_a_text(extraction):
    enc = load_domain_encoder(DomainEncoderSpec("tiny-bert", extraction=extraction))
    alone = enc.encode(["no finding"]).document
    _, mask, batched = enc.encode(["no finding", TEXTS[1]])
    assert mask[0].sum() < mask.shape[1]  # really padded
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    if extraction == "mean":  # and padding positions are really left out of the mean
        states, mask, _ = enc.encode(["no finding", TEXTS[1]])
        assert not torch.allclose(states[0].mean(0), batched[0], atol=1e-3)


def test_unknown_extraction_and_wrong_model_are_clear():
    with pytest.raises(ValueError, match=r"extraction: unknown value 'max'; expected one of cls, mean, pooler, projected"):
        DomainEncoderSpec("tiny-bert", extraction="max")
    with pytest.raises(DomainEncoderLoadError, match="'projected' needs a CXR-BERT model"):
        load_domain_encoder(DomainEncoderSpec("tiny-bert", extraction="projected"))
    with pytest.raises(DomainEncoderLoadError, match="has no pooler layer"):
        load_domain_encoder(DomainEncoderSpec("tiny-cxr-bert", extraction="pooler"))


def test_missing_weights_name_the_id(tmp_path):
    with pytest.raises(DomainEncoderLoadError) as err:
        load_domain_encoder(DomainEncoderSpec("nobody-org/no-such-encoder", local_files_only=True))
    msg = str(err.value)
    assert "'nobody-org/no-such-encoder'" in msg and "hf download nobody-org/no-such-encoder" in msg
    with pytest.raises(DomainEncoderLoadError, match="no such folder"):
        load_domain_encoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DomainEncoderLoadError, match="no config.json"):
        load_domain_encoder(str(tmp_path / "empty"))


def test_cache_key():
    assert DomainEncoderSpec("tiny-bert", "mean").cache_key() != DomainEncoderSpec("tiny-bert", "cls").cache_key()
    key = DomainEncoderSpec("microsoft/BiomedVLP-CXR-BERT-specialized", "projected", revision="abc").cache_key()
    assert key == "microsoft/BiomedVLP-CXR-BERT-specialized@abc:projected"
    assert load_domain_encoder("tiny-cxr-bert").cache_key() == "tiny-cxr-bert-seed0:cls"


# ---------------------------------------------------------------------- CXR-BERT checkpoint format
def fake_cxr_bert_folder(tmp_path: Path, weights: str = "pytorch_model.bin", drop: tuple = ()) -> tuple[Path, dict]:
    """A folder laid out like microsoft/BiomedVLP-CXR-BERT-specialized (remote-code config, MLM head in the
    checkpoint, legacy position_ids buffer, tokenizer_config naming the remote tokenizer class), tiny-sized."""
    tokenizer = load_tiny_bert_tokenizer()
    config = CXRBertConfig(projection_size=TINY_PROJECTION_SIZE, **tiny_bert_config(len(tokenizer)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = CXRBertModel(config).eval()
    H, V = config.hidden_size, config.vocab_size
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(drop)}
    state.update(
        {  # BertForMaskedLM's head and the old persistent buffer: present in the real checkpoint, unused here
            "bert.embeddings.position_ids": torch.arange(config.max_position_embeddings)[None],
            "cls.predictions.bias": torch.zeros(V),
            "cls.predictions.transform.dense.weight": torch.randn(H, H),
            "cls.predictions.transform.dense.bias": torch.zeros(H),
            "cls.predictions.transform.LayerNorm.weight": torch.ones(H),
            "cls.predictions.transform.LayerNorm.bias": torch.zeros(H),
            "cls.predictions.decoder.weight": state["bert.embeddings.word_embeddings.weight"].clone(),
            "cls.predictions.decoder.bias": torch.zeros(V),
        }
    )
    folder = tmp_path / "BiomedVLP-CXR-BERT-specialized"
    folder.mkdir()
    cfg = config.to_dict()
    cfg.update(
        architectures=["CXRBertModel"],
        auto_map={"AutoConfig": "configuration_cxrbert.CXRBertConfig", "AutoModel": "modeling_cxrbert.CXRBertModel"},
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    if weights.endswith(".bin"):
        torch.save(state, folder / weights)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights))
    shutil.copy(TINY_BERT_TOKENIZER_DIR / "vocab.txt", folder / "vocab.txt")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "do_lower_case": True,
                "model_max_length": 512,
                "tokenizer_class": "CXRBertTokenizer",
                "auto_map": {"AutoTokenizer": ["configuration_cxrbert.CXRBertTokenizer", None]},
            }
        )
    )
    return folder, {"model": model, "state": state}


def test_cxr_bert_class_has_the_real_key_names():
    tokenizer = load_tiny_bert_tokenizer()
    model = CXRBertModel(CXRBertConfig(projection_size=8, **tiny_bert_config(len(tokenizer))))
    keys = set(model.state_dict())
    assert REAL_HEAD_KEYS <= keys
    assert all(k.startswith("bert.") for k in keys - REAL_HEAD_KEYS)
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys
    assert not any("pooler" in k for k in keys)  # a BertForMaskedLM's BertModel has no pooler
    ids = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    emb = model.eval().get_projected_text_embeddings(ids.input_ids, ids.attention_mask)
    assert emb.shape == (3, 8) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    raw = model.get_projected_text_embeddings(ids.input_ids, ids.attention_mask, normalize_embeddings=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=1), emb)


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_cxr_bert_checkpoint_round_trips(tmp_path, weights):
    folder, ref = fake_cxr_bert_folder(tmp_path, weights)
    enc = load_domain_encoder(DomainEncoderSpec(str(folder), extraction="projected", local_files_only=True))
    assert isinstance(enc.model, CXRBertModel) and enc.is_cxr_bert
    loaded = enc.model.state_dict()
    assert set(loaded) == {k for k in ref["state"] if k.startswith(("bert.", "cls_projection_head.")) and not k.endswith("position_ids")}
    for k, v in loaded.items():
        assert torch.equal(v, ref["state"][k]), k
    _, mask, doc = enc.encode(TEXTS)
    ids = enc.tokenize(TEXTS)
    with torch.no_grad():
        expected = ref["model"].get_projected_text_embeddings(ids["input_ids"], ids["attention_mask"], normalize_embeddings=True)
    assert doc.shape == (3, TINY_PROJECTION_SIZE)
    assert torch.allclose(doc, expected, atol=1e-6)
    assert torch.allclose(doc.norm(dim=1), torch.ones(3), atol=1e-5)
    assert enc.max_length == 128  # capped by max_position_embeddings, not the tokenizer's 512


def test_cxr_bert_checkpoint_without_head_is_an_error(tmp_path):
    folder, _ = fake_cxr_bert_folder(tmp_path, "model.safetensors", drop=("cls_projection_head.",))
    with pytest.raises(DomainEncoderLoadError, match=r"lacks 6 weight\(s\).*cls_projection_head"):
        load_domain_encoder(DomainEncoderSpec(str(folder), extraction="projected"))


def test_plain_bert_folder_loads_with_automodel_and_refuses_untrained_pooler(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = load_tiny_bert_tokenizer()
    folder = tmp_path / "mlm-bert"
    BertForMaskedLM(BertConfig(**tiny_bert_config(len(tokenizer)))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    enc = load_domain_encoder(DomainEncoderSpec(str(folder), extraction="mean"))
    assert type(enc.model).__name__ == "BertModel"
    assert enc.encode(TEXTS).document.shape == (3, 32)
    with pytest.raises(DomainEncoderLoadError, match="has no pooler weights"):
        load_domain_encoder(DomainEncoderSpec(str(folder), extraction="pooler"))
