"""LoRA fine-tuning through ``peft`` (as diffusers' ``train_dreambooth_lora.py``; CheXGenBench tunes its large models
this way, and MemControl reports that parameter-efficient tuning memorizes less).

Low-rank adapters are added to the U-Net's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` by
default), and optionally to CLIP's (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``); only the adapters train, the base
weights stay bit-identical. Rank, alpha, dropout and the target modules are settings; the adapters start from a
generator seeded by ``seed`` (lora_A Gaussian, lora_B zero: the model starts as the base model). Checkpoints hold the
adapters and their optimizer state only: megabytes, not gigabytes.

The export is diffusers' LoRA format, which ``StableDiffusionPipeline.load_lora_weights(folder)`` loads in plain
diffusers on the base model (the scale ``alpha / rank`` folded into the up matrices, so any loader applies it), plus ``export.json`` (kind ``lora``); :func:`load_export` reads it back as a
:class:`~models.generator.Generator`, and ``export.py --merge`` writes a full pipeline with the adapters merged.

On the DiT families (:mod:`models.families`: Sana, SD 3.5, PixArt-Σ) the adapters go on the transformer's attention
projections, and are saved as the family's pipeline saves them (``SanaPipeline``/``StableDiffusion3Pipeline``
``save_lora_weights``), or, for a family whose pipeline has no LoRA loader (PixArt-Σ), through the base's own hooks
(``add_lora_adapter``, ``save_lora_weights``, ``load_lora_weights``, ``merge_lora``, ``lora_loading_code``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional

import torch

from core.errors import UserError
from lightning_modules.unet import UNetFineTuning
from models.exports import write_manifest
from models.generator import ClipConditioning, Generator

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoRAConfigError(UserError, ValueError):
    """A LoRA setting that cannot be used as given."""


def text_encoder_lora_unavailable() -> str | None:
    """Why adapters on CLIP cannot be used with the installed packages, or None when they can: transformers adds them
    (and diffusers' ``load_lora_weights`` loads them) only with a recent enough peft."""
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # transformers 4 has no such constant here; its integration takes older peft
        return None
    if Version(version("peft")) < Version(MIN_PEFT_VERSION):
        return (f"text_encoder_lora needs peft >= {MIN_PEFT_VERSION} with transformers {version('transformers')} "
                f"(installed: peft {version('peft')}); install a newer peft, or train adapters on the U-Net only")
    return None


def check_targets(model: torch.nn.Module, targets: list[str], where: str) -> None:
    """Each target must name a ``Linear`` or ``Conv2d`` of ``model`` (peft matches module names by suffix)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        known = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in names})
        raise LoRAConfigError(f"{where}: {missing} match no Linear or Conv2d module; the names there are {known}")


def fold_scale(weights: dict, scale: float) -> dict:
    """Adapters with ``scale`` multiplied into each up (lora_B) matrix: in diffusers' naming U-Net keys end in
    ``lora.up.weight``, CLIP's in ``lora_linear_layer.up.weight``; in peft's (the DiT families) ``lora_B.weight``. The
    down (lora_A) matrices are kept as they are."""
    names = {"lora_B": "up", "lora_A": "down"}
    kinds = {k: names.get(k.rsplit(".", 2)[-2], k.rsplit(".", 2)[-2]) for k in weights}  # the part before ".weight"
    unknown = sorted(k for k, kind in kinds.items() if kind not in ("up", "down"))
    if unknown or "up" not in kinds.values():  # a naming this does not know: refuse rather than export a wrong scale
        raise RuntimeError(f"LoRA export: adapter keys {unknown[:3] or sorted(weights)[:3]} are neither lora up nor down "
                           "matrices in diffusers' naming; the installed diffusers names them otherwise")
    return {k: v * scale if kinds[k] == "up" else v for k, v in weights.items()}


class LoRAFineTuning(UNetFineTuning):
    """Train low-rank adapters on the U-Net (and optionally on CLIP's text encoder).

    Args:
        rank: the adapters' rank r.
        alpha: their scale numerator (the update is ``alpha / rank * B A``); default: ``rank``.
        dropout: dropout on the adapters' input.
        target_modules: U-Net module names (suffixes) that get adapters.
        text_encoder_lora: adapters on CLIP's text encoder too (the text cache then turns itself off).
        text_encoder_target_modules: CLIP module names that get adapters.
        text_encoder_learning_rate: the text encoder adapters' learning rate (default: ``learning_rate``); only with
            ``text_encoder_lora``.
        learning_rate: peak learning rate of AdamW on the U-Net adapters (LoRA takes far larger rates than full tuning).
        **kwargs: see :class:`~lightning_modules.unet.UNetFineTuning` and :class:`~lightning_modules.base.DiffusionModule`.
    """

    def __init__(self, rank: int = 4, alpha: Optional[float] = None, dropout: float = 0.0,
                 target_modules: list[str] = list(UNET_TARGETS), text_encoder_lora: bool = False,
                 text_encoder_target_modules: list[str] = list(TEXT_TARGETS), text_encoder_learning_rate: Optional[float] = None,
                 learning_rate: float = 1e-4, **kwargs):
        if int(rank) < 1:
            raise LoRAConfigError(f"rank: {rank!r}; expected 1 or more")
        if alpha is not None and not (math.isfinite(float(alpha)) and float(alpha) > 0):  # 0 is not "unset"
            raise LoRAConfigError(f"alpha: {alpha!r}; expected a positive scale (or null: the rank)")
        if not 0.0 <= float(dropout) < 1.0:
            raise LoRAConfigError(f"dropout: {dropout!r}; expected a value in [0, 1)")
        if text_encoder_learning_rate is not None and not text_encoder_lora:
            raise LoRAConfigError("text_encoder_learning_rate is set but the text encoder is frozen (text_encoder_lora: false); "
                                  "set text_encoder_lora: true or remove the rate")
        if not target_modules:
            raise LoRAConfigError("target_modules: at least one U-Net module name is needed")
        if text_encoder_lora and kwargs.get("text_cache") == "disk":
            raise LoRAConfigError("text_cache: disk caches a frozen text encoder's outputs, but text_encoder_lora trains "
                                  "adapters on it (its outputs change at every step); set text_cache: memory")
        super().__init__(learning_rate=learning_rate, **kwargs)

    def configure_trainable(self) -> ClipConditioning:
        from peft import LoraConfig

        hp = self.hparams
        if hp.text_encoder_lora and self.sd.family != "stable-diffusion":
            raise LoRAConfigError(f"text_encoder_lora: adapters on the text encoder are implemented for CLIP (Stable Diffusion); "
                                  f"on {self.sd.family} bases they are not implemented yet. Set text_encoder_lora: false")
        if hp.text_encoder_lora and (why := text_encoder_lora_unavailable()):
            raise LoRAConfigError(why)
        denoiser = self.sd.denoiser
        denoiser.requires_grad_(False)
        check_targets(denoiser, list(hp.target_modules), "target_modules")
        config = dict(r=int(hp.rank), lora_alpha=float(self.lora_alpha), lora_dropout=float(hp.dropout), init_lora_weights="gaussian")
        with torch.random.fork_rng(devices=[]):  # the adapters start the same in every run with this seed
            torch.manual_seed(hp.seed)
            if hasattr(self.sd, "add_lora_adapter"):  # a denoiser without PeftAdapterMixin (PixArt's): its base adds them
                self.sd.add_lora_adapter(LoraConfig(target_modules=list(hp.target_modules), **config))
            else:
                denoiser.add_adapter(LoraConfig(target_modules=list(hp.target_modules), **config))
            if hp.text_encoder_lora:
                check_targets(self.sd.text_encoder, list(hp.text_encoder_target_modules), "text_encoder_target_modules")
                self.sd.text_encoder.add_adapter(LoraConfig(target_modules=list(hp.text_encoder_target_modules), **config))
        denoiser.train()
        if hp.text_encoder_lora:
            self.sd.text_encoder.train()
            return ClipConditioning(self.sd)
        return self.frozen_clip_conditioning()

    @property
    def lora_alpha(self) -> float:
        """The adapters' alpha: the setting, or the rank when it is unset."""
        return self.resume_settings(self.hparams)["alpha"]

    def resume_settings(self, hparams: Mapping) -> dict:
        """The adapters' rank, alpha, dropout and placement: a resume that changed them would put the saved adapters at
        another scale (alpha, rank), shape (rank) or place (targets), or train them under another dropout."""
        if "rank" not in hparams:  # not a LoRA checkpoint: the trained-tensor check names what differs
            return {}
        text = bool(hparams.get("text_encoder_lora"))
        return {"rank": hparams["rank"], "alpha": hparams["rank"] if hparams.get("alpha") is None else hparams["alpha"],
                "dropout": hparams.get("dropout"), "target_modules": list(hparams.get("target_modules") or []),
                "text_encoder_lora": text,
                "text_encoder_target_modules": list(hparams.get("text_encoder_target_modules") or []) if text else []}

    def param_groups(self) -> list[dict]:
        unet = [p for p in self.sd.denoiser.parameters() if p.requires_grad]
        text = [p for p in self.sd.text_encoder.parameters() if p.requires_grad]
        groups = [{"params": unet}]
        if text:
            groups.append({"params": text, "lr": self.hparams.text_encoder_learning_rate or self.hparams.learning_rate})
        return groups

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # the frozen base weights take the run's 16-bit dtype too; the adapters stay fp32 (diffusers' cast_training_params)
        dtype = self.frozen_dtype
        for part in (self.sd.denoiser, self.sd.text_encoder):
            if dtype != torch.float32 and next(part.parameters()).dtype == torch.float32:
                trained = [p for p in part.parameters() if p.requires_grad]
                part.to(dtype)
                for p in trained:
                    p.data = p.data.float()

    def adapter_state(self) -> dict:
        """``{"unet": ..., "text_encoder": ...}``: the adapters in diffusers' LoRA naming, float32 on the CPU (on a DiT
        family ``{"transformer": ...}`` in peft's naming, as diffusers' Sana and SD3 scripts save them)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if self.sd.family != "stable-diffusion":
            state = get_peft_model_state_dict(self.sd.denoiser)
            return {self.sd.denoiser_name: {k: v.detach().float().cpu().contiguous() for k, v in state.items()}}
        out = {"unet": convert_state_dict_to_diffusers(get_peft_model_state_dict(self.sd.unet))}
        if self.hparams.text_encoder_lora:
            out["text_encoder"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.sd.text_encoder))
        return {part: {k: v.detach().float().cpu().contiguous() for k, v in state.items()} for part, state in out.items()}

    def write_export(self, out_dir: Path) -> Path:
        """``pytorch_lora_weights.safetensors`` (diffusers' LoRA format) and ``export.json`` (kind ``lora``)."""
        from diffusers import StableDiffusionPipeline

        state = self.adapter_state()
        hp = self.hparams
        scale = float(self.lora_alpha) / int(hp.rank)
        # The scale alpha / rank is folded into lora_B ("lora.up"): diffusers' save_lora_weights writes no alpha (without
        # its *_lora_adapter_metadata), and load_lora_weights then builds adapters with alpha = rank. Folded, every
        # loader gives the trained update ``alpha / rank * B A`` (diffusers' train_dreambooth_lora.py passes the metadata
        # instead, which only loaders reading it honour).
        state = {part: fold_scale(weights, scale) for part, weights in state.items()}
        if hasattr(self.sd, "save_lora_weights"):  # a family without a diffusers LoRA loader says how it saves them
            self.sd.save_lora_weights(out_dir, state)
        elif self.sd.family != "stable-diffusion":  # the family's pipeline class saves its own layout (SanaPipeline: transformer)
            type(self.sd.pipeline()).save_lora_weights(out_dir, safe_serialization=True,
                                                       **{f"{name}_lora_layers": layers for name, layers in state.items()})
        else:
            StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state["unet"],
                                                      text_encoder_lora_layers=state.get("text_encoder"), safe_serialization=True)
        # a family whose pipeline has no load_lora_weights says how its export loads in plain diffusers (the model card's)
        extra = {"loading_code": self.sd.lora_loading_code()} if hasattr(self.sd, "lora_loading_code") else {}
        write_manifest(out_dir, "lora", type(self).__name__, dict(vars(self.spec)), trained=sorted(state), **extra,
                       lora={"rank": hp.rank, "alpha": self.lora_alpha, "scale_folded_into_lora_up": scale,
                             "dropout": hp.dropout,
                             "target_modules": list(hp.target_modules),
                             "text_encoder_target_modules": list(hp.text_encoder_target_modules) if hp.text_encoder_lora else []})
        return out_dir

    def write_merged_export(self, out_dir: Path) -> Path:
        """A full ``StableDiffusionPipeline`` folder with the adapters merged into the base weights (``export.py --merge``).
        The module's own U-Net and text encoder are merged in place: use it for nothing else afterwards."""
        pipe = self.sd.export_pipeline()
        if hasattr(self.sd, "merge_lora"):  # a family without a diffusers LoRA loader merges its own way
            self.sd.merge_lora()
        else:
            pipe.fuse_lora(components=self.adapter_parts())
            pipe.unload_lora_weights()
        for part in (self.sd.denoiser, pipe.vae, pipe.text_encoder):  # .float(): diffusers warns on .to(dtype) for nothing
            part.float()
        pipe.save_pretrained(out_dir, safe_serialization=True)
        write_manifest(out_dir, "pipeline", f"{type(self).__name__} (merged)", dict(vars(self.spec)),
                       trained=sorted(self.adapter_parts()), merged_lora={"rank": self.hparams.rank})
        return out_dir

    def adapter_parts(self) -> list[str]:
        return [self.sd.denoiser_name, "text_encoder"] if self.hparams.text_encoder_lora else [self.sd.denoiser_name]


def load_export(folder: Path, manifest: dict, base: Optional[str] = None) -> Generator:
    """A LoRA export on its base model (``base`` overrides the one ``export.json`` names): the ``lora`` export kind."""
    from models.stable_diffusion import load_stable_diffusion

    trained = manifest.get("base_model") or {}  # the text window it was trained with
    spec = ({"pretrained": base, "local_files_only": Path(base).is_dir(), "max_sequence_length": trained.get("max_sequence_length"),
             "long_prompts": trained.get("long_prompts", "truncate")} if base else manifest.get("base_model"))
    if not spec:
        raise ValueError(f"{folder}: LoRA weights without export.json do not name their base model; give the model they were "
                         "trained on")
    sd = load_stable_diffusion(spec)
    if hasattr(sd, "load_lora_weights"):  # a family without a diffusers LoRA loader reads its own
        sd.load_lora_weights(folder)
    else:
        sd.pipeline().load_lora_weights(str(folder))  # injects the adapters into sd's own denoiser and text encoder
    sd.requires_grad_(False)
    return Generator(sd)
