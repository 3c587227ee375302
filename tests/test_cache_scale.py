"""Caches at full scale: builders of one entry in separate processes, fit-time preparation sharded over DDP ranks.

Real processes throughout (fork, so the tiny model is loaded once): two runs building one latent-cache entry, and two
gloo ranks running the fit-time preparation (``FitPreparation``) the way ``on_fit_start`` does under DDP.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.contract import CaptionSet, ImageSet
from datamodules.latent_cache import LatentCache, LatentCachePlan, build_latent_cache
from lightning_modules.preparation import DocumentEmbeddings, DocumentEncoder, FitPreparation, latent_cache_plan

FORK = multiprocessing.get_context("fork")
PAGE = 4096


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------- item 5: one entry, two runs
def numbered_plan(root: Path, n: int = 6) -> LatentCachePlan:
    """Image i is the constant i, so a complete entry's row i has mean i (a row never written reads as 0)."""
    return LatentCachePlan(root, [f"img{i}" for i in range(n)], lambda image_id: torch.full((3, 4, 4), float(image_id[3:])),
                           {"model": "m"})


def builder(root: Path, out: Path, paused, go, die: bool = False) -> None:
    """One run building the latent cache: after its first batch it says so and waits for ``go`` (or dies)."""
    err = os.open(out / "stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(err, 2)
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            paused.set()
            if die:
                os.kill(os.getpid(), signal.SIGKILL)
            go.wait(60)
        return pixels[:, :1], pixels[:, 1:2]

    try:
        cache = build_latent_cache(numbered_plan(root), encode, batch_size=2, progress=False)
        (out / "means.json").write_text(json.dumps([float(cache.get(f"img{i}")[0].mean()) for i in range(len(cache))]))
    except BaseException:
        (out / "error").write_text(traceback.format_exc().strip().splitlines()[-1])
    os._exit(0)


def start_builder(root: Path, out: Path, die: bool = False):
    out.mkdir()
    (out / "stderr").touch()
    paused, go = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=builder, args=(root, out, paused, go, die))
    proc.start()
    return proc, paused, go


def result(out: Path):
    return (out / "error").read_text() if (out / "error").is_file() else json.loads((out / "means.json").read_text())


def test_two_runs_building_one_latent_entry_both_end_with_the_complete_entry(tmp_path):
    """The seven configs sharing one entry, started together: the second waits for the first instead of deleting its
    partial folder (before: one trained on rows never written, the other died with FileNotFoundError)."""
    root = tmp_path / "cache"
    a, a_paused, a_go = start_builder(root, tmp_path / "a")
    wait_for(a_paused.is_set, "the first builder's first batch")
    b, b_paused, b_go = start_builder(root, tmp_path / "b")
    # the second builder either waits for the first (and says so) or starts over in the same partial folder
    wait_for(lambda: b_paused.is_set() or "waiting" in (tmp_path / "b" / "stderr").read_text(), "the second builder")
    a_go.set()
    a.join(60)
    b_go.set()
    b.join(60)
    want = [float(i) for i in range(6)]
    assert (result(tmp_path / "a"), result(tmp_path / "b")) == (want, want)
    assert "waiting for another process" in (tmp_path / "b" / "stderr").read_text()
    assert sorted(p.name for p in (root / "latents").iterdir() if "partial" in p.name) == []


def test_a_dead_builder_neither_blocks_the_next_nor_leaves_its_partial_folder(tmp_path):
    root = tmp_path / "cache"
    a, a_paused, _ = start_builder(root, tmp_path / "a", die=True)
    a.join(60)
    assert a.exitcode == -signal.SIGKILL and [p.name for p in (root / "latents").iterdir() if "partial" in p.name]
    b, _, b_go = start_builder(root, tmp_path / "b")
    b_go.set()
    b.join(60)
    assert b.exitcode == 0 and result(tmp_path / "b") == [float(i) for i in range(6)]
    assert not [p.name for p in (root / "latents").iterdir() if "partial" in p.name]


# ------------------------------------------------------------------------------ item 8: the key covers the VAE's dtype
def image_set(root: Path, n: int = 8, size: int = 32) -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    pixels = {f"img{i}": torch.rand(3, size, size, generator=gen) * 2 - 1 for i in range(n)}
    return ImageSet(tuple(pixels), pixels.__getitem__, {"source": "test", "resolution": size}, size, root)


