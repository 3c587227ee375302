"""Textual inversion (after Gal et al. 2022): teach Stable Diffusion new words for chest X-rays.

New placeholder tokens (``<lung-xray>``, ``<pleural-effusion>``, ...) are added to the CLIP tokenizer,
and only their embedding rows train. The VAE, the U-Net and every other text-encoder weight stay
frozen, and the rows of the existing vocabulary are bit-identical after training **by construction**
(:mod:`models.token_embedding`: the new rows are their own small Parameter spliced into the embedding lookup). A
text encoder whose embedding table is padded past its tokenizer works too: the new tokens take the ids
``len(tokenizer)``, ... in the padding rows' places (and run on past the table when there are more of them than padding
rows); the padding rows themselves stay bit-identical, and the export loads in diffusers as for an unpadded table.

Prompts are built by the module from each image's finding, not taken from the datamodule: a
lexical variant of the templates (``learnable_property: object`` "a photo of a {}", ... or
``style`` "a photo in the style of a {}", ...) with ``{}`` replaced by the subject (by default the
first placeholder token), followed by the finding's phrase ("with a visible pleural effusion"). The
variant of each image is drawn from a generator seeded by ``(seed, rank, global batch index)``, so a
resumed run draws the same prompts as an uninterrupted one. Validation always uses the first
template. No images are flipped (the datamodule's default; a flipped chest X-ray has the heart on
the wrong side).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from datamodules.prompts import FINDING_PHRASES
from lightning_modules.base import DiffusionModule, TrainedStateMismatch, step_generator
from lightning_modules.preparation import Needs
from models.exports import write_manifest
from models.generator import ClipConditioning
from models.token_embedding import (ExtendedTokenEmbedding, PlaceholderToken, PlaceholderTokens,  # noqa: F401 (re-exported)
                                    TextualInversionConfigError, check_tokens, fix_legacy_eos_pooling)

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

    families = ("stable-diffusion", "sana")
    families_note = "its rows are spliced into CLIP's or Gemma-2's token embedding table, and rows in T5's (and SD 3.5's two CLIPs) are still to come"

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
        if kwargs.get("prior_preservation") is not None:
            raise TextualInversionConfigError(
                "model.init_args.prior_preservation is set, but textual inversion trains only the new token rows and "
                "class images without the token do not affect them; remove prior_preservation"
            )
        self._tokens = check_tokens(placeholder_tokens)
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
    def configure_trainable(self) -> ClipConditioning:
        """Add the tokens to the tokenizer and splice their rows into the text encoder (deterministic)."""
        self.placeholders = PlaceholderTokens(self.sd, self._tokens, self._multi_token_initializer)
        self.token_ids = self.placeholders.token_ids
        return self.sd.conditioning(rewrite=self.placeholders.expand)  # CLIP's, or the family's own (Sana: Gemma-2)

    def generator_options(self) -> dict:
        return {"tokens": [t.token for t in self._tokens], "subject": self._subject}

    @property
    def token_embedding(self) -> ExtendedTokenEmbedding:
        return self.sd.text_encoder.get_input_embeddings()

    def expand_prompt(self, prompt: str) -> str:
        """Write each multi-vector token as all of its entries (``<tok>`` -> ``<tok> <tok>_1 ...``)."""
        return self.placeholders.expand(prompt)

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        """``{token: [num_vectors, dim]}`` float32 on CPU."""
        return self.placeholders.learned()

    def write_export(self, out_dir: Path) -> Path:
        """``learned_embeds*.safetensors`` that diffusers' ``load_textual_inversion`` loads, ``textual_inversion.json``
        (the base model, the tokens, their files and initializers, the templates) and ``export.json``.

        One token: ``pipe.load_textual_inversion(OUT_DIR)`` works; several tokens: one ``learned_embeds-<name>.safetensors``
        per token (diffusers' format holds one token per file), ``pipe.load_textual_inversion([file, ...])``.
        """
        out = Path(out_dir)
        entries = self.placeholders.save(out)
        clip = self.sd.family == "stable-diffusion"
        manifest = {
            "format": ("diffusers textual inversion (StableDiffusionPipeline.load_textual_inversion)" if clip else
                       f"diffusers' textual-inversion files for {self.sd.family}'s text encoder (rows in the token embedding's "
                       "own row space; its pipeline has no load_textual_inversion: see the model card)"),
            "base_model": dict(vars(self.spec)),
            "tokens": entries,
            "templates": self._templates,
            "subject": self._subject,
            "finding_phrases": self._finding_phrases,
        }
        (out / "textual_inversion.json").write_text(json.dumps(manifest, indent=1))
        extra = {} if clip else {"loading_code": self.plain_loading_code(entries)}
        write_manifest(out, "textual_inversion", type(self).__name__, dict(vars(self.spec)),
                       files=[e["file"] for e in entries] + ["textual_inversion.json"], **extra)
        return out

    def plain_loading_code(self, entries: list[dict]) -> str:
        """How to load the tokens in plain diffusers where the pipeline has no ``load_textual_inversion`` (Sana): add
        the token names to the tokenizer, grow the embedding table and write the rows."""
        names = [n for t in self._tokens for n in t.names()]
        files = [e["file"] for e in entries]
        return "\n".join([
            f'pipe = {self.sd.pipeline_class}.from_pretrained("{self.spec.pretrained}")',
            "from safetensors.torch import load_file",
            f"rows = torch.cat([load_file(f'THIS_FOLDER/{{f}}')[t].reshape(-1, pipe.text_encoder.config.hidden_size) "
            f"for f, t in zip({files!r}, {[t.token for t in self._tokens]!r})])",
            f"pipe.tokenizer.add_tokens({names!r})",
            "pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))",
            f"pipe.text_encoder.get_input_embeddings().weight.data[-{len(names)}:] = rows",
        ])

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

    def needs(self) -> Needs:
        """The prompts checked for length are the token prompts this module builds, for every template and finding."""
        findings = self.trainer.datamodule.training_findings() or list(self._finding_phrases)
        missing = [f for f in findings if f not in self._finding_phrases]
        if missing:
            raise TextualInversionConfigError(
                f"the data selects finding(s) {missing} that have no entry in model.init_args.finding_phrases "
                f"(it has {sorted(self._finding_phrases)}); add what their prompts should say"
            )
        prompts = [self.expand_prompt(self.prompt_for(f, i)) for f in findings for i in range(len(self._templates))]
        return Needs(prompts=prompts, latents=bool(self.hparams.cache_latents))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["placeholder_tokens"] = [asdict(t) for t in self._tokens]

    def check_resumable(self, checkpoint: dict, datamodule=None, world_size: Optional[int] = None, strategy=None) -> None:
        saved = checkpoint.get("placeholder_tokens")
        if saved is not None:
            mine = [asdict(t) for t in self._tokens]
            shape = lambda ts: [(t["token"], t["num_vectors"]) for t in ts]
            if shape(saved) != shape(mine):
                raise TrainedStateMismatch(
                    f"the checkpoint holds tokens {shape(saved)} (token, vectors) but this configuration has {shape(mine)}; "
                    "resume with the configuration the run was started with, or start a new run"
                )
        super().check_resumable(checkpoint, datamodule, world_size, strategy)


def _check_templates(templates: list[str]) -> list[str]:
    if not templates:
        raise TextualInversionConfigError("templates: at least one template is needed")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise TextualInversionConfigError(
                f"templates: {t!r} must contain {{}} exactly once (where the token goes), e.g. 'a photo of a {{}}'"
            )
    return list(templates)
