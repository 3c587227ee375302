"""Textual inversion (after Gal et al. 2022): teach Stable Diffusion new words for chest X-rays.

New placeholder tokens (``<lung-xray>``, ``<pleural-effusion>``, ...) are added to the CLIP tokenizer,
and only their embedding rows train. The VAE, the U-Net and every other text-encoder weight stay
frozen, and the rows of the existing vocabulary are bit-identical after training **by construction**:

* The text encoder's ``token_embedding`` is replaced by :class:`ExtendedTokenEmbedding`, which holds the
  original frozen ``nn.Embedding`` untouched plus one small ``new_rows`` Parameter
  ``[n_new, dim]``. Ids below the original vocabulary size look up the frozen table; the new ids
  look up ``new_rows``. The optimizer, its state, weight decay, gradients and checkpoints see only
  ``new_rows``: kilobytes instead of the 49408×768 matrix plus ~300 MB of AdamW state that
  diffusers' script carries (it trains the whole matrix and writes the old rows back after every
  step, diffusers#507/#1176).
* The ordinary tokenizer (extended with the new tokens) and the ordinary text encoder forward are
  used everywhere else, so ``StableDiffusion.encode_prompts``, pipelines and sampling need no change.

Prompts are built by the module from each image's finding, not taken from the datamodule: a
lexical variant of the templates (``learnable_property: object`` "a photo of a {}", ... or
``style`` "a photo in the style of a {}", ...) with ``{}`` replaced by the subject (by default the
first placeholder token), followed by the finding's phrase ("with a visible pleural effusion"). The
variant of each image is drawn from a generator seeded by ``(seed, rank, global batch index)``, so a
resumed run draws the same prompts as an uninterrupted one. Validation always uses the first
template. No images are flipped (the datamodule's default; a flipped chest X-ray has the heart on
the wrong side).

Multi-vector tokens (``num_vectors: k``) follow diffusers' naming: ``<tok>``, ``<tok>_1``, ...,
``<tok>_{k-1}``; a prompt's ``<tok>`` is expanded to all of them (as diffusers'
``maybe_convert_prompt`` does), in training and in generation alike.

CLIP pooled output: SD v1.4's text encoder config has the legacy ``eos_token_id: 2``, with which
transformers takes the *highest id* in a sequence as the EOS position. New tokens have ids above EOS
(49407), so the pooled output would point at the new token. Stable Diffusion conditions on
``last_hidden_state`` and never uses the pooled output, but studies that do (e.g. CLIP text
features) would be wrong silently; the module therefore sets the text model's ``eos_token_id`` to
the tokenizer's EOS id, which selects the first EOS position: the same position as before for every
prompt without new tokens, and the right one for prompts with them.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from datamodules.prompts import FINDING_PHRASES, PAPER_PROMPTS  # noqa: F401 (PAPER_PROMPTS re-exported)
from lightning_modules.base import DiffusionModule, TrainedStateMismatch, step_generator

# Lexical variants (our choice: diffusers' imagenet templates without the ones that make no sense for a
# radiograph, "dirty", "cool", "weird", ...). The first of each list is the paper's prompt form.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a good photo of a {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a rendering of a {}",
    "an image of a {}",
)
STYLE_TEMPLATES = (
    "a photo in the style of a {}",
    "a photo in the style of the {}",
    "a good photo in the style of a {}",
    "a close-up photo in the style of a {}",
    "a cropped photo in the style of a {}",
    "a rendering in the style of a {}",
    "an image in the style of a {}",
    "a picture in the style of a {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
# What a prompt says about the image's finding (appended after the template), as in the
# datamodule's paper prompts: "a photo of a lung xray with a visible pleural effusion".
DEFAULT_FINDING_PHRASES = dict(FINDING_PHRASES)
_PROMPT_KEY = 0x7E47  # keeps the prompt generator's seed apart from the noise generator's


class TextualInversionConfigError(ValueError):
    """A placeholder token, initializer, template or finding phrase cannot be used."""


@dataclass
class PlaceholderToken:
    """One new word.

    Args:
        token: the new string, e.g. ``<lung-xray>``; it must not be a word the tokenizer already knows.
        initializer: an existing word whose embedding starts the new row(s), e.g. ``radiology`` or ``lung``.
        num_vectors: embedding vectors for the token (diffusers' multi-vector tokens ``<tok>_1``, ...).
    """

    token: str = "<lung-xray>"
    initializer: str = "radiology"
    num_vectors: int = 1

    def names(self) -> list[str]:
        """The tokenizer entries of this token: ``token`` then ``token_1 .. token_{k-1}``."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]


class ExtendedTokenEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` plus trainable rows for ids ``>= base.num_embeddings``.

    The original table is never written to; ``new_rows`` is the only Parameter that trains.
    """

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.new_rows = nn.Parameter(new_rows.detach().clone().float())
        self.first_new_id = int(base.num_embeddings)

    @property
    def num_embeddings(self) -> int:
        return self.first_new_id + self.new_rows.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The full ``[vocab + n_new, dim]`` table (a fresh tensor, for code that reads ``.weight``)."""
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        old = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        new = F.embedding((input_ids - self.first_new_id).clamp(min=0), self.new_rows)
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)

    def extra_repr(self) -> str:
        return f"{self.first_new_id} frozen + {self.new_rows.shape[0]} trainable rows, dim {self.embedding_dim}"


def fix_legacy_eos_pooling(text_encoder, eos_token_id: int) -> bool:
    """Make CLIP's pooled output find EOS by id, not by ``argmax(input_ids)`` (see the module docstring).

    Returns True when the text model had the legacy ``eos_token_id == 2`` and was changed.
    """
    # transformers 4 keeps the transformer in ``text_model``; transformers 5 flattened it into the model
    text_model = getattr(text_encoder, "text_model", text_encoder)
    if getattr(text_model, "eos_token_id", None) != 2 or eos_token_id == 2:
        return False
    text_model.eos_token_id = int(eos_token_id)
    text_encoder.config.eos_token_id = int(eos_token_id)
    return True


class TextualInversion(DiffusionModule):
    """Learn embeddings of new tokens; everything else in Stable Diffusion is frozen.

    Args:
        placeholder_tokens: the new tokens, each with its initializer word and number of vectors.
        learnable_property: ``object`` ("a photo of a {}", ...) or ``style`` ("a photo in the style of a {}", ...).
        templates: lexical variants to use instead of the ``learnable_property`` defaults; each holds ``{}`` once.
        subject: what ``{}`` stands for (default: the first placeholder token). It may be plain text
            ("lung xray") when the new tokens describe findings only.
        finding_phrases: finding -> text appended to the template for images of that finding (may hold
            placeholder tokens, e.g. ``Pleural Effusion: with a visible <pleural-effusion>``).
        multi_token_initializer: an initializer word that the tokenizer splits into several tokens is an
            ``error`` (default), or its token embeddings are averaged (``average``).
        learning_rate: peak learning rate of AdamW (on the new rows only).
        **kwargs: see :class:`~lightning_modules.base.DiffusionModule`.
    """

    def __init__(
        self,
        placeholder_tokens: list[PlaceholderToken] = [PlaceholderToken()],
        learnable_property: Literal["object", "style"] = "object",
        templates: Optional[list[str]] = None,
        subject: Optional[str] = None,
        finding_phrases: dict[str, str] = DEFAULT_FINDING_PHRASES,
        multi_token_initializer: Literal["error", "average"] = "error",
        learning_rate: float = 5e-4,
        **kwargs,
    ):
        # Everything that can be checked without weights is checked before they load.
        self._tokens = _check_tokens(placeholder_tokens)
        if learnable_property not in TEMPLATES:
            raise TextualInversionConfigError(f"learnable_property: {learnable_property!r}; expected one of {sorted(TEMPLATES)}")
        self._templates = _check_templates(list(templates) if templates is not None else list(TEMPLATES[learnable_property]))
        self._subject = subject if subject is not None else self._tokens[0].token
        self._finding_phrases = {str(k): str(v or "").strip() for k, v in dict(finding_phrases).items()}
        if multi_token_initializer not in ("error", "average"):
            raise TextualInversionConfigError(f"multi_token_initializer: {multi_token_initializer!r}; expected 'error' or 'average'")
        self._multi_token_initializer = multi_token_initializer
        self._check_every_token_is_used()
        super().__init__(learning_rate=learning_rate, **kwargs)
        # hyperparameters stay plain data (checkpoints load with weights_only=True)
        self.hparams["placeholder_tokens"] = [asdict(t) for t in self._tokens]
        self.hparams["templates"] = list(templates) if templates is not None else None
        self.hparams["finding_phrases"] = dict(self._finding_phrases)

    # ------------------------------------------------------------------ configuration checks
    def _check_every_token_is_used(self) -> None:
        texts = [self._subject, *self._templates, *self._finding_phrases.values()]
        unused = [t.token for t in self._tokens if not any(t.token in text for text in texts)]
        if unused:
            raise TextualInversionConfigError(
                f"placeholder token(s) {unused} appear in no training prompt, so they would never train: put them in "
                f"subject (now {self._subject!r}), the templates or finding_phrases"
            )

    @property
    def placeholder_tokens(self) -> list[PlaceholderToken]:
        return list(self._tokens)

    @property
    def templates(self) -> list[str]:
        return list(self._templates)

    # ------------------------------------------------------------------ what a strategy defines
    def configure_trainable(self) -> None:
        """Add the tokens to the tokenizer and splice their rows into the text encoder (deterministic)."""
        tokenizer, text_encoder = self.sd.tokenizer, self.sd.text_encoder
        embeddings = text_encoder.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(f"the text encoder's input embedding is a {type(embeddings).__name__}, expected nn.Embedding")
        vocab = tokenizer.get_vocab()
        first_id = len(tokenizer)
        if first_id != embeddings.num_embeddings:
            raise TextualInversionConfigError(
                f"the tokenizer has {first_id} entries but the text encoder's embedding has {embeddings.num_embeddings} rows; "
                "new tokens need ids right after the embedding table"
            )
        init_rows = []
        for t in self._tokens:
            for name in t.names():
                pieces = tokenizer.tokenize(name)
                if name in vocab or (len(pieces) == 1 and pieces[0] in vocab):
                    known = name if name in vocab else pieces[0]
                    raise TextualInversionConfigError(
                        f"placeholder_tokens: {name!r} already exists in the tokenizer's vocabulary (as {known!r}, id "
                        f"{vocab[known]}); a placeholder must be a new string, e.g. '<{name.strip('<>')}>'"
                    )
            ids = tokenizer(t.initializer, add_special_tokens=False).input_ids
            if not ids:
                raise TextualInversionConfigError(f"placeholder_tokens: initializer of {t.token!r} is empty")
            if len(ids) > 1 and self._multi_token_initializer == "error":
                raise TextualInversionConfigError(
                    f"placeholder_tokens: initializer {t.initializer!r} of {t.token!r} is {len(ids)} tokens "
                    f"{tokenizer.convert_ids_to_tokens(ids)}, not one word of the vocabulary. Choose a word that is a "
                    "single token, or set multi_token_initializer: average to start from the mean of their embeddings"
                )
            with torch.no_grad():
                row = embeddings.weight[torch.tensor(ids)].float().mean(0)
            init_rows += [row] * t.num_vectors
        names = [n for t in self._tokens for n in t.names()]
        added = tokenizer.add_tokens(names)
        new_ids = tokenizer.convert_tokens_to_ids(names)
        if added != len(names) or new_ids != list(range(first_id, first_id + len(names))):
            raise RuntimeError(f"the tokenizer gave the new tokens ids {new_ids}, expected {first_id}..{first_id + len(names) - 1}")
        for name, token_id in zip(names, new_ids):
            got = tokenizer(name, add_special_tokens=False).input_ids
            if got != [token_id]:
                raise TextualInversionConfigError(
                    f"placeholder_tokens: {name!r} does not tokenize to its own id ({got} instead of [{token_id}]); "
                    "use a lower-case string without spaces, e.g. '<lung-xray>'"
                )
        _replace_module(text_encoder, embeddings, ExtendedTokenEmbedding(embeddings, torch.stack(init_rows)))
        fix_legacy_eos_pooling(text_encoder, tokenizer.eos_token_id)
        self.token_ids = dict(zip(names, new_ids))

    @property
    def token_embedding(self) -> ExtendedTokenEmbedding:
        return self.sd.text_encoder.get_input_embeddings()

    def expand_prompt(self, prompt: str) -> str:
        """Write each multi-vector token as all of its entries (``<tok>`` -> ``<tok> <tok>_1 ...``)."""
        for t in self._tokens:
            if t.num_vectors > 1:
                prompt = re.sub(re.escape(t.token) + r"(?!_\d)", " ".join(t.names()).replace("\\", "\\\\"), prompt)
        return prompt

    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP ``last_hidden_state`` with gradients into the new rows (``encode_prompts`` is no-grad)."""
        text_encoder = self.sd.text_encoder
        ids = self.sd.tokenize([self.expand_prompt(p) for p in prompts], self.token_embedding.new_rows.device)
        return text_encoder(ids)[0]

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        """``{token: [num_vectors, dim]}`` float32 on CPU."""
        rows = self.token_embedding.new_rows.detach().float().cpu()
        out, start = {}, 0
        for t in self._tokens:
            out[t.token] = rows[start : start + t.num_vectors].clone()
            start += t.num_vectors
        return out

    def export(self, out_dir: str | Path) -> Path:
        """``learned_embeds.safetensors`` that diffusers' ``load_textual_inversion`` loads, plus a json.

        One token: ``learned_embeds.safetensors`` ``{token: [dim]}`` (``[num_vectors, dim]`` for a
        multi-vector token), so ``pipe.load_textual_inversion(OUT_DIR)`` works. Several tokens: one
        ``learned_embeds-<name>.safetensors`` per token (diffusers' format holds one token per file);
        load them with ``pipe.load_textual_inversion([file, ...])``. ``textual_inversion.json``
        names the base model, the tokens, their files and initializers, and the templates.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        entries = []
        for t, rows in zip(self._tokens, self.learned_embeddings().values()):
            if len(self._tokens) == 1:
                name = "learned_embeds.safetensors"
            else:
                name = f"learned_embeds-{re.sub(r'[^A-Za-z0-9._-]+', '_', t.token).strip('_') or 'token'}.safetensors"
            tensor = rows[0] if t.num_vectors == 1 else rows
            save_file({t.token: tensor.contiguous()}, str(out / name))
            entries.append({**asdict(t), "file": name})
        if len({e["file"] for e in entries}) != len(entries):
            raise RuntimeError(f"two tokens map to the same file name: {[e['file'] for e in entries]}")
        manifest = {
            "format": "diffusers textual inversion (StableDiffusionPipeline.load_textual_inversion)",
            "base_model": dict(vars(self.spec)),
            "tokens": entries,
            "templates": self._templates,
            "subject": self._subject,
            "finding_phrases": self._finding_phrases,
        }
        (out / "textual_inversion.json").write_text(json.dumps(manifest, indent=1))
        return out

    # ------------------------------------------------------------------ prompts
    def prompt_for(self, finding: str, template_index: int = 0) -> str:
        """The training prompt of an image of ``finding`` with the ``template_index``-th template."""
        if finding not in self._finding_phrases:
            raise TextualInversionConfigError(
                f"finding {finding!r} has no entry in finding_phrases (model.init_args.finding_phrases, now for "
                f"{sorted(self._finding_phrases)}); add what its prompts should say, e.g. {finding!r}: 'with ...'"
            )
        prompt = self._templates[template_index].replace("{}", self._subject)
        phrase = self._finding_phrases[finding]
        return f"{prompt} {phrase}" if phrase else prompt

    def training_prompts(self, findings: Sequence[str], generator: Optional[torch.Generator] = None) -> list[str]:
        """One prompt per image: a template drawn with ``generator`` (the first one without) + the finding."""
        if generator is None:
            indices = [0] * len(findings)
        else:
            indices = torch.randint(len(self._templates), (len(findings),), generator=generator).tolist()
        return [self.prompt_for(f, i) for f, i in zip(findings, indices)]

    def with_prompts(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        """A copy of ``batch`` whose ``prompt`` is built from its ``finding`` and the templates."""
        if "instance" in batch:
            return {**batch, "instance": self.with_prompts(batch["instance"], generator)}
        if "finding" not in batch:
            raise KeyError("textual inversion builds prompts from each image's finding: batches need a 'finding' entry")
        return {**batch, "prompt": self.training_prompts(list(batch["finding"]), generator)}

    def to_token_prompt(self, prompt: str) -> str:
        """A paper prompt with "lung xray" replaced by the subject token ("a photo of a <lung-xray>")."""
        return prompt.replace("lung xray", self._subject)

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = step_generator(self.hparams.seed, _PROMPT_KEY, self.global_rank, self.trainer.fit_loop.total_batch_idx)
        return super().training_step(self.with_prompts(batch, g), batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return super().validation_step(self.with_prompts(batch), batch_idx)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "prior_preservation", None) is not None:
            raise TextualInversionConfigError(
                "data.init_args.prior_preservation is set, but textual inversion trains only the new token rows and "
                "class images without the token do not affect them; remove prior_preservation from the data config"
            )
        findings = list(getattr(datamodule, "findings", None) or self._finding_phrases)
        missing = [f for f in findings if f not in self._finding_phrases]
        if missing:
            raise TextualInversionConfigError(
                f"the data selects finding(s) {missing} that have no entry in model.init_args.finding_phrases "
                f"(it has {sorted(self._finding_phrases)}); add what their prompts should say"
            )
        if getattr(datamodule, "hflip_probability", 0) > 0:
            rank_zero_warn(
                f"data.init_args.hflip_probability is {datamodule.hflip_probability}: flipped chest X-rays put the heart on "
                "the wrong side, and the token learns that too"
            )
        self._warn_long_prompts([self.expand_prompt(self.prompt_for(f, i)) for f in findings for i in range(len(self._templates))])
        self.prepare_latent_cache()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["placeholder_tokens"] = [asdict(t) for t in self._tokens]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("placeholder_tokens")
        if saved is not None:
            mine = [asdict(t) for t in self._tokens]
            shape = lambda ts: [(t["token"], t["num_vectors"]) for t in ts]
            if shape(saved) != shape(mine):
                raise TrainedStateMismatch(
                    f"the checkpoint holds tokens {shape(saved)} (token, vectors) but this configuration has {shape(mine)}; "
                    "resume with the configuration the run was started with, or start a new run"
                )
        super().on_load_checkpoint(checkpoint)


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, module in root.named_modules():
        if module is old:
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
            return
    raise RuntimeError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")


def _check_tokens(tokens) -> list[PlaceholderToken]:
    if isinstance(tokens, (str, dict, PlaceholderToken)):
        tokens = [tokens]
    out = []
    for t in tokens or []:
        if isinstance(t, str):
            raise TextualInversionConfigError(
                f"placeholder_tokens: {t!r} needs an initializer word: write {{token: {t!r}, initializer: radiology}}"
            )
        t = PlaceholderToken(**dict(t)) if not isinstance(t, PlaceholderToken) else t
        if not t.token or t.token != t.token.strip() or any(c.isspace() for c in t.token):
            raise TextualInversionConfigError(f"placeholder_tokens: {t.token!r} must be a non-empty string without spaces")
        if "{" in t.token or "}" in t.token:
            raise TextualInversionConfigError(f"placeholder_tokens: {t.token!r} must not contain braces (templates use {{}})")
        if int(t.num_vectors) < 1:
            raise TextualInversionConfigError(f"placeholder_tokens: num_vectors of {t.token!r} is {t.num_vectors}; expected >= 1")
        out.append(PlaceholderToken(t.token, str(t.initializer), int(t.num_vectors)))
    if not out:
        raise TextualInversionConfigError("placeholder_tokens: at least one token is needed")
    names = [n for t in out for n in t.names()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TextualInversionConfigError(f"placeholder_tokens: {dupes} occur more than once (multi-vector tokens also use <tok>_1, ...)")
    return out


def _check_templates(templates: list[str]) -> list[str]:
    if not templates:
        raise TextualInversionConfigError("templates: at least one template is needed")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise TextualInversionConfigError(
                f"templates: {t!r} must contain {{}} exactly once (where the token goes), e.g. 'a photo of a {{}}'"
            )
    return list(templates)
