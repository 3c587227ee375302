"""The training step every strategy shares, checkpoints of what was trained, and the sampling contract.

A strategy subclasses :class:`DiffusionModule` and says three things: what it trains and how prompts become U-Net
conditioning (:meth:`configure_trainable`, which returns the conditioning, a :mod:`models.generator` object), and how its
result is exported (:meth:`export`, through the plain model layer). Everything else is here:

* the step: images -> VAE latents -> noise at a random timestep -> U-Net -> MSE against ε (or v
  when the scheduler predicts v), optionally Min-SNR weighted, with prior preservation when the
  batch carries a ``"prior"`` half;
* randomness that survives a resume: each step's noise, timesteps and latent samples come from a
  generator seeded by ``(seed, rank, global batch index)``, so a resumed run draws exactly what an
  uninterrupted run would have drawn;
* fit-time preparation (class images, latent and document caches) through :mod:`lightning_modules.preparation`;
* checkpoints that hold only what was trained (the frozen parts are re-loaded from the spec), and its EMA
  (:mod:`lightning_modules.ema`) when one is kept;
* mixed precision: frozen parts take the run's weight dtype, trainable parameters stay fp32;
* ``generate(prompts, seed, steps, guidance)`` -> images in [0, 1] and :meth:`generator` (a plain
  :class:`~models.generator.Generator`), used by callbacks, ``generate.py`` and the studies.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn

from core.errors import UserError
from datamodules.contract import Prepared, TrainingData, require
from lightning_modules.ema import EMASettings, ParameterEMA
from lightning_modules.preparation import FitPreparation, Needs, PriorPreservation
from lightning_modules.resume import base_model_mismatch, data_identity, data_mismatch, world_size_mismatch
from lightning_modules.sharding import sharding_mismatch, sharding_of
from models.exports import update_manifest
from models.families import TimestepSampling
from models.generator import Conditioning, Generator
from models.stable_diffusion import StableDiffusionSpec, load_stable_diffusion, precision_to_dtype, weights_fingerprint


def step_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (order matters, no collisions between key tuples)."""
    seed = int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator("cpu").manual_seed(seed)


class TrainedStateMismatch(UserError, RuntimeError):
    """A checkpoint does not hold the parameters this configuration trains."""


class ModuleConfigError(UserError, ValueError):
    """A module setting that cannot be used as given."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite (``on_nonfinite_loss: stop``)."""


