"""Does a model copy its training images? Nearest neighbours, a calibrated copy threshold, and copy rates.

Everything here works on similarity matrices, so any feature space fits:

* :func:`cosine_similarity` of feature vectors (a classifier's ``features2``, RAD-DINO, a re-identification network);
* :func:`aligned_pixel_similarity`: the Pearson correlation of gray pixels, maximised over shifts of a few pixels, so a
  slightly shifted copy is still caught; a change of brightness or contrast (an affine map of the gray values) leaves it
  unchanged.

**The copy criterion.** A generated image is a copy when it is closer to some training image than real images of *other
patients* (held-out) come to the training images: the threshold is the ``quantile`` (default 0.99) of the held-out
images' nearest-training similarities (:func:`calibrate`). Its false-positive rate on held-out images is measured, not
assumed: the threshold is set on one half of the held-out images and counted on the other (and the other way round).
It is evidence of copying in the chosen feature space, not a proof of privacy either way.

**At any size.** A training set is embedded :data:`CHUNK` images at a time (:meth:`SimilaritySpace.embed_stream`: only
features are kept, never pixels) and nearest neighbours are found :data:`BLOCK` × :data:`BLOCK` similarities at a time
with a running max and argmax (:func:`nearest_blockwise`, equal to the dense :func:`nearest` bit for bit): what is held
is the features (8 KB per image for 1024-d float64 classifier features, 64 KB for pixels: 128 × 128 float32) plus one
block, never a ``[N, N]`` matrix or a per-shift ``[N, 16384]`` copy.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metrics.scores import MetricInputError, proportion_ci

CHUNK = 256  # images read and embedded at a time (256 at 512 px: 64 MB of uint8, 256 MB as float32)
BLOCK = 1024  # queries × keys per similarity block (pixel space: 2 × 1024 × 16384 float32 = 128 MB per shift)
PIXEL_SIZE = 128  # pixel space compares gray images at this size


def cosine_similarity(a, b) -> np.ndarray:
    """``[len(a), len(b)]`` cosine similarities of feature rows."""
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).numpy()


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pixel_features(x, size: int = PIXEL_SIZE) -> torch.Tensor:
    """Gray images ``[N, H, W]`` (or ``[N, C, H, W]``, averaged) as float32 ``[N, size, size]`` (area resampling): what
    :func:`aligned_pixel_similarity` compares, per image, so a set can be prepared chunk by chunk and kept."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if x.ndim == 4:
        x = x.mean(1)
    return F.interpolate(x[:, None], size=(size, size), mode="area")[:, 0] if x.shape[-1] != size else x


def aligned_pixel_similarity(a, b, max_shift: int = 4, size: int = PIXEL_SIZE) -> np.ndarray:
    """``[len(a), len(b)]``: for each pair of gray images (``[N, H, W]``, any range), the largest Pearson correlation of
    their pixels over relative shifts of up to ``max_shift`` pixels (at ``size`` × ``size``) in each direction. Each
    shift standardises a ``[len, size²]`` copy of both sets: call it on blocks (:func:`nearest_blockwise`) for large
    sets."""
    a, b = pixel_features(a, size), pixel_features(b, size)
    best = torch.full((len(a), len(b)), -1.0)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            ya, yb = (dy, 0) if dy >= 0 else (0, -dy)
            xa, xb = (dx, 0) if dx >= 0 else (0, -dx)
            h, w = size - abs(dy), size - abs(dx)
            sa = _standardise(a[:, ya:ya + h, xa:xa + w])
            sb = _standardise(b[:, yb:yb + h, xb:xb + w])
            best = torch.maximum(best, sa @ sb.T)
    return best.double().numpy()


