"""New words for CLIP: placeholder tokens whose embedding rows are the only trainable tensor (textual inversion).

:class:`PlaceholderTokens` adds tokens (``<lung-xray>``, ``<pleural-effusion>``, ...) to a Stable Diffusion's tokenizer
and splices their rows into the text encoder as an :class:`ExtendedTokenEmbedding`: the original frozen
``nn.Embedding`` untouched plus one small ``new_rows`` Parameter ``[n_new, dim]``. The new ids (``len(tokenizer)`` on)
look up ``new_rows``; every other id looks up the frozen table. A table whose lookup scales its rows (Gemma-2's
``embed_scale``, Sana's text encoder) scales the new rows alike, so they live in the table's own row space. The optimizer, its state, weight decay, gradients and
checkpoints see only ``new_rows``: kilobytes instead of the 49408×768 matrix plus ~300 MB of AdamW state that diffusers'
script carries (it trains the whole matrix and writes the old rows back after every step, diffusers#507/#1176). The
ordinary tokenizer (extended) and text-encoder forward are used everywhere else.

Padded tables: many checkpoints pad the text encoder's token-embedding table beyond the tokenizer (e.g. 54 tokenizer
entries, 70 rows). No tokenizer id reaches the padding rows, so the new tokens take the ids ``len(tokenizer)``, ... (what
the tokenizer gives them) and the padding rows' places; when more new tokens are needed than padding rows exist, the
ids past the table are looked up in ``new_rows`` too, so the table is never resized (where diffusers' training script
resizes it). The frozen table, padding rows included, stays bit-identical. diffusers' ``load_textual_inversion`` gives
the token the same id (it resizes the table to ``len(tokenizer) + n`` first, dropping the padding rows that no id
reaches), so exports load there unchanged.

Multi-vector tokens (``num_vectors: k``) follow diffusers' naming: ``<tok>``, ``<tok>_1``, ..., ``<tok>_{k-1}``; a
prompt's ``<tok>`` is expanded to all of them (as diffusers' ``maybe_convert_prompt`` does).

CLIP pooled output: SD v1.4's text encoder config has the legacy ``eos_token_id: 2``, with which transformers takes the
*highest id* in a sequence as the EOS position (docs/formats.md §6). New tokens have ids above EOS (49407), so the
pooled output would point at the new token. Stable Diffusion conditions on ``last_hidden_state`` and never uses the
pooled output, but studies that do would be wrong silently; :func:`fix_legacy_eos_pooling` therefore sets the text
model's ``eos_token_id`` to the tokenizer's EOS id, which selects the first EOS position: the same position as before
for every prompt without new tokens, and the right one for prompts with them.

Saved and loaded as diffusers' textual-inversion files (:meth:`PlaceholderTokens.save`, :func:`read_learned_embeddings`):
``learned_embeds.safetensors`` ``{token: [dim]}`` (``[num_vectors, dim]`` for a multi-vector token) for one token, one
``learned_embeds-<name>.safetensors`` per token for several, so ``pipe.load_textual_inversion(folder)`` loads them.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError


class TextualInversionConfigError(UserError, ValueError):
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
    """A frozen ``nn.Embedding`` plus trainable rows for the ids ``first_new_id .. first_new_id + n_new - 1``.

    ``first_new_id`` is the tokenizer's length: the table's size for an unpadded table, less for a padded one (see
    :class:`PlaceholderTokens`). Of a padded table, the new ids take the padding rows' places (they are looked up in
    ``new_rows`` instead); when there are more new ids than padding rows, the ids past the table are ``new_rows`` too,
    so the table is never resized. The original table is never written to; ``new_rows`` is the only Parameter that
    trains.
    """

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor, first_new_id: Optional[int] = None):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.new_rows = nn.Parameter(new_rows.detach().clone().float())
        self.first_new_id = int(base.num_embeddings if first_new_id is None else first_new_id)
        if not 0 <= self.first_new_id <= base.num_embeddings:
            raise ValueError(f"first_new_id {self.first_new_id} is outside the table of {base.num_embeddings} rows")

    @property
    def end_new_id(self) -> int:
        """One past the last new id."""
        return self.first_new_id + self.new_rows.shape[0]

    @property
    def num_embeddings(self) -> int:
        return max(self.base.num_embeddings, self.end_new_id)

    @property
    def padding_rows(self) -> int:
        """Rows of the original table past the tokenizer (padding) that no new id uses."""
        return max(self.base.num_embeddings - self.end_new_id, 0)

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The full ``[num_embeddings, dim]`` table as lookups see it (a fresh tensor, for code that reads ``.weight``)."""
        table = self.base.weight
        return torch.cat([table[: self.first_new_id], self.new_rows.to(table.dtype), table[self.end_new_id :]])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = (input_ids >= self.first_new_id) & (input_ids < self.end_new_id)
        old = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        new = F.embedding((input_ids - self.first_new_id).clamp(0, self.new_rows.shape[0] - 1), self.new_rows)
        scale = getattr(self.base, "embed_scale", None)  # Gemma's scaled lookup multiplies every row by sqrt(width)
        if scale is not None:
            new = new * scale.to(new.dtype)
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)

    def extra_repr(self) -> str:
        padding = f" + {self.padding_rows} frozen padding rows" if self.padding_rows else ""
        return (f"{self.first_new_id} frozen + {self.new_rows.shape[0]} trainable rows (ids {self.first_new_id}.."
                f"{self.end_new_id - 1}){padding}, dim {self.embedding_dim}")


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


