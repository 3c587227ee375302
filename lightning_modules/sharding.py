"""Sharding the fully trained denoiser with FSDP: ``--trainer.strategy fsdp_denoiser`` (``fsdp`` is an alias in train.py).

What :class:`DenoiserFSDP` (Lightning's ``FSDPStrategy``, PyTorch's FSDP1 ``FullyShardedDataParallel``) does:

* **what is sharded**: the denoiser only. Each of its blocks (a U-Net's ``down_blocks``/``mid_block``/``up_blocks``, a
  DiT's ``transformer_blocks``) is an FSDP unit, and the denoiser itself is one (its embeddings, input and output
  layers); the frozen parts (VAE, text encoders) are ``ignored_modules``: every rank keeps its own full copy, in the run's
  frozen dtype, outside every FSDP unit. ``use_orig_params=True`` (the module's parameter names stay the same).
* **SHARD_GRAD_OP** (ZeRO-2) by default: gradients and AdamW states are sharded, the parameters are gathered at a unit's
  forward and kept until its backward (no second gather); ``sharding_strategy: FULL_SHARD`` (ZeRO-3) also frees them
  after the forward. Other FSDP modes are refused (``NO_SHARD`` is DDP: use ``ddp``).
* **precision**: the trained weights are fp32 masters. ``32-true``: no FSDP mixed precision at all. ``bf16-mixed`` and
  ``16-mixed``: the gathered parameters are 16-bit for compute, gradients are reduced in fp32 (Lightning's own FSDP
  precision reduces in 16 bits; we keep DDP's fp32 gradient sums on purpose) and the forward runs under autocast, on the
  device's type, as DDP's mixed precision does; no input is cast by FSDP (flow-matching timesteps stay fp32).
  ``16-true``/``bf16-true`` are refused (no fp32 master).
* **checkpoints**: the full state dict of the trained tensors, gathered on rank 0 (``state_dict_type: full``), and the
  optimizer's state gathered the same way; a resume on the same number of processes continues bit for bit. The file is
  the one ``DiffusionModule.on_save_checkpoint`` writes under DDP (only the trained tensors, the same names), so
  ``export.py`` and ``generate.py`` read it without FSDP; its optimizer state is FSDP's, so a checkpoint resumes only
  under the sharding it was written with (``sharding`` in the checkpoint, checked by train.py's ``check_resume``).

Refused, each in one line (:class:`ShardingRefused`): a strategy that does not train the whole denoiser and nothing else
(LoRA, textual inversion, projection, U-Net + text encoder: their trainable part is small, use ``ddp``); EMA (its shadow
would hold the shards); prior preservation (its class images are sampled at fit start); callbacks that sample during training (``SampleGrid``, ``FIDCallback``, ``MemorizationMonitor``:
the shards are gathered only inside the training step; sample the checkpoint afterwards); ``sharded`` checkpoints, CPU
offload, a custom ``auto_wrap_policy``.

Lightning 2.6's ``FSDPStrategy`` refuses CPU accelerators by name (``accelerator_connector.py`` checks its registered
names and the exact class), and passes ``device_id=None`` on CPU, which PyTorch's FSDP refuses ("FSDP needs a non-CPU
accelerator device"); with ``device_id=torch.device("cpu")`` FSDP1 runs on CPU over gloo. :class:`DenoiserFSDP` passes
the root device, so the same code is tested on CPU (two gloo processes, ``tests/test_fsdp.py``) and runs on GPUs.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from torch import nn

from core.errors import UserError

NAME = "fsdp_denoiser"
#: the FSDP modes this strategy runs (ZeRO-2, ZeRO-3)
SHARDINGS = ("SHARD_GRAD_OP", "FULL_SHARD")
#: a denoiser's block lists (diffusers' names: U-Net, DiT families, Flux-like single blocks) and single blocks
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
SINGLE_BLOCKS = ("mid_block",)
#: callbacks that run the denoiser outside the training step (on rank 0 only, or a different number of times per rank)
SAMPLING_CALLBACKS = ("SampleGrid", "FIDCallback", "MemorizationMonitor")


class ShardingRefused(UserError, ValueError):
    """A run that FSDP sharding of the denoiser does not (yet) support."""


def clean_name(name: str) -> str:
    """A parameter's name without FSDP's (and activation checkpointing's) wrapper prefixes: the state dict's name."""
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    return clean_tensor_name(name)


def denoiser_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The denoiser's blocks, each one FSDP unit: the entries of its block lists and its single blocks."""
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        blocks += list(getattr(denoiser, name, None) or [])
    blocks += [b for b in (getattr(denoiser, name, None) for name in SINGLE_BLOCKS) if isinstance(b, nn.Module)]
    return blocks


def frozen_parts(root: nn.Module, denoiser: nn.Module) -> list[nn.Module]:
    """The largest modules of ``root`` outside the denoiser that hold parameters or buffers (VAE, text encoders)."""
    inside = {id(m) for m in denoiser.modules()}
    above = {id(m) for m in root.modules() if any(id(d) == id(denoiser) for d in m.modules())}
    out: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in inside:
                continue
            if id(child) in above:
                walk(child)
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out.append(child)

    walk(root)
    return out


def sharding_refusal(module) -> Optional[str]:
    """Why ``module`` cannot train under :class:`DenoiserFSDP` (None when it can): it must be a DiffusionModule training
    the whole denoiser and nothing else, without EMA, on a denoiser with blocks."""
    name = type(module).__name__
    sd = getattr(module, "sd", None)
    if sd is None or not hasattr(module, "trained_state_keys"):
        return f"{name} is not a DiffusionModule (lightning_modules/base.py); FSDP sharding here is for the denoiser"
    denoiser = sd.denoiser
    inside = {id(p) for p in denoiser.parameters()}
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    elsewhere = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in inside]
    frozen_inside = sum(1 for p in denoiser.parameters() if not p.requires_grad)
    if elsewhere or frozen_inside or not trained:
        what = (f"trains {len(elsewhere)} tensors outside the denoiser (e.g. {elsewhere[0]})" if elsewhere else
                f"keeps {frozen_inside} of the denoiser's tensors frozen" if frozen_inside else "trains nothing")
        return (f"{name} {what}: FSDP ({NAME}) shards a fully trained denoiser only (UNetFineTuning); this strategy's "
                "trainable part is small, train it with --trainer.strategy ddp")
    if getattr(module, "ema", None) is not None:
        return (f"ema under FSDP ({NAME}) is not implemented (the average would hold each rank's shards); remove "
                "it (--model.init_args.ema null), or train with --trainer.strategy ddp")
    if getattr(module, "prior_preservation", None) is not None:
        return (f"prior_preservation under FSDP ({NAME}) is not implemented (its class images are sampled from the "
                "denoiser at the start of fit, outside the training step); remove it "
                "(--model.init_args.prior_preservation null), or train with --trainer.strategy ddp")
    if not denoiser_blocks(denoiser):
        return (f"the denoiser {type(denoiser).__name__} has none of the block lists FSDP wraps ({', '.join(BLOCK_LISTS + SINGLE_BLOCKS)}); "
                "train it with --trainer.strategy ddp")
    return None