def nearest(similarity: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each row: the column of its most similar item and that similarity (``exclude_self``: a square matrix of a
    set against itself, the diagonal left out)."""
    sim = np.array(similarity, dtype=np.float64, copy=True)
    if exclude_self:
        if sim.shape[0] != sim.shape[1]:
            raise MetricInputError(f"exclude_self needs a square similarity matrix, got {sim.shape}")
        np.fill_diagonal(sim, -np.inf)
    index = sim.argmax(1)
    return index, sim[np.arange(len(sim)), index]


def nearest_blockwise(similarity: Callable, queries, keys, exclude: Optional[Sequence[int]] = None,
                      block: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest` of ``similarity(queries, keys)`` without the matrix: ``block`` × ``block`` (default
    :data:`BLOCK`) similarities at a time, keeping each query's running max and argmax over the key blocks (ties: the
    first column, as ``np.argmax``), so memory does not grow with the number of keys beyond the keys themselves.

    ``exclude[i]``: a key left out for query ``i`` (a sample of the keys against all of them, self excluded; -1: none).
    Without keys (a rank holding no training image) every index is -1 and every similarity -inf."""
    block = int(block or BLOCK)
    index, best = np.full(len(queries), -1, dtype=np.int64), np.full(len(queries), -np.inf)
    left_out = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    for q0 in range(0, len(queries), block):
        q = queries[q0:q0 + block]
        rows = np.arange(len(q))
        for k0 in range(0, len(keys), block):
            sim = np.array(similarity(q, keys[k0:k0 + block]), dtype=np.float64)
            if left_out is not None:
                col = left_out[q0:q0 + len(q)] - k0
                inside = (col >= 0) & (col < sim.shape[1])
                sim[rows[inside], col[inside]] = -np.inf
            j = sim.argmax(1)
            value = sim[rows, j]
            better = value > best[q0:q0 + len(q)]  # strictly: a tie keeps the earlier block's column
            best[q0:q0 + len(q)][better], index[q0:q0 + len(q)][better] = value[better], j[better] + k0
    return index, best


def min_heldout(quantile: float) -> int:
    """Held-out images needed to calibrate at ``quantile``: each half must hold at least ``1 / (1 - quantile)``."""
    return 2 * math.ceil(1 / (1 - quantile) - 1e-9)


@dataclass(frozen=True)
class Calibration:
    """The copy threshold and how it was set: the ``quantile`` of ``n_heldout`` held-out images' nearest-training
    similarities; ``false_positive_rate``: the share of held-out images above a threshold set on the other half."""

    threshold: float
    quantile: float
    n_heldout: int
    false_positive_rate: float

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(heldout_nearest: Sequence[float], quantile: float = 0.99, seed: int = 0) -> Calibration:
    """The copy threshold from held-out images' nearest-training similarities (see the module docstring)."""
    values = np.asarray(heldout_nearest, dtype=np.float64)
    if not 0.5 <= quantile < 1:
        raise MetricInputError(f"quantile {quantile}: expected at least 0.5 and below 1 (e.g. 0.99)")
    need = min_heldout(quantile)
    if len(values) < need:
        raise MetricInputError(f"{len(values)} held-out images: calibrating a copy threshold at the {quantile:g} quantile "
                               f"needs at least {need} (two halves of {need // 2}); give more held-out images or a lower "
                               "--quantile")
    order = np.random.default_rng(seed).permutation(len(values))
    halves = values[order[: len(values) // 2]], values[order[len(values) // 2:]]
    rates = [float(np.mean(other > np.quantile(one, quantile))) for one, other in (halves, halves[::-1])]
    return Calibration(float(np.quantile(values, quantile)), quantile, len(values), float(np.mean(rates)))


def copy_rate(is_copy: Sequence[bool], n_boot: int = 1000, seed: int = 0) -> dict:
    """The share of copies with its exact (Clopper-Pearson) 95% interval (:func:`metrics.scores.proportion_ci`): 0 of
    16 is [0, 20.6%], not the "[0, 0]" of a bootstrap. ``n_boot`` and ``seed`` are unused (the interval is exact);
    kept for the callers."""
    flags = np.asarray(is_copy, dtype=bool)
    if not len(flags):
        raise MetricInputError("no generated images to audit")
    lo, hi = proportion_ci(int(flags.sum()), len(flags))
    return {"rate": float(flags.mean()), "ci_low": lo, "ci_high": hi, "n": int(len(flags)), "copies": int(flags.sum())}


def audit(generated_to_train: np.ndarray, heldout_to_train: np.ndarray, train_subjects: Optional[Sequence] = None,
          quantile: float = 0.99, n_boot: int = 1000, seed: int = 0, calibration: Optional[Calibration] = None,
          n_train: Optional[int] = None) -> dict:
    """Nearest training image per generated image, the calibrated verdicts and the summaries (``calibration``: one
    already made from ``heldout_to_train``, so that several models are judged by one threshold computed once).
    ``generated_to_train``: the similarity matrix, or its nearest training images ``(index, similarity)`` (from
    :meth:`SimilaritySpace.nearest`, blockwise) with ``n_train``, the number of training images.

    Returns ``{"calibration", "nearest_train", "similarity", "is_copy", "copy_rate", "copies_per_train_image",
    "subjects_copied"}`` (the last only with ``train_subjects``: the share of training patients copied at least once)."""
    blockwise = isinstance(generated_to_train, tuple)
    if calibration is None and heldout_to_train is None:
        raise MetricInputError("audit: heldout_to_train is None and no calibration given; pass one of them")
    if blockwise and n_train is None:
        raise MetricInputError("audit: generated_to_train is (index, similarity): pass n_train, the number of training images")
    calibration = calibration or calibrate(nearest(heldout_to_train)[1], quantile, seed)
    index, similarity = generated_to_train if blockwise else nearest(generated_to_train)
    is_copy = similarity > calibration.threshold
    per_train = np.bincount(index[is_copy], minlength=n_train if n_train is not None else generated_to_train.shape[1])
    result = {"calibration": calibration, "nearest_train": index, "similarity": similarity, "is_copy": is_copy,
              "copy_rate": copy_rate(is_copy, n_boot, seed), "copies_per_train_image": per_train}
    if train_subjects is not None:
        subjects = np.asarray(train_subjects)
        copied = set(subjects[index[is_copy]].tolist())
        result["subjects_copied"] = {"copied": len(copied), "of": len(set(subjects.tolist())),
                                     "share": len(copied) / max(1, len(set(subjects.tolist())))}
    return result


class SimilaritySpace:
    """Where images are compared: ``pixel`` (:func:`aligned_pixel_similarity`) or the features of an extractor from
    :mod:`metrics.features` (``classifier`` with ``classifier=...``, or a registered one), compared by cosine.

    ``embed(images)`` takes uint8 gray images ``[N, H, W]`` and returns what ``similarity`` compares: for ``pixel`` the
    images in [0, 1] at 128 × 128 (:func:`pixel_features`), otherwise feature vectors. Embed each set once and keep it
    (training images above all: :meth:`embed_stream`, never their pixels); compare with :meth:`nearest` (blockwise).
    """

    def __init__(self, features: str = "pixel", max_shift: int = 4, **options):
        self.kind, self.max_shift, self.extractor = features, int(max_shift), None
        if features == "pixel":
            self.name = f"pixels (best correlation over shifts of up to {self.max_shift} px at 128 px)"
        else:
            from metrics.features import feature_extractor

            self.extractor = feature_extractor(features, **options)
            detail = options.get("classifier") or options.get("model") or ""
            self.name = f"{features} features" + (f" ({detail})" if detail else "")

    @property
    def has_features(self) -> bool:
        return self.extractor is not None

    def embed(self, images_u8: np.ndarray, device=None) -> torch.Tensor:
        images = torch.from_numpy(np.asarray(images_u8)).float().div_(255)  # in place: one float copy of the chunk
        if self.extractor is None:
            return pixel_features(images)
        from metrics.features import extract

        if device is not None:
            self.extractor.to(device)
        return extract(self.extractor, images.unsqueeze(1), device=device)

    def embed_stream(self, read: Callable[[int, int], np.ndarray], n: int, device=None) -> torch.Tensor:
        """:meth:`embed` of ``n`` images read :data:`CHUNK` at a time (``read(start, stop)``: uint8 ``[stop - start, H,
        W]``) into one preallocated tensor: the features are kept, the pixels of one chunk at most."""
        out = torch.empty(0)
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            part = self.embed(read(start, stop), device)
            if start == 0:
                out = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
            out[start:stop] = part
        return out

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        if self.extractor is None:
            return aligned_pixel_similarity(a, b, max_shift=self.max_shift)
        return cosine_similarity(a, b)

    def nearest(self, a: torch.Tensor, b: torch.Tensor, exclude: Optional[Sequence[int]] = None,
                block: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Each of ``a``'s most similar item in ``b`` and that similarity, blockwise (:func:`nearest_blockwise`)."""
        return nearest_blockwise(self.similarity, a, b, exclude, block)