def check_tokens(tokens) -> list[PlaceholderToken]:
    """``placeholder_tokens`` of a config (dicts, strings or tokens) as checked :class:`PlaceholderToken` s."""
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


class PlaceholderTokens:
    """The placeholder tokens spliced into a Stable Diffusion's tokenizer and text encoder (deterministic).

    Args:
        sd: the :class:`~models.stable_diffusion.StableDiffusion` whose CLIP gets the tokens (changed in place).
        tokens: the new tokens.
        multi_token_initializer: an initializer word that the tokenizer splits into several tokens is an ``error``, or
            its token embeddings are ``average`` d.
    """

    def __init__(self, sd, tokens: Sequence[PlaceholderToken], multi_token_initializer: Literal["error", "average"] = "error"):
        self.tokens = check_tokens(list(tokens))
        tokenizer, text_encoder = sd.tokenizer, sd.text_encoder
        embeddings = text_encoder.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(f"the text encoder's input embedding is a {type(embeddings).__name__}, expected nn.Embedding")
        first_id = len(tokenizer)  # a padded table (more rows than tokenizer entries): the new ids use its padding rows
        if first_id > embeddings.num_embeddings:
            raise TextualInversionConfigError(
                f"the tokenizer has {first_id} entries but the text encoder's embedding has only {embeddings.num_embeddings} "
                "rows: the tokenizer and text encoder do not belong together"
            )
        init_rows = [row for t in self.tokens for row in self._initial_rows(tokenizer, embeddings, t, multi_token_initializer)]
        names = [n for t in self.tokens for n in t.names()]
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
        self.embedding = ExtendedTokenEmbedding(embeddings, torch.stack(init_rows), first_id)
        _replace_module(text_encoder, embeddings, self.embedding)
        fix_legacy_eos_pooling(text_encoder, tokenizer.eos_token_id)
        self.token_ids = dict(zip(names, new_ids))

    @staticmethod
    def _initial_rows(tokenizer, embeddings: nn.Embedding, t: PlaceholderToken, multi: str) -> list[torch.Tensor]:
        vocab = tokenizer.get_vocab()
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
        if len(ids) > 1 and multi == "error":
            raise TextualInversionConfigError(
                f"placeholder_tokens: initializer {t.initializer!r} of {t.token!r} is {len(ids)} tokens "
                f"{tokenizer.convert_ids_to_tokens(ids)}, not one word of the vocabulary. Choose a word that is a "
                "single token, or set multi_token_initializer: average to start from the mean of their embeddings"
            )
        with torch.no_grad():
            row = embeddings.weight[torch.tensor(ids)].float().mean(0)
        return [row] * t.num_vectors

    def expand(self, prompt: str) -> str:
        """Write each multi-vector token as all of its entries (``<tok>`` -> ``<tok> <tok>_1 ...``)."""
        for t in self.tokens:
            if t.num_vectors > 1:
                prompt = re.sub(re.escape(t.token) + r"(?!_\d)", " ".join(t.names()).replace("\\", "\\\\"), prompt)
        return prompt

    def learned(self) -> dict[str, torch.Tensor]:
        """``{token: [num_vectors, dim]}`` float32 on CPU."""
        rows = self.embedding.new_rows.detach().float().cpu()
        out, start = {}, 0
        for t in self.tokens:
            out[t.token] = rows[start : start + t.num_vectors].clone()
            start += t.num_vectors
        return out

    def load(self, rows: torch.Tensor, where: str) -> None:
        """Set the rows (``[n_new, dim]``, token by token); ``where`` names their source in errors."""
        new_rows = self.embedding.new_rows
        if rows.shape != new_rows.shape:
            raise TextualInversionConfigError(
                f"{where}: the embeddings are {tuple(rows.shape)} but the base model's text encoder needs "
                f"{tuple(new_rows.shape)}; use the base model the tokens were trained on"
            )
        with torch.no_grad():
            new_rows.copy_(rows.to(new_rows))

    def save(self, folder: Path) -> list[dict]:
        """Write diffusers' ``learned_embeds*.safetensors`` (module docstring); returns one entry per token with its file."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for t, rows in zip(self.tokens, self.learned().values()):
            if len(self.tokens) == 1:
                name = "learned_embeds.safetensors"
            else:
                name = f"learned_embeds-{re.sub(r'[^A-Za-z0-9._-]+', '_', t.token).strip('_') or 'token'}.safetensors"
            save_file({t.token: (rows[0] if t.num_vectors == 1 else rows).contiguous()}, str(folder / name))
            entries.append({**asdict(t), "file": name})
        if len({e["file"] for e in entries}) != len(entries):
            raise RuntimeError(f"two tokens map to the same file name: {[e['file'] for e in entries]}")
        return entries


def read_learned_embeddings(folder: Path, entries: Optional[list[dict]] = None) -> tuple[list[PlaceholderToken], torch.Tensor]:
    """``(tokens, rows [n_new, dim])`` from diffusers' textual-inversion files in ``folder``.

    ``entries`` (from a manifest: token, initializer, num_vectors, file) say which file holds which token; without
    them every ``learned_embeds*.safetensors`` is read, one token per file, as diffusers writes them.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if entries is None:
        entries = []
        for f in sorted(folder.glob("learned_embeds*.safetensors")):
            tensors = load_file(str(f))
            if len(tensors) != 1:
                raise TextualInversionConfigError(f"{f}: holds {len(tensors)} tensors; diffusers' format holds one token per file")
            (token, rows), = tensors.items()
            entries.append({"token": token, "initializer": "a", "num_vectors": 1 if rows.dim() == 1 else rows.shape[0],
                            "file": f.name})
    tokens, rows = [], []
    for e in entries:
        t = PlaceholderToken(e["token"], e["initializer"], int(e["num_vectors"]))
        path = folder / e["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the export is incomplete")
        tensors = load_file(str(path))
        if t.token not in tensors:
            raise TextualInversionConfigError(f"{path}: holds {sorted(tensors)}, not the token {t.token!r}")
        tokens.append(t)
        rows.append(tensors[t.token].reshape(t.num_vectors, -1))
    return tokens, torch.cat(rows)


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, module in root.named_modules():
        if module is old:
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
            return
    raise RuntimeError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")