def callbacks_refusal(callbacks: Iterable) -> Optional[str]:
    """Why these callbacks cannot run under :class:`DenoiserFSDP` (None when they can)."""
    found = sorted({type(c).__name__ for c in callbacks if type(c).__name__ in SAMPLING_CALLBACKS})
    if not found:
        return None
    return (f"{', '.join(found)} sample(s) during training, which under FSDP ({NAME}) is not implemented (the denoiser's "
            "shards are gathered only inside the training step); drop the config's callbacks with --trainer.callbacks=[] "
            "(or list the others) and sample the checkpoint afterwards (generate.py, export.py)")


def precision_refusal(precision: str) -> Optional[str]:
    if str(precision) in ("16-true", "bf16-true"):
        return (f"--trainer.precision {precision}: under FSDP ({NAME}) the trained weights stay fp32 masters; use "
                f"{str(precision).replace('-true', '-mixed')} (16-bit compute, fp32 weights)")
    return None


def check_run(module, trainer) -> None:
    """Refuse, in one line, a run :class:`DenoiserFSDP` does not support (strategy, EMA, callbacks, precision)."""
    why = (getattr(getattr(trainer, "strategy", None), "refusal", None) or sharding_refusal(module)
           or callbacks_refusal(trainer.callbacks if trainer is not None else [])
           or (precision_refusal(trainer.precision) if trainer is not None else None))
    if why:
        raise ShardingRefused(why)