def attach(module, rank: int = 0, world: int = 1, nodes: int = 1):
    """What ``FitPreparation`` reads from a Trainer, for a call outside ``fit`` (rank and world of the process group;
    ``nodes``: that many nodes of ``world // nodes`` ranks each)."""
    import torch.distributed as dist

    barrier = (lambda name=None: dist.barrier()) if world > 1 else (lambda name=None: None)
    per_node = world // nodes
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world, local_rank=rank % per_node,
                                     node_rank=rank // per_node, num_nodes=nodes, ckpt_path=None,
                                     strategy=SimpleNamespace(barrier=barrier))
    return module


@pytest.fixture(scope="module")
def module():
    from lightning_modules.unet import UNetFineTuning

    return UNetFineTuning(model={"pretrained": "tiny-random"}, latent_cache_batch_size=3)


def test_latents_encoded_by_a_16_bit_vae_are_not_reused_by_an_fp32_run(module, tmp_path):
    images = image_set(tmp_path)
    try:
        module.sd.set_frozen_dtype(torch.bfloat16)
        half = FitPreparation(attach(module)).latents(images, None)
        module.sd.set_frozen_dtype(torch.float32)
        full = FitPreparation(attach(module)).latents(images, None)
        module.sd.set_frozen_dtype(torch.bfloat16, keep_vae_fp32=True)  # a 16-bit run whose VAE stays fp32
        kept = FitPreparation(attach(module)).latents(images, None)
    finally:
        module.sd.set_frozen_dtype(torch.float32)
    assert half.directory != full.directory and kept.directory == full.directory
    assert (half.info["vae_dtype"], full.info["vae_dtype"]) == ("bfloat16", "float32")
    assert 0 < np.abs(half.get("img0").numpy() - full.get("img0").numpy()).max() < 0.1  # bf16 rounding, not garbage


# ---------------------------------------------------------------------- items 11, 13: preparation sharded over ranks
ROW_FLOATS = 768  # a 768-wide float32 row is 3 KB: adjacent rows share 4 KB pages


def captions(n: int, out: Path, rank: int) -> CaptionSet:
    def at(rows):
        with open(out / f"caption_rows.{rank}", "a") as fh:
            fh.write("".join(f"{r}\n" for r in np.asarray(rows).tolist()))
        return [f"caption {r}" for r in np.asarray(rows).tolist()]

    return CaptionSet("test-captions", n, at)


def encode_captions(texts):
    rows = torch.tensor([float(t.split()[1]) for t in texts])
    return rows[:, None].expand(-1, ROW_FLOATS) + torch.arange(ROW_FLOATS) / ROW_FLOATS, -rows[:, None].expand(-1, ROW_FLOATS)