class DiffusionModule(LightningModule):
    """Shared training logic. Subclasses: UNetFineTuning, TextualInversion, TextualProjection.

    Args:
        model: which Stable Diffusion to start from (hub id, folder or preset).
        learning_rate: peak learning rate of AdamW.
        adam_betas, adam_epsilon, weight_decay: AdamW settings.
        lr_scheduler: a diffusers schedule name (constant, constant_with_warmup, linear, cosine, ...).
        lr_warmup_steps: linear warm-up steps.
        snr_gamma: Min-SNR-γ loss weighting (Hang et al. 2023); None = plain MSE. Applied per
            sample, to the instance and the prior half alike. DDPM bases only (Stable Diffusion).
        timestep_sampling: flow-matching bases (Sana): the timestep density and loss weighting of diffusers'
            ``training_utils`` (:class:`~models.families.TimestepSampling`); None = its defaults (uniform, unweighted,
            as diffusers' Sana and SD3 scripts).
        prior_preservation: DreamBooth-style prior preservation (class images from the base model, their loss
            weight); None = off. Strategies that cannot use it refuse it.
        ema: keep an exponential moving average of what trains (:mod:`lightning_modules.ema`); None = off.
        seed: seed of the per-step noise.
        keep_vae_fp32: keep the VAE in fp32 under 16-bit mixed precision (fp16 VAEs can overflow).
        sample_scheduler: sampler for ``generate`` (ddim, pndm, euler, dpm); None = the family's (ddim for Stable
            Diffusion, euler for flow-matching bases; those take euler or dpm).
        cache_latents: encode each training image with the frozen VAE once, before training, and draw
            latents from the cached posterior at each step (:mod:`datamodules.latent_cache`); needs a
            datamodule that supports it (MIMIC-CXR does) and no random flips.
        latent_cache_batch_size: images per VAE call while building that cache.
        gradient_checkpointing: recompute U-Net activations in the backward pass (less memory, slower).
        channels_last: U-Net in channels-last memory format (faster convolutions on recent GPUs).
        allow_tf32: TF32 matrix products and convolutions on Ampere or newer GPUs.
        compile_unet: ``torch.compile`` the U-Net (slow first steps; faster after on GPUs).
        optimizer: ``adamw`` (fused on GPU) or ``adamw8bit`` (bitsandbytes, GPU only: about 4x smaller
            optimizer state).
        flush_denormal: on CPU, flush denormal floats to zero (they slow CPU arithmetic by orders of
            magnitude once weights or gradients get tiny; GPUs under TF32/bf16 do this anyway).
        on_nonfinite_loss: a NaN/inf training loss ``stop``s the run with an error naming the step (the
            weights are not updated with it, and the last checkpoint stays as it was), or the batch is
            ``skip``ped with a warning (no optimizer step; with gradient accumulation the whole window's step is
            skipped; every rank skips together).
    """

    def __init__(
        self,
        model: StableDiffusionSpec = StableDiffusionSpec(),
        learning_rate: float = 5e-6,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_epsilon: float = 1e-8,
        weight_decay: float = 1e-2,
        lr_scheduler: str = "constant_with_warmup",
        lr_warmup_steps: int = 0,
        snr_gamma: Optional[float] = None,
        timestep_sampling: Optional[TimestepSampling] = None,
        prior_preservation: Optional[PriorPreservation] = None,
        ema: Optional[EMASettings] = None,
        seed: int = 0,
        keep_vae_fp32: bool = False,
        sample_scheduler: Optional[Literal["ddim", "pndm", "euler", "dpm"]] = None,
        cache_latents: bool = True,
        latent_cache_batch_size: int = 16,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        allow_tf32: bool = True,
        compile_unet: bool = False,
        optimizer: Literal["adamw", "adamw8bit"] = "adamw",
        flush_denormal: bool = True,
        on_nonfinite_loss: Literal["stop", "skip"] = "stop",
    ):
        super().__init__()
        if on_nonfinite_loss not in ("stop", "skip"):
            raise ModuleConfigError(f"on_nonfinite_loss: unknown value {on_nonfinite_loss!r}; expected 'stop' or 'skip'")
        self.spec = model if isinstance(model, StableDiffusionSpec) else StableDiffusionSpec(**dict(model))
        self.prior_preservation = _as(PriorPreservation, prior_preservation)
        ema = _as(EMASettings, ema)
        self.timestep_sampling = _as(TimestepSampling, timestep_sampling)
        # hyperparameters stay plain data so checkpoints load with weights_only=True
        self.save_hyperparameters(ignore=["model", "prior_preservation", "ema", "timestep_sampling"])
        self.hparams["model"] = dict(vars(self.spec))
        self.hparams["prior_preservation"] = dict(vars(self.prior_preservation)) if self.prior_preservation else None
        self.hparams["ema"] = dict(vars(ema)) if ema else None
        self.hparams["timestep_sampling"] = dict(vars(self.timestep_sampling)) if self.timestep_sampling else None
        self.sd = load_stable_diffusion(self.spec)
        self.check_family()
        objective = self.sd.objective.kind
        if snr_gamma is not None and objective != "ddpm":
            raise ModuleConfigError(f"snr_gamma: Min-SNR weighting is for DDPM bases; {self.sd.family} trains by flow matching "
                                    "(use timestep_sampling.weighting_scheme: logit_normal, mode, sigma_sqrt or cosmap)")
        if self.timestep_sampling is not None and objective != "flow-matching":
            raise ModuleConfigError(f"timestep_sampling: applies to flow-matching bases; {self.sd.family} is trained as DDPM "
                                    "(uniform timesteps; use snr_gamma to weight the loss)")
        self.conditioning: Conditioning = self.configure_trainable()
        self.ema = self._make_ema(ema)
        frozen = [(n, p) for n, p in self.sd.named_parameters() if not p.requires_grad]
        self.base_model = {"name": self.spec.cache_key(), "pretrained": self.spec.pretrained, "revision": self.spec.revision,
                           "frozen_fingerprint": weights_fingerprint(frozen)}
        self._data_identity: Optional[dict] = None
        # Checkpoints hold only the trained parameters, so loading is not strict; completeness of
        # the trained part is checked in on_load_checkpoint instead.
        self.strict_loading = False
        self._compiled = False
        # under FSDP (lightning_modules/sharding.py): the trained tensors' names and full shapes, recorded before wrapping
        self._sharded_shapes: Optional[dict[str, tuple]] = None
        self.prepared = Prepared()
        self.skipped_nonfinite: list[int] = []  # global steps whose batch was skipped
        self._window_bad = False  # a micro-batch of the current accumulation window had a non-finite loss (skipped)
        if gradient_checkpointing:
            self.sd.denoiser.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ what a strategy defines
    #: the base families (models/families.py) this strategy is implemented for; None: every family
    families: Optional[tuple[str, ...]] = None
    #: why it is not implemented on the others (one clause, for the refusal)
    families_note: str = ""

    def check_family(self) -> None:
        """Refuse, in one line, a base of a family this strategy does not implement."""
        if self.families is not None and self.sd.family not in self.families:
            raise ModuleConfigError(
                f"{type(self).__name__} is not implemented on {self.sd.family} bases ({self.spec.pretrained!r}) yet: "
                f"{self.families_note}. It runs on {', '.join(self.families)} bases; on {self.sd.family}, train the denoiser "
                "(UNetFineTuning) or LoRA adapters (LoRAFineTuning), with ema and prior_preservation as settings")

    def configure_trainable(self) -> Conditioning:
        """Mark what trains (``requires_grad``) and return how prompts become U-Net conditioning."""
        raise NotImplementedError

    def write_export(self, out_dir: Path) -> Path:
        """Write the trained parts into ``out_dir`` through the plain model layer, with ``export.json``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement export yet")

    def generator_options(self) -> dict:
        """Extra :class:`~models.generator.Generator` arguments of this strategy (tokens, subject)."""
        return {}

    def needs(self) -> Needs:
        """What to prepare at the start of fit (:mod:`lightning_modules.preparation`)."""
        data = self.trainer.datamodule
        return Needs(prompts=data.training_prompts(), latents=bool(self.hparams.cache_latents), prior=self.prior_preservation)

    # ------------------------------------------------------------------ EMA
    def _make_ema(self, settings: Optional[EMASettings]) -> Optional[ParameterEMA]:
        if settings is None:
            return None
        params = self.trainable_parameters()
        if not params:
            raise ModuleConfigError(f"ema: {type(self).__name__} as configured trains nothing (e.g. the 'none' projection baseline), so "
                             "there is nothing to average; remove ema")
        return ParameterEMA(params, settings)

    @property
    def weights_in_use(self) -> str:
        """Which weights sampling and export use: ``EMA`` or ``trained``."""
        return "EMA" if self.ema is not None and self.ema.settings.use_for_sampling else "trained"

    def sampling_weights(self):
        """A context in which the module holds the weights that sampling and export use (the EMA's, if so configured)."""
        return self.ema.swapped_in() if self.weights_in_use == "EMA" else nullcontext()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        def closure():
            # The closure runs the window's last micro-batch (training step and backward). If any micro-batch of the
            # window was skipped (on_nonfinite_loss: skip), the whole optimizer step is: the earlier micro-batches'
            # gradients are dropped, so AdamW updates nothing (it skips parameters without a gradient), and None tells
            # Lightning's fp16 plugin not to step its GradScaler. Without this, bf16/fp32 AdamW stepped on the rest of
            # the window's gradients.
            result = optimizer_closure() if optimizer_closure is not None else None
            if self._window_bad:
                optimizer.zero_grad(set_to_none=True)
                return None
            return result

        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        usable, self._window_bad = not self._window_bad, False
        # Free the gradients as soon as they are used. Lightning sets them to None only before the next backward,
        # i.e. after the next forward, so without this the forward's activations (the step's peak) sit on top of a
        # full set of fp32 gradients: for SD v1.4's U-Net 3.2 GiB of the 3.4 GiB we used to take over diffusers'
        # loop. Optimizer steps only happen at accumulation boundaries, so accumulation is unaffected.
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and usable:  # before any callback saves this step's checkpoint
            self.ema.update()

    # ------------------------------------------------------------------ generation and export
    def generator(self) -> Generator:
        """This model as a plain :class:`~models.generator.Generator` (shares the weights, no copy)."""
        return Generator(self.sd, self.conditioning, sample_scheduler=self.hparams.sample_scheduler or self.sd.default_sampler,
                         info={"strategy": type(self).__name__}, **self.generator_options())

    def generate(self, prompts: Sequence[str], **kwargs) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] (CPU, float32); image ``i`` uses seed ``seed + i``. Keyword arguments: those of
        :meth:`models.generator.Generator.generate` (seed, seeds, steps, guidance, negative_prompt, scheduler, height,
        width, batch_size); the networks run in the frozen parts' dtype, with :meth:`sampling_weights`."""
        with self.sampling_weights():
            return self.generator().generate(prompts, dtype=self.frozen_dtype, **kwargs)

    def export(self, out_dir: str | Path, merge: bool = False) -> Path:
        """The strategy's export (:meth:`write_export`) of the weights sampling uses; ``export.json`` says which.
        ``merge``: adapters merged into a full pipeline (strategies that train adapters only)."""
        with self.sampling_weights():
            out = self.write_merged_export(Path(out_dir)) if merge else self.write_export(Path(out_dir))
        update_manifest(out, weights=self.weights_in_use, ema=self.hparams.get("ema"), base_family=self.sd.family,
                        pipeline_class=self.sd.pipeline_class, sampling=self.sd.sampling_arguments)
        return out

    def write_merged_export(self, out_dir: Path) -> Path:
        raise ValueError(f"--merge applies to strategies that train adapters (LoRA); {type(self).__name__} exports its "
                         "trained weights as they are")

    # ------------------------------------------------------------------ trained state
    def trained_state_keys(self) -> list[str]:
        if self._sharded_shapes is not None:  # FSDP: state_dict() would gather every shard (a collective)
            return list(self._sharded_shapes)
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return [k for k in self.state_dict(keep_vars=True) if k in names]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: by default one, every trainable parameter at ``learning_rate``. A strategy
        that trains parts at different rates returns several (``{"params": [...], "lr": ...}``)."""
        return [{"params": self.trainable_parameters()}]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trained_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["trained_keys"] = sorted(keep)
        checkpoint["stable_diffusion_spec"] = dict(vars(self.spec))
        checkpoint["base_model"] = dict(self.base_model)
        if self._trainer is not None:
            checkpoint["world_size"] = int(self.trainer.world_size)
            if sharding_of(self.trainer.strategy):  # FSDP's optimizer state resumes only under FSDP
                checkpoint["sharding"] = sharding_of(self.trainer.strategy)
        data = self.data_identity()
        if data is not None:
            checkpoint["data"] = data
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def data_identity(self) -> Optional[dict]:
        """The attached datamodule's :func:`~lightning_modules.resume.data_identity` (computed once per fit)."""
        if self._data_identity is None and self._trainer is not None and self.trainer.datamodule is not None:
            self._data_identity = data_identity(self.trainer.datamodule)
        return self._data_identity

    def resume_settings(self, hparams: Mapping) -> dict:
        """The settings a resume must keep that the trained tensors' names do not show, computed from a module's
        hyperparameters (this one's, or those a checkpoint saved): none here; LoRA's rank, alpha, dropout and targets."""
        return {}

    def check_resumable(self, checkpoint: dict, datamodule=None, world_size: Optional[int] = None, strategy=None) -> None:
        """Refuse a checkpoint this configuration cannot continue: other strategy settings (:meth:`resume_settings`),
        other trained tensors or shapes, EMA or not, another base model, other data or batch size, another number of
        processes or another sharding (:mod:`lightning_modules.resume`, :mod:`lightning_modules.sharding`; the data of
        ``datamodule``, else of the attached one; ``world_size`` and ``strategy``, else the attached trainer's). Raises
        :class:`TrainedStateMismatch`."""
        saved, current = self.resume_settings(checkpoint.get("hyper_parameters") or {}), self.resume_settings(self.hparams)
        changed = [f"{key} {saved[key]!r} → {current[key]!r}" for key in current if key in saved and saved[key] != current[key]]
        if changed:
            raise TrainedStateMismatch(
                f"the checkpoint was trained with other {type(self).__name__} settings than this configuration gives: "
                f"{'; '.join(changed)}. A resumed run must keep them (the saved weights belong to them); resume with the "
                "run's own settings (its configs/start-*.yaml) or start a new run")
        if (self.ema is not None) != ("ema" in checkpoint):
            has = "holds an EMA" if "ema" in checkpoint else "holds no EMA (the run was started without ema)"
            raise TrainedStateMismatch(f"the checkpoint {has}, but this configuration {'keeps' if self.ema else 'has no'} one; "
                                       "resume with the configuration the run was started with, or start a new run")
        expected = set(self.trained_state_keys())
        found = set(checkpoint.get("trained_keys", checkpoint["state_dict"].keys()))
        if expected != found:
            missing, extra = sorted(expected - found), sorted(found - expected)
            raise TrainedStateMismatch(
                "the checkpoint does not match what this configuration trains "
                f"({len(missing)} trained tensors missing from it, e.g. {missing[:3]}; {len(extra)} unexpected, e.g. {extra[:3]}). "
                "Resume with the configuration the run was started with, or start a new run."
            )
        self._check_shapes(checkpoint["state_dict"])
        why = base_model_mismatch(checkpoint.get("base_model"), self.base_model)
        if why is None:
            data = data_identity(datamodule) if datamodule is not None else self.data_identity()
            why = data_mismatch(checkpoint.get("data"), data)
        if why is None:
            if world_size is None and self._trainer is not None:
                world_size = self.trainer.world_size
            why = world_size_mismatch(checkpoint.get("world_size"), world_size)
        strategy = strategy if strategy is not None else (self.trainer.strategy if self._trainer is not None else None)
        if why is None and "trained_keys" in checkpoint and strategy is not None:  # a resume, not an export's load
            why = sharding_mismatch(checkpoint.get("sharding"), sharding_of(strategy))
        if why:
            raise TrainedStateMismatch(why)

    def _check_shapes(self, saved: Mapping[str, torch.Tensor]) -> None:
        """The saved trained tensors must have this configuration's shapes (loading them would fail deep inside torch)."""
        current = self._sharded_shapes or {k: tuple(v.shape) for k, v in self.state_dict(keep_vars=True).items()}
        differ = [f"{key} {list(saved[key].shape)} → {list(current[key])}" for key in self.trained_state_keys()
                  if key in saved and tuple(saved[key].shape) != tuple(current[key])]
        if differ:
            raise TrainedStateMismatch(
                f"the checkpoint's trained tensors have other shapes than this configuration's ({len(differ)} differ, e.g. "
                f"{differ[0]}): it was trained with other settings. Resume with the configuration the run was started "
                "with, or start a new run")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._sharded_shapes is None:  # under FSDP the strategy checked it before loading (DenoiserFSDP.load_checkpoint)
            self.check_resumable(checkpoint)  # the attached datamodule's data identity
        if self.ema is not None:
            try:
                self.ema.load_state_dict(checkpoint["ema"])
            except ValueError as err:
                raise TrainedStateMismatch(str(err)) from None

    # ------------------------------------------------------------------ precision and setup
    @property
    def frozen_dtype(self) -> torch.dtype:
        return precision_to_dtype(self.trainer.precision) if self._trainer is not None else torch.float32

    def setup(self, stage: str) -> None:
        self.sd.set_frozen_dtype(self.frozen_dtype, keep_vae_fp32=self.hparams.keep_vae_fp32)
        hp = self.hparams
        if hp.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if hp.flush_denormal:
            torch.set_flush_denormal(True)  # a no-op (returns False) where the CPU does not support it
        if hp.channels_last:
            self.sd.denoiser.to(memory_format=torch.channels_last)
        if hp.compile_unet and not self._compiled:
            self.sd.denoiser.compile()  # in place: parameter names (and checkpoints) stay the same
            self._compiled = True

    def on_fit_start(self) -> None:
        data = require(self.trainer.datamodule, TrainingData, f"{type(self).__name__} (fit-time preparation)")
        self.prepared = FitPreparation(self).run(self.needs(), data)
        if self.ema is not None:
            self.ema.to(self.device)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the VAE posterior of images in [-1, 1] (for the latent cache)."""
        return self.sd.encode_posterior(pixels)

    # ------------------------------------------------------------------ the step
    def _split_batch(self, batch: dict) -> tuple[str, torch.Tensor, list[str], int]:
        """``(kind, images, prompts, n_instance)``: kind ``pixel_values`` or ``latent_dist`` (cached posteriors)."""
        if "instance" in batch:
            inst, prior = batch["instance"], batch.get("prior")
        else:
            inst, prior = batch, None
        kind = "latent_dist" if "latent_dist" in inst else "pixel_values"
        images, prompts = inst[kind], list(inst["prompt"])
        n_instance = images.shape[0]
        if prior is not None:
            images = torch.cat([images, prior[kind].to(images)])
            prompts += list(prior["prompt"])
        return kind, images, prompts, n_instance

    def latents_of(self, kind: str, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents (float32) of a batch of pixels or of cached posteriors, drawn with ``generator``."""
        if kind == "pixel_values":
            return self.sd.encode_images(images, generator).float()
        return self.sd.latents_from_posterior(images.to(self.device), generator)

    def diffusion_loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        kind, images, prompts, n_instance = self._split_batch(batch)
        sd = self.sd
        latents = self.latents_of(kind, images, generator)
        # the family's objective (models/families.py): DDPM ε/v as train_dreambooth.py, or rectified flow as the Sana and
        # SD3 scripts; the same generator draws noise, then timesteps, so a resumed run draws what the first one would
        draw = sd.objective.draw(latents, generator, self.timestep_sampling)
        pred = sd.denoise(draw.noisy, draw.timesteps, self.conditioning(prompts))
        per_sample = F.mse_loss(pred.float(), draw.target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        weights = sd.objective.weights(draw, self.hparams.snr_gamma, self.timestep_sampling).to(per_sample)
        weighted = per_sample * weights
        out = {"instance": weighted[:n_instance].mean(), "per_sample": per_sample.detach(), "weights": weights,
               "timesteps": draw.timesteps, "n_instance": n_instance}
        if per_sample.shape[0] > n_instance:
            out["prior"] = weighted[n_instance:].mean()
            weight = self.prior_preservation.loss_weight if self.prior_preservation is not None else 1.0
            out["loss"] = out["instance"] + weight * out["prior"]
        else:
            out["loss"] = out["instance"]
        return out

    def loss_is_usable(self, loss: torch.Tensor) -> bool:
        """False when the batch must be skipped; raises :class:`NonFiniteLossError` under ``stop``.

        The decision is taken on all ranks together (a rank that skipped alone would hang DDP).
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return True
        self._window_bad = True  # the optimizer step of this accumulation window is skipped (optimizer_step)
        step, batch = self.trainer.global_step, self.trainer.fit_loop.total_batch_idx
        value = float(loss.detach().float().mean()) if loss.numel() else float("nan")
        if self.hparams.get("on_nonfinite_loss", "stop") == "skip":
            self.skipped_nonfinite.append(step)
            window = self.trainer.accumulate_grad_batches
            what = (f"batch skipped, and the optimizer step of its accumulation window ({window} batches) too: weights not "
                    "updated at this step" if window > 1 else "batch skipped, weights not updated")
            rank_zero_warn(f"non-finite training loss ({value}) at step {step} (batch {batch}): {what} "
                           f"(on_nonfinite_loss: skip; {len(self.skipped_nonfinite)} skipped so far)")
            return False
        raise NonFiniteLossError(
            f"the training loss is {value} at step {step} (batch {batch}); the run stops before updating the weights with it, "
            "and the last checkpoint is the one written before. Lower the learning rate, prefer bf16 to fp16, or set "
            "model.init_args.on_nonfinite_loss: skip to skip such batches."
        )

    @contextmanager
    def step_rng(self, batch: int):
        """A context in which the global RNG (what dropout draws from, e.g. peft's ``lora_dropout``) is seeded from
        (seed, rank, batch): other masks on every rank, the same masks after a resume, and the stream outside it
        (data order, worker seeds) untouched. diffusers' scripts leave dropout on the global RNG that
        ``accelerate.set_seed`` gives every rank alike; we differ on purpose (the ranks' samples are different
        samples, their dropout should be too). The noise and timesteps have their own generator (:func:`step_generator`).
        """
        seed = int(step_generator(self.hparams.seed, self.global_rank, batch, 0xD0).initial_seed())
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.manual_seed(seed)
            yield

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        step = self.trainer.fit_loop.total_batch_idx
        g = step_generator(self.hparams.seed, self.global_rank, step)
        with self.step_rng(step):  # backward replays no RNG (recomputed checkpoints restore the forward's states)
            losses = self.diffusion_loss(batch, g)
        if not self.loss_is_usable(losses["loss"]):
            return None
        bs = losses["n_instance"]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        if "prior" in losses:
            self.log("train/instance_loss", losses["instance"], batch_size=bs)
            self.log("train/prior_loss", losses["prior"], batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # the same noise every validation, so the curve compares like with like
        g = step_generator(self.hparams.seed, 7_777, self.global_rank, batch_idx)
        losses = self.diffusion_loss(batch, g)
        self.log("val/loss", losses["loss"], prog_bar=True, sync_dist=True, batch_size=len(batch["prompt"]))
        return losses["loss"]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        from diffusers.optimization import get_scheduler

        params = [group for group in self.param_groups() if group["params"]]
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters")
        kwargs = dict(lr=self.hparams.learning_rate, betas=tuple(self.hparams.adam_betas), eps=self.hparams.adam_epsilon,
                      weight_decay=self.hparams.weight_decay)
        if self.hparams.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise RuntimeError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA only); "
                                   "or use optimizer: adamw") from None
            optimizer = bnb.optim.AdamW8bit(params, **kwargs)
        elif self.hparams.optimizer == "adamw":
            # fused: one kernel for all parameters. Under fp16 mixed precision a fused AdamW unscales the
            # gradients inside its step, after gradient clipping would have to run, so clipping runs there
            # with the multi-tensor (foreach) AdamW instead.
            clipping = bool(self.trainer.gradient_clip_val) if self._trainer is not None else False
            fp16 = self._trainer is not None and str(self.trainer.precision) in ("16-mixed", "16")
            optimizer = torch.optim.AdamW(params, fused=not (clipping and fp16), **kwargs)
        else:
            raise ValueError(f"optimizer: unknown value {self.hparams.optimizer!r}; expected adamw or adamw8bit")
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        scheduler = get_scheduler(
            self.hparams.lr_scheduler, optimizer, num_warmup_steps=self.hparams.lr_warmup_steps, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, also for a fused AdamW under bf16 mixed precision.

        Lightning's mixed-precision plugin refuses to clip for any optimizer that could unscale gradients
        itself (fused AdamW), although under bf16 nothing is scaled; there the gradients are clipped here.
        """
        inner = getattr(optimizer, "optimizer", optimizer)
        fused_bf16 = getattr(inner, "_step_supports_amp_scaling", False) and str(self.trainer.precision).startswith("bf16")
        if gradient_clip_val and fused_bf16 and self._sharded_shapes is None:  # FSDP: its precision clips over the shards
            params = [p for group in inner.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _as(cls, value):
    """A config value as the dataclass ``cls`` (jsonargparse gives the dataclass, Python callers may give a dict)."""
    return value if value is None or isinstance(value, cls) else cls(**dict(value))