def sharding_of(strategy) -> Optional[str]:
    """What a checkpoint records of the sharding it was written under: ``fsdp:SHARD_GRAD_OP``, or None (not sharded)."""
    if isinstance(strategy, FSDPStrategy):
        return f"fsdp:{strategy.sharding_strategy.name}"
    return None


def sharding_mismatch(saved: Optional[str], current: Optional[str]) -> Optional[str]:
    """Why a checkpoint written under ``saved`` sharding cannot resume under ``current`` (None when they agree)."""
    if saved == current:
        return None
    say = lambda s: f"--trainer.strategy {NAME} ({s.split(':', 1)[1]})" if s else "an unsharded strategy (ddp, auto)"  # noqa: E731
    return (f"the checkpoint was written under {say(saved)} and this start uses {say(current)}: the optimizer state is "
            f"kept per sharding, so resume with {say(saved)}, or start a new run")


class DenoiserFSDPPrecision(FSDPPrecision):
    """FSDP precision for fp32 master weights: 16-bit gathered parameters, fp32 gradient reduction and buffers, no input
    casts, autocast on the root device's type (Lightning's ``FSDPPrecision`` autocasts on CUDA only, reduces in 16 bits
    and casts the root's inputs)."""

    device_type = "cuda"
    root: Optional[nn.Module] = None  # the root FSDP module, for norm clipping over every rank's shards

    @property
    def half_dtype(self) -> Optional[torch.dtype]:
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)

    @property
    def mixed_precision_config(self):
        from torch.distributed.fsdp import MixedPrecision

        if self.half_dtype is None:
            return None
        return MixedPrecision(param_dtype=self.half_dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32,
                              cast_forward_inputs=False, cast_root_forward_inputs=False)

    def forward_context(self):
        if self.half_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.half_dtype)

    def clip_grad_by_norm(self, optimizer, clip_val) -> None:
        """The norm over every rank's gradient shards (FSDP's own ``clip_grad_norm_``; a rank's own norm is wrong)."""
        if self.root is None:
            raise ShardingRefused("gradient clipping by norm under FSDP before the model is wrapped")
        self.root.clip_grad_norm_(clip_val)


