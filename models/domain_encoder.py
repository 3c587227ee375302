"""The domain text encoder of the textual-projection strategy (CXR-BERT by default), frozen.

A :class:`DomainEncoderSpec` names what to load and how to turn its output into one vector per text:

* ``pretrained``: a Hugging Face id or local folder of a BERT-family encoder
  (``microsoft/BiomedVLP-CXR-BERT-specialized`` by default), or a preset that needs no download, registered through
  the ``cxr_diffusion.domain_encoders`` entry points (:mod:`core.plugins`; the suite's own, ``tiny-bert`` and
  ``tiny-cxr-bert``, are in ``synthetic/presets.py``).

* ``extraction``: ``cls`` (the [CLS] row of the last hidden state), ``mean`` (mean of the last hidden
  state over the real tokens, [CLS] and [SEP] included, padding excluded), ``pooler`` (BERT's
  ``pooler_output``: tanh(Linear(CLS)), trained by next-sentence prediction), or ``projected``
  (CXR-BERT-specialized's L2-normalised ``[B, projection_size]`` embedding, its joint image-text space).

CXR-BERT-specialized ships remote code (``CXRBertModel``, a ``BertForMaskedLM`` subclass with model_type
``cxr-bert``) that cannot be fetched offline and is untested under transformers 5. It is therefore never
loaded with ``trust_remote_code``: a folder or id whose ``config.json`` says ``model_type: cxr-bert`` is
loaded into the local :class:`CXRBertModel` below, whose parameter names match the real checkpoint
(``bert.*`` and ``cls_projection_head.*``). The checkpoint's masked-LM head (``cls.predictions.*``) is
not needed to encode text and is skipped on load (as are legacy ``position_ids`` buffers). Every other
model type goes through ``AutoModel``/``AutoTokenizer``.

A checkpoint that lacks weights the model needs is an error, not a warning, since the missing parts would
be random: in particular ``pooler`` on a masked-LM checkpoint (CXR-BERT-general, RadBERT, ...), whose
pooler was never saved.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.bert.modeling_bert import BertPreTrainedModel

from core import plugins
from core.errors import UserError
from models.stable_diffusion import is_local_path

DEFAULT_DOMAIN_ENCODER = "microsoft/BiomedVLP-CXR-BERT-specialized"
EXTRACTIONS = ("cls", "mean", "pooler", "projected")


class DomainEncoderConfigError(UserError, ValueError):
    """A domain-encoder setting that cannot be used as given."""


@dataclass(frozen=True)
class DomainEncoderPreset:
    """A domain encoder that needs no download, registered under a name (``cxr_diffusion.domain_encoders``):
    ``build(seed) -> (model, tokenizer)`` with seeded weights."""

    name: str
    build: Callable[[int], tuple]


def preset_names() -> tuple[str, ...]:
    return plugins.names(plugins.DOMAIN_ENCODERS)
# Checkpoint keys of CXR-BERT-specialized that the encoder does not use (see the module docstring).
IGNORED_CHECKPOINT_KEYS = (r"^cls\.predictions\.", r"position_ids$")


@dataclass
class DomainEncoderSpec:
    """What domain text encoder to load and how to pool it.

    Args:
        pretrained: a Hugging Face id, a local folder (``config.json``, weights, tokenizer files), or a preset
            (``tiny-bert``, ``tiny-cxr-bert``).
        extraction: ``cls``, ``mean``, ``pooler`` or ``projected`` (CXR-BERT only); see the module docstring.
        revision: git revision of a hub id (branch, tag or commit).
        local_files_only: never touch the network; read the Hugging Face cache only.
        max_length: truncate texts to this many tokens ([CLS] and [SEP] included); default: the tokenizer's
            ``model_max_length``, capped by the model's ``max_position_embeddings``.
        seed: seed of the preset weights (ignored otherwise).
    """

    pretrained: str = DEFAULT_DOMAIN_ENCODER
    extraction: Literal["cls", "mean", "pooler", "projected"] = "cls"
    revision: Optional[str] = None
    local_files_only: bool = False
    max_length: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        if self.extraction not in EXTRACTIONS:
            raise DomainEncoderConfigError(f"extraction: unknown value {self.extraction!r}; expected one of {', '.join(EXTRACTIONS)}")
        if self.max_length is not None and int(self.max_length) < 3:  # [CLS] and [SEP] take two
            raise DomainEncoderConfigError(f"max_length: {self.max_length!r} leaves no room for a token between [CLS] and [SEP]; expected >= 3")

    @property
    def is_preset(self) -> bool:
        return self.pretrained in preset_names()

    def cache_key(self) -> str:
        """A short readable string identifying these weights and this extraction (for cache keys and provenance)."""
        if self.is_preset:
            source = f"{self.pretrained}-seed{self.seed}"
        elif is_local_path(self.pretrained):
            source = f"{Path(self.pretrained).expanduser().resolve()}"
        else:
            source = f"{self.pretrained}@{self.revision or 'main'}"
        key = f"{source}:{self.extraction}"
        if self.max_length is not None:
            key += f":max{int(self.max_length)}"
        return key


class DomainEncoderLoadError(UserError, RuntimeError):
    """The encoder named by a spec could not be found, read or used as asked."""


# ---------------------------------------------------------------------- CXR-BERT (local, no remote code)
class CXRBertConfig(BertConfig):
    """CXR-BERT's config: a ``BertConfig`` plus ``projection_size`` (128 for CXR-BERT-specialized)."""

    model_type = "cxr-bert"

    def __init__(self, projection_size: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.projection_size = projection_size


class BertProjectionHead(nn.Module):
    """CXR-BERT's projection of the [CLS] state: Linear(H→P), GELU, LayerNorm(P), Linear(P→P)."""

    def __init__(self, config: CXRBertConfig):
        super().__init__()
        self.dense_to_hidden = nn.Linear(config.hidden_size, config.projection_size)
        self.transform_act_fn = nn.functional.gelu
        self.LayerNorm = nn.LayerNorm(config.projection_size, eps=1e-12)
        self.dense_to_output = nn.Linear(config.projection_size, config.projection_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_to_output(self.LayerNorm(self.transform_act_fn(self.dense_to_hidden(hidden_states))))


@dataclass
class CXRBertOutput(ModelOutput):
    last_hidden_state: Optional[torch.FloatTensor] = None
    cls_projected_embedding: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


class CXRBertModel(BertPreTrainedModel):
    """The encoding half of microsoft/BiomedVLP-CXR-BERT-specialized's ``CXRBertModel``.

    Parameter names match the real checkpoint: ``bert.*`` (a ``BertModel`` without pooler, as inside
    ``BertForMaskedLM``) and ``cls_projection_head.*``. The masked-LM head ``cls.predictions.*`` is left out.
    """

    config_class = CXRBertConfig
    base_model_prefix = "bert"
    _keys_to_ignore_on_load_unexpected = list(IGNORED_CHECKPOINT_KEYS)

    def __init__(self, config: CXRBertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls_projection_head = BertProjectionHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        output_cls_projected_embedding: bool = False,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        **kwargs,
    ) -> CXRBertOutput:
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        h = out.last_hidden_state
        projected = self.cls_projection_head(h[:, 0, :]) if output_cls_projected_embedding else None
        return CXRBertOutput(last_hidden_state=h, cls_projected_embedding=projected, hidden_states=out.hidden_states, attentions=out.attentions)

    def get_projected_text_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize_embeddings: bool = True
    ) -> torch.Tensor:
        """``[B, projection_size]``: the projected [CLS] state, L2-normalised unless asked otherwise."""
        out = self.forward(input_ids=input_ids, attention_mask=attention_mask, output_cls_projected_embedding=True)
        emb = out.cls_projected_embedding
        return F.normalize(emb, dim=1) if normalize_embeddings else emb


# ---------------------------------------------------------------------- the frozen encoder
class DomainEncoding(NamedTuple):
    """What :meth:`DomainEncoder.encode` returns (a tuple: ``states, mask, doc = encoder.encode(texts)``)."""

    token_states: torch.Tensor  # [B, T, H] last hidden state, T = longest text in the batch
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens, 0 for padding
    document: torch.Tensor  # [B, output_size] one vector per text, by the spec's extraction


class DomainEncoder(nn.Module):
    """A frozen domain text encoder with its tokenizer.

    The model is always in eval mode (``train()`` does not switch it: BERT's dropout would otherwise make
    the frozen targets random during training) and has no trainable parameters. :meth:`encode` runs under
    ``torch.no_grad`` rather than ``inference_mode``, so its outputs can feed a trained projection.
    """

    def __init__(self, model: nn.Module, tokenizer, spec: DomainEncoderSpec, missing_keys: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.model.requires_grad_(False)
        self.model.eval()
        self.missing_keys = tuple(missing_keys)
        self._check_extraction()

    def extraction_unavailable(self, extraction: str) -> Optional[str]:
        """Why this encoder cannot give ``extraction`` (a sentence), or None when it can.

        Nothing is faked: ``pooler`` needs a pooler layer whose weights the checkpoint holds (masked-LM
        checkpoints such as CXR-BERT-general or RadBERT save none, so transformers would draw it at random),
        and ``projected`` needs CXR-BERT's projection head.
        """
        name = self.spec.pretrained
        if extraction not in EXTRACTIONS:
            raise ValueError(f"extraction: unknown value {extraction!r}; expected one of {', '.join(EXTRACTIONS)}")
        if extraction == "projected" and not self.is_cxr_bert:
            return (
                f"extraction 'projected' needs a CXR-BERT model (model_type 'cxr-bert', with a projection head); "
                f"{name!r} is {type(self.model).__name__} (model_type {self.model.config.model_type!r})"
            )
        if extraction == "pooler":
            if getattr(self.model, "pooler", None) is None:
                return (
                    f"extraction 'pooler': {name!r} ({type(self.model).__name__}) has no pooler layer"
                    + (" (CXR-BERT is a masked-LM model; its sentence embedding is 'projected')" if self.is_cxr_bert else "")
                )
            untrained = [k for k in self.missing_keys if "pooler" in k]
            if untrained:
                return (
                    f"extraction 'pooler': the checkpoint of {name!r} has no pooler weights ({sorted(untrained)} would be "
                    "random; masked-LM checkpoints do not save one)"
                )
        return None

    def _check_extraction(self) -> None:
        reason = self.extraction_unavailable(self.spec.extraction)
        if reason is not None:
            other = {"projected": "Use cls, mean or pooler.", "pooler": "Use cls or mean."}.get(self.spec.extraction, "")
            raise DomainEncoderLoadError(f"{reason}. {other}".strip())

    # ------------------------------------------------------------------ properties
    @property
    def is_cxr_bert(self) -> bool:
        return isinstance(self.model, CXRBertModel)

    @property
    def hidden_size(self) -> int:
        """Width of the token states (and of cls/mean/pooler document vectors)."""
        return int(self.model.config.hidden_size)

    @property
    def output_size(self) -> int:
        """Width of the document vector: ``projection_size`` for ``projected``, else ``hidden_size``."""
        if self.spec.extraction == "projected":
            return int(self.model.config.projection_size)
        return self.hidden_size

    @property
    def max_length(self) -> int:
        """Texts are truncated to this many tokens, [CLS] and [SEP] included."""
        limit = int(getattr(self.model.config, "max_position_embeddings", 512))
        tok_max = int(getattr(self.tokenizer, "model_max_length", limit) or limit)
        length = min(limit, tok_max)
        if self.spec.max_length is not None:
            length = min(length, int(self.spec.max_length))
        return length

    def cache_key(self) -> str:
        return self.spec.cache_key()

    def train(self, mode: bool = True) -> "DomainEncoder":
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the parent module does
        return self

    # ------------------------------------------------------------------ encoding
    def tokenize(self, texts: Sequence[str], device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (and ``token_type_ids`` where the tokenizer has them), padded to the longest text."""
        if isinstance(texts, str):
            raise TypeError("encode()/tokenize() take a list of texts, not a single string")
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        device = device if device is not None else next(self.model.parameters()).device
        return {k: v.to(device) for k, v in enc.items() if k in keep}

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> DomainEncoding:
        """``(token_states [B,T,H], attention_mask [B,T], document [B, output_size])`` for a list of texts."""
        batch = self.tokenize(texts)
        mask = batch["attention_mask"]
        extraction = self.spec.extraction
        if self.is_cxr_bert:
            out = self.model(**batch, output_cls_projected_embedding=extraction == "projected")
        else:
            out = self.model(**batch, return_dict=True)
        states = out.last_hidden_state
        if extraction == "cls":
            doc = states[:, 0]
        elif extraction == "mean":
            m = mask.unsqueeze(-1).to(states.dtype)
            doc = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
        elif extraction == "pooler":
            doc = out.pooler_output
        else:  # projected, as CXRBertModel.get_projected_text_embeddings(normalize_embeddings=True)
            doc = F.normalize(out.cls_projected_embedding, dim=1)
        return DomainEncoding(states, mask, doc)

    def forward(self, texts: Sequence[str]) -> DomainEncoding:
        return self.encode(texts)


# ---------------------------------------------------------------------- loading
def _build_preset(spec: DomainEncoderSpec) -> DomainEncoder:
    preset = plugins.load(plugins.DOMAIN_ENCODERS, spec.pretrained)
    with torch.random.fork_rng(devices=[]):  # a private RNG: the caller's global seed is untouched
        model, tokenizer = preset.build(spec.seed)
    return DomainEncoder(model, tokenizer, spec)


def _how_to_get_weights(spec: DomainEncoderSpec) -> str:
    return (
        f"Domain text encoder {spec.pretrained!r} could not be loaded. Either pass a local folder that holds its "
        "config.json, weights (model.safetensors or pytorch_model.bin) and tokenizer files (vocab.txt, "
        f"tokenizer_config.json), e.g. one made with `hf download {spec.pretrained} --local-dir <folder>` on a "
        "machine with internet access, or make sure the hub id is in your Hugging Face cache (HF_HOME). "
        f"Presets that need no download: {', '.join(preset_names()) or 'none installed'}."
    )


def _load_pretrained(spec: DomainEncoderSpec) -> DomainEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertTokenizer, PretrainedConfig

    source = spec.pretrained
    if is_local_path(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise DomainEncoderLoadError(f"{folder}: no such folder. " + _how_to_get_weights(spec))
        if not (folder / "config.json").is_file():
            raise DomainEncoderLoadError(f"{folder}: no config.json, so this is not a transformers model folder. " + _how_to_get_weights(spec))
        source = str(folder)
    kwargs = dict(revision=spec.revision, local_files_only=spec.local_files_only)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source, **kwargs)
    except (OSError, ValueError) as err:
        raise DomainEncoderLoadError(_how_to_get_weights(spec) + f"\nUnderlying error: {err}") from None
    model_type = config_dict.get("model_type")
    try:
        if model_type == CXRBertConfig.model_type:
            config = CXRBertConfig.from_pretrained(source, **kwargs)
            model, info = CXRBertModel.from_pretrained(source, config=config, dtype=torch.float32, output_loading_info=True, **kwargs)
            # The real repo's tokenizer_config points at remote code (CXRBertTokenizer, a plain BertTokenizer).
            tokenizer = BertTokenizer.from_pretrained(source, **kwargs)
        else:
            try:
                config = AutoConfig.from_pretrained(source, **kwargs)
            except ValueError as err:
                raise DomainEncoderLoadError(
                    f"{spec.pretrained!r}: model_type {model_type!r} is not a transformers architecture this suite can "
                    f"load without remote code (BERT-family models and 'cxr-bert' are supported). Underlying error: {err}"
                ) from None
            model, info = AutoModel.from_pretrained(source, config=config, dtype=torch.float32, output_loading_info=True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, EnvironmentError) as err:
        raise DomainEncoderLoadError(_how_to_get_weights(spec) + f"\nUnderlying error: {err}") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not re.search(r"position_ids$", k))
    needed = [k for k in missing if "pooler" not in k]  # the pooler is only needed for extraction 'pooler' (checked there)
    if needed:
        raise DomainEncoderLoadError(
            f"{spec.pretrained!r}: the checkpoint lacks {len(needed)} weight(s) the {type(model).__name__} needs "
            f"(they would be random), e.g. {needed[:5]}. Is it the model you meant?"
        )
    return DomainEncoder(model, tokenizer, spec, missing_keys=missing)


def load_domain_encoder(spec: DomainEncoderSpec | dict | str) -> DomainEncoder:
    """Load the encoder named by ``spec`` (a spec, a dict of its fields, or a bare id/preset string)."""
    if isinstance(spec, str):
        spec = DomainEncoderSpec(pretrained=spec)
    elif isinstance(spec, dict):
        spec = DomainEncoderSpec(**spec)
    if spec.is_preset:
        return _build_preset(spec)
    return _load_pretrained(spec)
