"""Fit-time preparation, in one place: class images for prior preservation, the VAE latent cache, the document-embedding
cache of the textual projection.

At the start of fit a strategy says what it needs (:class:`Needs`), its datamodule says what it trains on (the
:class:`~datamodules.contract.TrainingData` protocol), and :class:`FitPreparation` makes each piece once, as a
:mod:`core.cache` entry (one root, one key rule, complete only after an atomic rename), then hands the datamodule what it
serves (:class:`~datamodules.contract.Prepared`).

Under DDP every piece is made by every rank, each its share (:func:`build_once`): class images, latents (each rank a
contiguous block of the images) and document embeddings (each rank a contiguous block of the captions), each rank
writing its own files (row blocks, :class:`core.cache.RowBlocks`), so no file page is written from two machines. One
rank (the leader) takes the entry's cross-process lock, so another run building the same entry at the same time waits
for it and then reuses it. The ranks wait for each other on a gloo group with an effectively infinite timeout
(Lightning's ``_InfiniteBarrier``, what it uses for ``prepare_data``), not the strategy's barrier: encoding 230k images
takes far longer than the 30 minutes after which an NCCL collective gives up. On several nodes, ranks that see the same
cache folder (a shared file system) share one build; a node whose cache folder is its own disk builds its own copy with
its own ranks (found by each rank looking for the others' probe files in the folder).

* **Class images** come from the frozen base model, before any training. While resuming the model is no longer the
  base model, so missing class images are then an error, not something to fill in.
* **Latents**: each training (and class) image's posterior mean and log-variance (:mod:`datamodules.latent_cache`).
* **Document embeddings**: both encoders' vectors of every caption, memory-mapped (:class:`DocumentEmbeddings`).
* **Text conditions** (``text_cache: disk``, :class:`TextConditions`): every training prompt's condition encoded once
  into ``text_conditions/<key>`` (one file per prompt, :class:`models.families.PromptCache`), then the frozen text
  encoders moved to the CPU; a prompt met later that is not there is encoded on the CPU (and written to the entry of
  CPU encodings).
"""
from __future__ import annotations

import dataclasses
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from core.cache import CacheEntry, RowBlocks, atomic_write, block_bounds, cache_root, create_row_block
from datamodules.contract import CaptionSet, ClassImages, ImageSet, Prepared, TrainingData
from datamodules.latent_cache import LatentCache, LatentCachePlan, encode_rows, finish_latent_cache


@dataclass
class PriorPreservation:
    """DreamBooth-style prior preservation: class images from the frozen base model, served beside each batch, and
    their loss added with weight ``loss_weight``.

    Args:
        class_prompt: the prompt the base model generates class images from (our choice for the paper's runs; the paper
            does not give it).
        num_class_images: how many class images to generate once, before training.
        class_images_dir: where they are kept; default ``<cache>/class_images/<key>`` (the key covers the base model,
            the prompt, the sampler settings and the resolution).
        steps, guidance_scale, scheduler: sampling settings for generating them (scheduler None: the family's, PNDM
            for Stable Diffusion as SD v1.4's folder, Euler for flow-matching bases).
        loss_weight: weight of the prior term in the loss.
    """

    class_prompt: str = "a photo of a chest xray"
    num_class_images: int = 100
    class_images_dir: Optional[str] = None
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: Optional[str] = None
    loss_weight: float = 1.0


@dataclass(frozen=True)
class DocumentEncoder:
    """How a strategy encodes captions for the document-embedding cache: ``encode(texts) -> (inputs [B, in], targets
    [B, out])``, and what the vectors depend on besides the captions (``key``)."""

    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
    in_features: int
    out_features: int
    key: dict
    root: Path
    batch_size: int = 256


@dataclass(frozen=True)
class TextConditions:
    """The text-condition cache on disk (``text_cache: disk``): ``conditioning`` (a family's, whose ``cache`` has a disk
    layer) encodes every training prompt once at fit start, then the frozen ``encoders`` (the base's attribute names)
    move to ``offload_device``, off the GPU: the prompts are read from the cache from then on."""

    conditioning: Any
    encoders: tuple[str, ...]
    offload_device: str = "cpu"


