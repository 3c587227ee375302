"""CheXpert@k: does a text representation put reports with the same finding next to each other?

The paper (section 2.4) prints::

    CheXpert@k_i = sum(chexpert_labels[argsort(similarities[i])[-k:]]) / k == chexpert_labels[i]

which compares a fraction with a label, so it cannot be taken literally. Our reading, which fits every
number of its Tables 2 and 3 (multiples of 1/(50·k) on 700 reports, 50 per class):

* every report ``i`` in the study carries one class ``c_i``: the CheXpert class it was drawn for;
* ``N_k(i)`` are the ``k`` reports most similar to ``i``, **excluding i itself** (the paper's "filter");
* ``CheXpert@k_i = |{j in N_k(i) : c_j = c_i}| / k``, the share of neighbours of the same class
  (**paper mode**);
* a class's score is the mean of ``CheXpert@k_i`` over the reports drawn for it, and the macro score is
  the unweighted mean over classes (the paper's Tables 2 and 3, in percent).

**Multi-label mode** counts a neighbour ``j`` when it is *positive* for ``c_i`` (whatever class it was
drawn for): ``CheXpert@k_i = |{j in N_k(i) : y_j[c_i] = 1}| / k``. Without a class per report (the whole
corpus), each report is scored once for each class it is positive for.

In matrix form both modes are one computation: a boolean ``member [n, C]`` (who counts as class ``c``
when it is a neighbour) and ``scored_for [n, C]`` (which classes report ``i`` is scored for)::

    rate[i, c]  = mean_{j in N_k(i)} member[j, c]
    score[c]    = sum_i scored_for[i, c] * rate[i, c] / sum_i scored_for[i, c]

**Ties.** Every report strictly more similar than the k-th largest similarity is a neighbour; the
``k - |above|`` places left are *shared* by all ``t`` reports equal to it, each counting
``(k - |above|) / t`` of a neighbour (:func:`neighbour_weights`). That is the expectation of the score
under random tie-breaking, computed exactly: deterministic, and independent of the report order.
(Filling the places in index order, as before issue 29, let the order decide: the sample is sorted by
class, so with coarse similarities such as the bag-of-words baseline's the first class collected the
tied neighbours, 0.96 with no class signal at all, chance 0.07.) With identical embeddings every
similarity ties and every report scores the share of its own class among the others (chance);
:func:`is_degenerate` flags such embeddings so that they are reported, not scored.

**Scale.** Similarities are computed in row chunks (``max_chunk_elements`` similarities at a time) and
only each report's share of neighbours per class is kept, so memory is ``O(chunk · n)``: 700 reports take milliseconds and
100k reports fit in a few hundred MB.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 24  # similarities held at once (64 MB in float32)
MODES = ("paper", "multilabel")


# ---------------------------------------------------------------------------------------------- similarities
class CosineSimilarity:
    """Rows of the cosine-similarity matrix of ``embeddings [n, d]`` (computed on ``device``)."""

    def __init__(self, embeddings: torch.Tensor, device: Optional[torch.device | str] = None):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings: expected a [n, d] matrix, got shape {tuple(embeddings.shape)}")
        x = embeddings.detach().to(device or embeddings.device, torch.float32)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(1).nonzero()[0])
            raise ValueError(f"embeddings: row {bad} is not finite (NaN or inf); the encoder's output cannot be scored")
        self.x = F.normalize(x, dim=1)
        self.n = x.shape[0]

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop] @ self.x.T


WORD_RE = re.compile(r"[a-z0-9]+")


def word_set(text: str) -> frozenset[str]:
    """The bag-of-words baseline's tokens: lower-cased runs of letters and digits (punctuation and ``___`` dropped)."""
    return frozenset(WORD_RE.findall(text.lower()))


class TokenIoUSimilarity:
    """The paper's bag-of-words baseline: similarity = |A ∩ B| / |A ∪ B| of the two reports' word sets.

    Two empty word sets have similarity 0. Computed exactly (integer counts) with a sparse matrix product.
    """

    def __init__(self, texts: Sequence[str], tokenize: Callable[[str], frozenset[str]] = word_set):
        from scipy import sparse

        sets = [tokenize(t) for t in texts]
        vocab: dict[str, int] = {}
        rows, cols = [], []
        for i, words in enumerate(sets):
            for w in words:
                rows.append(i)
                cols.append(vocab.setdefault(w, len(vocab)))
        self.n = len(sets)
        data = np.ones(len(rows), dtype=np.float64)
        self.a = sparse.csr_matrix((data, (rows, cols)), shape=(self.n, max(len(vocab), 1)))
        self.at = self.a.T.tocsc()
        self.sizes = np.asarray([len(s) for s in sets], dtype=np.float64)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        inter = (self.a[start:stop] @ self.at).toarray()
        union = self.sizes[start:stop, None] + self.sizes[None, :] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        return torch.from_numpy(iou)