class DenoiserFSDP(FSDPStrategy):
    """Lightning's FSDP strategy for a fully trained denoiser (this module's docstring): its blocks are the FSDP units,
    the frozen parts are ignored, SHARD_GRAD_OP, fp32 masters, full checkpoints; on CPU (gloo) and GPU (NCCL)."""

    strategy_name = NAME

    def __init__(self, sharding_strategy: str = "SHARD_GRAD_OP", state_dict_type: str = "full", **kwargs: Any) -> None:
        # what is not supported is refused by check_run (train.py calls it before anything is written): raised here,
        # jsonargparse would bury the message under its own "Does not validate against any of the Union subtypes"
        name = str(getattr(sharding_strategy, "name", sharding_strategy))
        self.refusal: Optional[str] = None
        if name not in SHARDINGS:
            self.refusal = (f"{NAME}: sharding_strategy {name!r} is not supported; expected one of {', '.join(SHARDINGS)} "
                            "(NO_SHARD is DDP: use --trainer.strategy ddp)")
            name = "SHARD_GRAD_OP"
        elif state_dict_type != "full":
            self.refusal = (f"{NAME}: state_dict_type {state_dict_type!r} is not implemented; checkpoints hold the full "
                            "trained tensors (state_dict_type: full), as under DDP")
        for key in ("cpu_offload", "auto_wrap_policy", "mixed_precision", "ignored_modules", "device_mesh"):
            if kwargs.get(key) and self.refusal is None:
                self.refusal = (f"{NAME}: {key} is set by the strategy or not implemented (cpu_offload, device_mesh); "
                                "remove it")
            kwargs.pop(key, None)
        kwargs.setdefault("use_orig_params", True)
        super().__init__(sharding_strategy=name, state_dict_type="full", **kwargs)

    # ------------------------------------------------------------------ precision
    @property
    def precision_plugin(self) -> DenoiserFSDPPrecision:
        plugin = self._precision_plugin
        return plugin if plugin is not None else DenoiserFSDPPrecision("32-true")

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and not isinstance(plugin, DenoiserFSDPPrecision):
            if not isinstance(plugin, FSDPPrecision):
                raise TypeError(f"{NAME} works with an FSDPPrecision plugin, found {type(plugin).__name__}")
            plugin = DenoiserFSDPPrecision(plugin.precision)
        self._precision_plugin = plugin

    # ------------------------------------------------------------------ wrapping
    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        module = self.lightning_module
        check_run(module, module._trainer)
        denoiser = module.sd.denoiser
        # the trained tensors' names and full shapes, before FSDP flattens them into shards (base.py reads them)
        module._sharded_shapes = {clean_name(n): tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
        units = {id(m) for m in denoiser_blocks(denoiser)} | {id(denoiser)}
        frozen = frozen_parts(model, denoiser)
        for part in frozen:  # FSDP leaves ignored modules where they are
            part.to(self.root_device)
        plugin = self.precision_plugin
        plugin.device_type = self.root_device.type
        wrapped = FullyShardedDataParallel(
            module=model, mixed_precision=self.mixed_precision_config, sharding_strategy=self.sharding_strategy,
            auto_wrap_policy=partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in units), ignored_modules=frozen,
            # FSDP1 runs on CPU given the device itself (Lightning passes the CUDA index, None on CPU: refused by FSDP)
            device_id=self.root_device if self.root_device.type == "cpu" else self.root_device.index, **self.kwargs)
        plugin.root = wrapped
        return wrapped

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's full state, gathered on rank 0, keyed by parameter name (FSDP's own form; Lightning re-keys
        it by position in ``model.parameters()``, frozen parameters counted). On CPU it is gathered without
        ``offload_to_cpu``: PyTorch's FSDP gathers every state (``exp_avg``, ``exp_avg_sq``) into one reused buffer and
        copies each out with ``.cpu()``, which on a CPU tensor is no copy, so every moment read as the last one gathered
        (torch 2.14, ``_optim_utils._unflatten_orig_param_states``; measured: resumed runs diverged at their first step)."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        offload = self.root_device.type != "cpu"
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True)):
            return FSDP.optim_state_dict(self.model, inner)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict:
        """Check the checkpoint against this configuration first (FSDP loads the tensors before ``on_load_checkpoint``),
        then load it as Lightning's FSDP does (full state dict, optimizer state resharded)."""
        from lightning_modules.resume import read_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        self.lightning_module.check_resumable(read_checkpoint(path))
        return super().load_checkpoint(path, weights_only=weights_only)


def register() -> None:
    """Register ``fsdp_denoiser`` with Lightning (not in ``FSDPStrategy``'s own names, which Lightning refuses on CPU)."""
    if NAME not in StrategyRegistry:
        StrategyRegistry.register(NAME, DenoiserFSDP, description="FSDP of the fully trained denoiser (SHARD_GRAD_OP), "
                                  "frozen parts outside the shards; cxr-diffusion")


register()