@dataclass
class Needs:
    """What a strategy wants prepared before training."""

    prompts: Sequence[str] = ()  # to warn about prompts longer than the text encoder's window
    latents: bool = False
    prior: Optional[PriorPreservation] = None
    documents: Optional[DocumentEncoder] = None
    text: Optional[TextConditions] = None


class DocumentEmbeddings:
    """Both encoders' vectors of one caption set: ``domain [N, in]`` and ``clip [N, out]``, memory-mapped row blocks
    (``domain.<first row>.npy``, one per rank that encoded them; a single ``domain.npy`` reads too)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.domain = RowBlocks(self.folder, "domain")
        self.clip = RowBlocks(self.folder, "clip")

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = index.cpu().numpy()
        return torch.from_numpy(self.domain[rows]), torch.from_numpy(self.clip[rows])


class Ranks:
    """The processes of one fit as preparation sees them: rank, world size, nodes, and collectives over a gloo group with
    an effectively infinite timeout (Lightning's ``_InfiniteBarrier``, created on entering, a last barrier and destroyed
    on leaving). ``with Ranks(trainer) as ranks:``; one process needs no group."""

    def __init__(self, trainer):
        self.rank, self.world = int(trainer.global_rank), int(trainer.world_size)
        self.nodes = max(1, int(trainer.num_nodes))
        self._sync = None

    def __enter__(self) -> "Ranks":
        if self.world > 1:
            import torch.distributed as dist
            from lightning.fabric.utilities.distributed import _InfiniteBarrier

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"fit-time preparation on {self.world} processes needs torch.distributed initialised")
            self._sync = _InfiniteBarrier().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._sync is not None:
            self._sync.__exit__(*exc)
            self._sync = None

    def gather(self, value: Any) -> list:
        """Every rank's ``value``, in rank order (a collective: every rank must call it)."""
        if self._sync is None:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value, group=self._sync.group)
        return out

    def agree(self, what: str, fn: Callable[[], Any]) -> list:
        """Run ``fn`` here and return every rank's result. When any rank raises, every rank raises (that rank its own
        error, the others one naming it), so no rank is left waiting for one that failed."""
        try:
            value, error = fn(), None
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others have heard of it
            value, error = None, err
        results = self.gather((value, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        failed = [(r, message) for r, (_, message) in enumerate(results) if message]
        if failed:
            raise RuntimeError(f"{what}: rank {failed[0][0]} failed ({failed[0][1]})")
        return [v for v, _ in results]

    def sharing(self, folder: Path) -> list[int]:
        """The ranks that see the same ``folder`` as this one: all on one node; on several nodes, found with probe files
        (each rank writes one, then looks for the others'), so nodes with their own cache disk each get their own."""
        if self._sync is None:
            return [self.rank]
        if self.nodes == 1:
            return list(range(self.world))
        token = self.gather(uuid.uuid4().hex)[0]
        probe = lambda r: Path(folder) / f".probe-{token}-{r}"  # noqa: E731

        def touch():
            Path(folder).mkdir(parents=True, exist_ok=True)
            probe(self.rank).touch()

        self.agree("probing the cache folder", touch)
        seen = self.agree("probing the cache folder", lambda: [r for r in range(self.world) if probe(r).exists()])
        probe(self.rank).unlink(missing_ok=True)  # every rank has looked: the gather above waited for all
        mine = seen[self.rank]
        if any(seen[r] != mine for r in mine):
            raise RuntimeError(f"{folder}: the ranks disagree about which of them share this cache folder ({seen})")
        return mine


def build_once(ranks: Ranks, entry: CacheEntry, what: str, fill: Callable[[Path, Any, int, int], None],
               finish: Callable[[Path], dict] = lambda partial: {}, survey: Callable[[Path], Any] = lambda partial: None,
               keep_partial: bool = False) -> bool:
    """Make ``entry`` once, shared by the ranks that see its folder; returns False when it was complete already.

    The leader (the lowest of those ranks) takes the entry's lock (waiting while another run builds it), and when the
    entry is still not complete :meth:`~core.cache.CacheEntry.begin`\\ s it and ``survey(partial)`` says what is left
    to do; then every rank calls ``fill(partial, survey's answer, its index, how many ranks share)``, and the leader
    writes what ``finish(partial)`` returns into ``ENTRY.json`` and commits. A rank that fails makes every rank fail.
    """
    if all(ranks.agree(f"checking {what}", entry.is_complete)):
        return False
    members = ranks.sharing(entry.path.parent)
    leader = ranks.rank == members[0]

    def give_up() -> None:
        if not (leader and entry.lock().held):
            return
        if keep_partial:
            entry.lock().release()  # the next build continues the partial folder
        else:
            entry.abort()

    def start():
        if not leader:
            return None
        with entry.lock():  # the build keeps holding it (begin takes it too) until commit or abort
            if entry.is_complete():
                return "complete", None
            partial = entry.begin(keep_partial)
            return "build", survey(partial)

    try:
        state, todo = ranks.agree(f"starting {what}", start)[members[0]]
        if state == "complete":  # another run built it while our leader waited for the lock
            return False
        ranks.agree(f"building {what}", lambda: fill(entry.partial, todo, members.index(ranks.rank), len(members)))
        ranks.agree(f"completing {what}", lambda: entry.commit(**finish(entry.partial)) if leader else None)
    except BaseException:
        give_up()
        raise
    return True


def class_image_entry(prior: PriorPreservation, model_key: str, resolution: int, root: Path) -> CacheEntry:
    """Where the class images of ``prior`` made by the model ``model_key`` at ``resolution`` live."""
    parts = {"model": model_key, "prompt": prior.class_prompt, "count": prior.num_class_images, "steps": prior.steps,
             "guidance_scale": prior.guidance_scale, "scheduler": prior.scheduler, "resolution": resolution}
    return CacheEntry("class_images", parts, root=Path(root), directory=Path(prior.class_images_dir) if prior.class_images_dir else None)


class FitPreparation:
    """Runs at the start of fit (``DiffusionModule.on_fit_start``) on every rank.

    ``num_workers``: processes decoding images while the latent cache is built (None: :func:`decode_workers`)."""

    def __init__(self, module, num_workers: Optional[int] = None):
        self.module = module
        self.num_workers = num_workers

    @property
    def trainer(self):
        return self.module.trainer

    def run(self, needs: Needs, data: TrainingData) -> Prepared:
        warn_long_prompts(self.module.sd, list(needs.prompts) + ([needs.prior.class_prompt] if needs.prior else []))
        images = data.training_images() if (needs.latents or needs.prior) else None
        class_images = self.class_images(needs.prior, images) if needs.prior else None
        latents = self.latents(images, class_images) if needs.latents and images is not None else None
        documents = self.documents(needs.documents, data.training_captions()) if needs.documents else None
        if needs.text is not None:  # after the class images, which need the text encoders where the denoiser is
            prompts = list(needs.prompts) + ([needs.prior.class_prompt] if needs.prior else []) + [""]  # "": guidance's
            self.module.text_offload = self.text_conditions(needs.text, prompts)
        prepared = Prepared(latents=latents, class_images=class_images, documents=documents)
        data.use_prepared(prepared)
        return prepared

    # ------------------------------------------------------------------ class images
    def class_images(self, prior: PriorPreservation, images: Optional[ImageSet]) -> ClassImages:
        if prior.scheduler is None:  # the family's sampler, named in the cache key
            prior = dataclasses.replace(prior, scheduler=self.module.sd.default_class_sampler)
        resolution = images.resolution if images is not None else self.module.generator().native_size
        root = images.cache_root if images is not None else cache_root()
        entry = class_image_entry(prior, self.module.spec.cache_key(), resolution, root)
        made = ClassImages(entry.path, prior.class_prompt, prior.num_class_images, resolution)
        resuming = bool(self.trainer.ckpt_path)
        with Ranks(self.trainer) as ranks:
            # raises on every rank when a chosen folder holds images of other settings
            complete = all(ranks.agree("checking the class images", entry.is_complete))
            missing = made.missing() if complete else list(range(made.count))
            if missing and (complete or resuming):
                why = ("while resuming; they must come from the base model, which the resumed weights no longer are. Restore "
                       "the folder or start a new run." if resuming else "(the folder was changed after it was made); delete "
                       "it to make them again.")
                raise FileNotFoundError(f"{entry.path}: {len(missing)} of {made.count} class images are missing {why}")
            if not complete:
                self._generate_class_images(ranks, entry, prior, made)
        return made

    def _generate_class_images(self, ranks: Ranks, entry: CacheEntry, prior: PriorPreservation, made: ClassImages) -> None:
        """Every rank generates a block of the missing images; an interrupted generation continues where it stopped."""
        from PIL import Image
        from tqdm.auto import tqdm

        def fill(folder: Path, missing: list[int], index: int, count: int) -> None:
            partial = ClassImages(folder, made.prompt, made.count, made.resolution)
            start, stop = block_bounds(len(missing), count, index)
            mine = missing[start:stop]
            rank_zero_info(f"generating {len(missing)} class images for prior preservation into {entry.path}")
            for first in tqdm(range(0, len(mine), 4), desc="class images", disable=ranks.rank != 0):
                indices = mine[first : first + 4]
                images = self.module.generate([prior.class_prompt] * len(indices), seeds=[10_000 + i for i in indices],
                                              steps=prior.steps, guidance=prior.guidance_scale, scheduler=prior.scheduler,
                                              height=made.resolution, width=made.resolution)
                for i, img in zip(indices, images):
                    png = io.BytesIO()
                    Image.fromarray((img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(png, format="PNG")
                    atomic_write(partial.path(i), png.getvalue())

        build_once(ranks, entry, "the class images", fill, keep_partial=True,
                   survey=lambda folder: ClassImages(folder, made.prompt, made.count, made.resolution).missing())

    # ------------------------------------------------------------------ latents
    def latents(self, images: ImageSet, class_images: Optional[ClassImages]) -> LatentCache:
        vae_dtype = next(self.module.sd.vae.parameters()).dtype  # what the VAE encodes in now (fp32 with keep_vae_fp32)
        plan = latent_cache_plan(images, self.module.spec.cache_key(), images.cache_root, class_images, vae_dtype=vae_dtype)
        if not plan.ids:
            raise ValueError("the latent cache plan has no images")
        workers = self.num_workers if self.num_workers is not None else decode_workers(len(plan.ids), self.trainer)

        def fill(folder: Path, _, index: int, count: int) -> None:
            start, stop = block_bounds(len(plan.ids), count, index)
            rank_zero_info(f"caching VAE latents of {len(plan.ids)} images into {plan.directory} "
                           f"({count} process{'es' if count > 1 else ''}, about {stop - start} images each)")
            encode_rows(plan, folder, start, stop, self.module.encode_posterior, self.module.hparams.latent_cache_batch_size,
                        workers, progress=self.trainer.global_rank == 0)

        with Ranks(self.trainer) as ranks:
            build_once(ranks, plan.entry, "the latent cache", fill, finish=lambda folder: finish_latent_cache(plan, folder))
        return LatentCache(plan.directory)

    # ------------------------------------------------------------------ document embeddings
    def documents(self, encoder: DocumentEncoder, captions: Optional[CaptionSet]) -> DocumentEmbeddings:
        if captions is None:
            raise TypeError("the document-embedding cache needs caption data (datamodules.laion.LAIONCaptionDataModule); "
                            "set cache_embeddings: false to encode on the fly")
        # version 3: row blocks, one file per rank (version 2 interleaved the ranks' rows in one file; rebuilt)
        parts = {**encoder.key, "captions": captions.key, "n": captions.count, "in_features": encoder.in_features,
                 "out_features": encoder.out_features, "version": 3}
        entry = CacheEntry("projection", parts, root=encoder.root)

        def fill(folder: Path, _, index: int, count: int) -> None:
            start, stop = block_bounds(captions.count, count, index)
            size = captions.count * (encoder.in_features + encoder.out_features) * 4 / 2**20
            rank_zero_info(f"document embeddings: encoding {captions.count} captions once into {entry.path} ({size:.1f} MiB)")
            fill_document_embeddings(folder, encoder, captions, np.arange(start, stop), progress=self.trainer.global_rank == 0)

        with Ranks(self.trainer) as ranks:
            built = build_once(ranks, entry, "the document embeddings", fill)
        if not built:
            rank_zero_info(f"document embeddings: reusing {entry.path} ({captions.count} captions)")
        return DocumentEmbeddings(entry.path)


    # ------------------------------------------------------------------ text conditions
    def text_conditions(self, text: TextConditions, prompts: Sequence[str]) -> dict:
        """Encode every distinct prompt once into the disk cache (each rank a contiguous block of them, among the ranks
        that share the cache folder; the others' are read from disk when met), then move the text encoders off the GPU.
        Returns what was done (also said in one info line)."""
        import time

        sd, cache = self.module.sd, text.conditioning.cache
        encoders = {name: getattr(sd, name) for name in text.encoders}
        trained = [name for name, module in encoders.items() if any(p.requires_grad for p in module.parameters())]
        if trained or cache.disk is None:
            raise RuntimeError(f"the text-condition cache on disk needs frozen text encoders and a disk layer ({trained} train)")
        distinct = sorted(set(prompts))
        like = next(encoders[text.encoders[-1]].parameters())
        before, start_time = dict(cache.counts), time.perf_counter()
        with Ranks(self.trainer) as ranks:
            folder = cache.disk.entry(like.dtype, like.device.type).path
            members = ranks.sharing(folder.parent)
            first, stop = block_bounds(len(distinct), len(members), members.index(ranks.rank))
            ranks.agree("filling the text-condition cache", lambda: [text.conditioning([p]) for p in distinct[first:stop]])
        seconds = time.perf_counter() - start_time
        record = {"prompts": len(distinct), "mine": stop - first, "encoded": cache.counts["encoded"] - before["encoded"],
                  "read": cache.counts["read"] - before["read"], "seconds": seconds, "folder": str(folder),
                  **offload_text_encoders(self.trainer, encoders, text.offload_device)}
        rank_zero_info(
            f"text conditions: {len(distinct)} distinct prompts in {folder} ({record['encoded']} encoded, {record['read']} read "
            f"by this rank, {seconds:.1f} s); {', '.join(encoders)} {record['how']}")
        return record


def offload_text_encoders(trainer, encoders: dict, device: str) -> dict:
    """Move frozen text encoders to ``device`` (a real ``Module.to``; a no-op where they are there already) and say what
    it freed. Under DDP their buffers are taken out of DDP's buffer broadcast (frozen: nothing to keep in step; a CPU
    tensor cannot go through NCCL). Under other strategies (FSDP, DeepSpeed: sharded or wrapped parameters) they stay."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    origin = str(next(next(iter(encoders.values())).parameters()).device)
    size = sum(p.numel() * p.element_size() for m in encoders.values() for p in m.parameters())
    record = {"from": origin, "to": origin, "parameter_bytes": size, "moved": False}
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or "DeepSpeed" in type(strategy).__name__:
        return {**record, "how": f"stay on {origin}: moving them off is implemented for single-device and DDP runs, not "
                                 f"{type(strategy).__name__}"}
    for module in encoders.values():
        module.to(device)
    wrapped = getattr(strategy, "model", None)
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        mine = {id(b) for m in encoders.values() for b in m.buffers()}
        wrapped.parameters_to_ignore.update(n for n, b in wrapped.module.named_buffers() if id(b) in mine)
    if origin.startswith("cuda"):
        torch.cuda.empty_cache()
    freed = f", freeing {size / 2**30:.2f} GiB of {origin}" if origin != str(torch.device(device)) else " (already there)"
    return {**record, "to": device, "moved": True, "how": f"moved to {device}{freed}"}


def decode_workers(n_images: int, trainer) -> int:
    """DataLoader workers decoding images for the latent cache, per rank: none for fewer than 1024 images (starting
    workers costs more than decoding them), else the CPUs of this process per rank of its node, less one, at most 8."""
    if n_images < 1024:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_node = max(1, int(trainer.world_size) // max(1, int(trainer.num_nodes)))
    return max(0, min(8, cpus // per_node - 1))


def warn_long_prompts(sd, prompts: Sequence[str]) -> None:
    """One warning counting the prompts longer than the text encoder's window (they would be truncated)."""
    too_long = {p for p in set(prompts) if sd.count_too_long([p])}
    if too_long:
        n = sum(p in too_long for p in prompts)
        example = next(iter(too_long))
        rank_zero_warn(
            f"{n} of {len(prompts)} training prompts ({len(too_long)} distinct) are longer than the text encoder's "
            f"{sd.text_window} tokens and will be truncated, e.g. {example[:120]!r}"
        )


def latent_cache_plan(images: ImageSet, model_key: str, root: Path, class_images: Optional[ClassImages] = None,
                      vae_dtype: torch.dtype = torch.float32) -> LatentCachePlan:
    """The latent cache of ``images`` (and class images) encoded by the VAE of ``model_key`` in ``vae_dtype`` (a
    16-bit VAE's posteriors differ from an fp32 one's by its rounding, so each dtype has its own entry)."""
    import hashlib

    if not isinstance(vae_dtype, torch.dtype):
        raise TypeError(f"vae_dtype must be a torch.dtype, got {vae_dtype!r}")
    ids, loaders = list(images.ids), {}
    key_parts = {"model": model_key, "vae_dtype": str(vae_dtype).removeprefix("torch."), **images.key_parts}
    if class_images is not None:
        from datamodules.mimic_cxr import _pixels, load_grayscale

        digest = hashlib.sha1()
        for i in range(class_images.count):
            cid = ClassImages.image_id(i)
            ids.append(cid)
            loaders[cid] = lambda i=i: _pixels(load_grayscale(class_images.path(i), class_images.resolution))
            digest.update(class_images.path(i).read_bytes())
        key_parts["class_images"] = digest.hexdigest()
    return LatentCachePlan(Path(root), ids, lambda image_id: loaders[image_id]() if image_id in loaders else images.load(image_id),
                           key_parts)


def fill_document_embeddings(folder: Path, encoder: DocumentEncoder, captions: CaptionSet, rows: np.ndarray,
                             progress: bool = True) -> None:
    """Encode the captions of ``rows`` (contiguous, ascending) with both encoders into their own row blocks
    ``domain.<first row>.npy`` and ``clip.<first row>.npy`` in ``folder`` (what one rank writes of a shared build)."""
    from tqdm.auto import tqdm

    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    if not np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        raise ValueError(f"fill_document_embeddings: rows must be contiguous and ascending, got {rows[:8].tolist()}...")
    first = int(rows[0])
    domain = create_row_block(folder, "domain", first, (len(rows), encoder.in_features))
    clip = create_row_block(folder, "clip", first, (len(rows), encoder.out_features))
    batch = int(encoder.batch_size)
    for start in tqdm(range(0, len(rows), batch), desc="document embeddings", disable=not progress):
        chunk = rows[start : start + batch]
        inputs, targets = encoder.encode(captions.captions_at(chunk))
        domain[start : start + len(chunk)] = inputs.float().cpu().numpy()
        clip[start : start + len(chunk)] = targets.float().cpu().numpy()
    domain.flush()
    clip.flush()