# ---------------------------------------------------------------------------------------------- neighbours
def _above_and_tied(sim: torch.Tensor, row_offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(above [m, n], tied [m, n], share [m, 1])``: the columns above the k-th largest similarity of each row, those
    equal to it, and the share of a neighbour each tied column counts (see :func:`neighbour_weights`)."""
    m, n = sim.shape
    if not 0 < k < n:
        raise ValueError(f"k={k}: need 1 <= k < {n} (the number of other reports)")
    sim = torch.nan_to_num(sim, nan=-torch.inf)  # a new tensor: the caller's similarities are not changed
    rows = torch.arange(m, device=sim.device)
    own = row_offset + rows
    sim[rows, own] = -torch.inf
    kth = sim.topk(k, dim=1).values[:, -1:]
    above = sim > kth
    tied = sim == kth
    tied[rows, own] = False  # when fewer than k others are finite, the k-th is -inf like the report itself
    share = (k - above.sum(1, keepdim=True)).double() / tied.sum(1, keepdim=True).double()
    return above, tied, share


def neighbour_weights(sim: torch.Tensor, row_offset: int, k: int) -> torch.Tensor:
    """How much of a neighbour each column is, ``[m, n]`` float64 (each row sums to k), from ``sim [m, n]``.

    Row ``r`` is report ``row_offset + r``; its own column gets 0. Columns above the k-th largest similarity get 1,
    the ``t`` columns equal to it ``(k - |above|) / t`` each (the expectation under random tie-breaking; see the module
    docstring), the rest 0. NaN similarities count as the lowest.
    """
    above, tied, share = _above_and_tied(sim, row_offset, k)
    return above.double() + tied.double() * share


def neighbour_rates(sim: torch.Tensor, row_offset: int, k: int, member: torch.Tensor) -> torch.Tensor:
    """``[m, C]`` float64: ``neighbour_weights(sim, row_offset, k) @ member / k``, without the float64 ``[m, n]``.

    The counts of members above and tied are float32 matrix products of 0/1 values, exact below 2**24 reports (TF32
    keeps 0 and 1 exact too); only the per-row share is fractional."""
    above, tied, share = _above_and_tied(sim, row_offset, k)
    member32 = member.to(sim.device, torch.float32)
    count_above = (above.float() @ member32).double()
    count_tied = (tied.float() @ member32).double()
    return (count_above + share * count_tied).cpu() / k


def chunk_rows(n: int, max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> int:
    return max(1, min(n, int(max_chunk_elements) // max(n, 1)))


# ---------------------------------------------------------------------------------------------- the metric
@dataclass
class CheXpertAtK:
    """Scores in [0, 1] (the paper prints percent)."""

    k: int
    classes: tuple[str, ...]
    per_class: dict[str, float]  # NaN for a class no report is scored for
    counts: dict[str, int]  # reports scored for each class
    macro: float  # mean over classes with at least one report
    rates: torch.Tensor  # [n, C] share of neighbours counting as class c, NaN where report i is not scored for c


def class_matrices(
    drawn: Optional[torch.Tensor], positives: Optional[torch.Tensor], n_classes: int, mode: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(member, scored_for)`` boolean ``[n, C]`` matrices for ``mode`` (see the module docstring).

    ``drawn [n]`` is each report's class index (the class it was sampled for) or None for a whole corpus;
    ``positives [n, C]`` its labels, needed in multi-label mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode: unknown value {mode!r}; expected one of {', '.join(MODES)}")
    onehot = None if drawn is None else F.one_hot(drawn.long(), n_classes).bool()
    if mode == "paper":
        if onehot is None:
            raise ValueError("mode 'paper' needs each report to carry one class (a class-balanced sample); "
                             "score a whole corpus with mode 'multilabel'")
        return onehot, onehot
    if positives is None:
        raise ValueError("mode 'multilabel' needs the reports' labels (positives)")
    positives = positives.bool()
    return positives, onehot if onehot is not None else positives


def chexpert_at_k(
    similarity: Callable[[int, int], torch.Tensor],
    n: int,
    member: torch.Tensor,
    scored_for: torch.Tensor,
    k: int,
    classes: Sequence[str],
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> CheXpertAtK:
    """CheXpert@k of ``n`` reports whose similarity rows ``similarity(start, stop) -> [stop-start, n]`` gives."""
    classes = tuple(classes)
    if member.shape != (n, len(classes)) or scored_for.shape != (n, len(classes)):
        raise ValueError(f"member/scored_for: expected shape {(n, len(classes))}, got {tuple(member.shape)} and {tuple(scored_for.shape)}")
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the number of reports ({n}): each report's k neighbours exclude itself")
    if k < 1:
        raise ValueError(f"k={k}: expected k >= 1")
    step = chunk_rows(n, max_chunk_elements)
    rates = torch.full((n, len(classes)), torch.nan, dtype=torch.float64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        rate = neighbour_rates(similarity(start, stop), start, k, member)
        rates[start:stop] = torch.where(scored_for[start:stop], rate, torch.nan)
    counts = scored_for.sum(0)
    per_class, count_of = {}, {}
    for c, name in enumerate(classes):
        count_of[name] = int(counts[c])
        col = rates[:, c]
        per_class[name] = float(col[~col.isnan()].mean()) if counts[c] > 0 else float("nan")
    scored = [v for v in per_class.values() if not np.isnan(v)]
    macro = float(np.mean(scored)) if scored else float("nan")
    return CheXpertAtK(k=k, classes=classes, per_class=per_class, counts=count_of, macro=macro, rates=rates)


def is_degenerate(embeddings: torch.Tensor, rtol: float = 1e-4) -> bool:
    """True when every row is (numerically) the same vector: the ranking would be pure tie-breaking.

    The largest distance of a row from the mean row, relative to the mean row norm, must exceed ``rtol``.
    CLIP's first-position ("CLS") state is such a case: under the causal mask position 0 sees only the
    start token, so it is identical for every text.
    """
    x = embeddings.detach().to(torch.float64)
    if x.shape[0] < 2:
        return False
    spread = (x - x.mean(0, keepdim=True)).norm(dim=1).max()
    scale = x.norm(dim=1).mean().clamp(min=1e-30)
    return bool(spread <= rtol * scale)