def rank_main(rank: int, world: int, module, root: Path, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a fork of a process whose OpenMP pool has run (the module fixture) hangs in its first parallel op
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str((out / "port").read_text()))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        encode, encoded = module.encode_posterior, []
        module.encode_posterior = lambda pixels: (encoded.append(len(pixels)), encode(pixels))[1]
        cache = FitPreparation(attach(module, rank, world)).latents(image_set(root, n=7), None)
        (out / f"latents.{rank}.json").write_text(json.dumps({"encoded": sum(encoded), "directory": str(cache.directory)}))
        encoder = DocumentEncoder(encode_captions, ROW_FLOATS, ROW_FLOATS, {"test": 1}, root, batch_size=2)
        docs = FitPreparation(attach(module, rank, world)).documents(encoder, captions(9, out, rank))
        (out / f"documents.{rank}.json").write_text(json.dumps(str(docs.folder)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(module, tmp_path_factory):
    """Two gloo ranks preparing 7 images' latents and 9 captions' embeddings into one cache root."""
    import socket

    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    root = out / "cache"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        (out / "port").write_text(str(s.getsockname()[1]))
    mp.start_processes(rank_main, args=(2, module, root, out), nprocs=2, start_method="fork")
    return out, root


@pytest.mark.slow
def test_two_ranks_each_encode_half_the_latents_and_match_a_single_process_build(two_ranks, module, tmp_path):
    out, root = two_ranks
    ranks = [json.loads((out / f"latents.{r}.json").read_text()) for r in range(2)]
    assert sorted(r["encoded"] for r in ranks) == [3, 4]  # 7 images: each rank its half
    assert ranks[0]["directory"] == ranks[1]["directory"]
    sharded = LatentCache(ranks[0]["directory"])
    images = image_set(root, n=7)
    plan = latent_cache_plan(images, module.spec.cache_key(), tmp_path, vae_dtype=torch.float32)
    single = build_latent_cache(plan, module.encode_posterior, batch_size=2, num_workers=1, progress=False)  # PNG decoding in workers
    assert sharded.ids == single.ids == list(images.ids)
    for image_id in images.ids:
        torch.testing.assert_close(sharded.get(image_id), single.get(image_id), rtol=1e-5, atol=1e-6)


def node_local_main(rank: int, world: int, module, out: Path) -> None:
    """Rank ``rank`` as the only rank of node ``rank``, whose cache root is its own disk (here: its own folder)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str((out / "port").read_text()))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        encode, encoded = module.encode_posterior, []
        module.encode_posterior = lambda pixels: (encoded.append(len(pixels)), encode(pixels))[1]
        cache = FitPreparation(attach(module, rank, world, nodes=world)).latents(image_set(out / f"disk{rank}", n=5), None)
        (out / f"latents.{rank}.json").write_text(json.dumps({"encoded": sum(encoded), "directory": str(cache.directory)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_nodes_with_their_own_cache_disk_each_build_the_whole_entry(module, tmp_path):
    """Two nodes that do not share the cache folder: each node's ranks build their own copy (as before sharding),
    found by probe files, and no probe file is left behind."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        (tmp_path / "port").write_text(str(s.getsockname()[1]))
    mp.start_processes(node_local_main, args=(2, module, tmp_path), nprocs=2, start_method="fork")
    ranks = [json.loads((tmp_path / f"latents.{r}.json").read_text()) for r in range(2)]
    assert [r["encoded"] for r in ranks] == [5, 5]
    copies = [LatentCache(r["directory"]) for r in ranks]
    assert copies[0].directory != copies[1].directory and copies[0].ids == copies[1].ids
    torch.testing.assert_close(copies[0].get("img4"), copies[1].get("img4"))
    assert not [p for r in range(2) for p in (tmp_path / f"disk{r}").rglob(".probe-*")]


def npy_rows(folder: Path, name: str) -> list[tuple[Path, int, int, int]]:
    """``(file, first row, rows, header bytes)`` of each file holding rows of ``name``, in row order."""
    files, first = [], 0
    for path in sorted(folder.glob(f"{name}*.npy")):
        with open(path, "rb") as fh:
            np.lib.format.read_magic(fh)
            shape, _, _ = np.lib.format.read_array_header_1_0(fh)
            files.append((path, first, shape[0], fh.tell()))
        first += shape[0]
    return files


@pytest.mark.slow
def test_two_ranks_write_document_embeddings_to_pages_no_other_rank_writes(two_ranks):
    """Rows interleaved across ranks share 4 KB pages, which NFS writes back whole (rows lost as zeros); each rank
    must own whole pages: here, its own file."""
    out, _ = two_ranks
    folder = Path(json.loads((out / "documents.0.json").read_text()))
    written = {r: {int(x) for x in (out / f"caption_rows.{r}").read_text().split()} for r in range(2)}
    assert sorted(written[0] | written[1]) == list(range(9)) and not written[0] & written[1]
    for name in ("domain", "clip"):
        owners: dict = {}
        for path, first, rows, header in npy_rows(folder, name):
            for row in range(first, first + rows):
                offset = header + (row - first) * ROW_FLOATS * 4
                for page in range(offset // PAGE, (offset + ROW_FLOATS * 4 - 1) // PAGE + 1):
                    owners.setdefault((path.name, page), set()).update(r for r in range(2) if row in written[r])
        shared = sorted(key for key, ranks in owners.items() if len(ranks) > 1)
        assert not shared, f"{name}: pages written by both ranks: {shared[:4]}"
    docs = DocumentEmbeddings(folder)
    domain, clip = docs.lookup(torch.tensor([8, 0, 4]))
    want_domain, want_clip = encode_captions(["caption 8", "caption 0", "caption 4"])
    torch.testing.assert_close(domain, want_domain)
    torch.testing.assert_close(clip, want_clip)
