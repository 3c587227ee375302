"""How much memory does the memorization audit hold? ``python benchmarks/memorization_memory.py`` (about 1 min on 2
CPU cores; the figures are in docs/memorization.md).

Runs the audit's reference stage (:func:`evaluation.memorization_study.reference_features`: training and held-out
features, the held-out images' nearest training images and the calibration; then 64 generated images' nearest
training images and the training histogram's sample, :func:`train_self_nearest`) on a synthetic training set of
random 512-px gray images made on the fly (no disk), in a tiny feature space (4 × 4 average pool and a fixed 16 × 16
projection, so the features cost nothing and what is measured is what the audit holds). Each size runs in its own
process; the figure is its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) above the resident
memory it had before the stage (imports, the feature network). ``--old`` runs the same stage as the audit did before
it streamed (every training image decoded into one array, embedded at once, dense held-out × train and train × train
similarity matrices), at sizes where that fits.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESOLUTION, HELDOUT, GENERATED = 512, 200, 64


def stage(n: int, old: bool) -> dict:
    """One measurement, in this process: ``{"n", "old", "peak_mb", "seconds"}``."""
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from evaluation.memorization_study import RealSets, reference_features, train_self_nearest
    from metrics.features import extract, register
    from metrics.memorization import SimilaritySpace, calibrate, nearest

    class TinyPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.project = nn.AdaptiveAvgPool2d(4), nn.Linear(16, 16)
            nn.init.orthogonal_(self.project.weight, generator=torch.Generator().manual_seed(0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.project(self.pool(x.mean(1, keepdim=True)).flatten(1))

    register("tiny_pool")(lambda **_: TinyPool())

    class SyntheticSets(RealSets):
        def read(self, records: pd.DataFrame) -> np.ndarray:  # image i is the same random image at every read
            return np.stack([np.random.default_rng(i).integers(0, 256, (self.resolution,) * 2, dtype=np.uint8)
                             for i in records["index"]])

    def records(start: int, count: int) -> pd.DataFrame:
        return pd.DataFrame({"index": range(start, start + count), "dicom_id": [f"d{i}" for i in range(start, start + count)],
                             "subject_id": range(start, start + count)})

    real = SyntheticSets(records(0, n), records(10**7, HELDOUT), ["No Finding"], RESOLUTION)
    space = SimilaritySpace("tiny_pool")
    generated = SyntheticSets(records(2 * 10**7, GENERATED), records(0, 0), [], RESOLUTION).read(records(2 * 10**7, GENERATED))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.time()
    if old:  # the audit before streaming: all pixels in one array, embedded at once, dense similarity matrices
        def embed(images):  # SimilaritySpace.embed as it was
            return extract(space.extractor, torch.from_numpy(np.asarray(images)).float().div(255).unsqueeze(1))

        train = embed(real.read(real.train))
        h2t = space.similarity(embed(real.read(real.heldout)), train)
        calibrate(nearest(h2t)[1], 0.99)
        nearest(space.similarity(embed(generated), train))
        nearest(space.similarity(train, train), exclude_self=True)
    else:
        feats = reference_features(space, real, 0.99, 0)
        space.nearest(space.embed(generated), feats["train"])
        train_self_nearest(space, feats["train"], 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"n": n, "old": old, "peak_mb": round((peak - before) / 1024, 1), "seconds": round(time.time() - started, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="training images, streamed")
    p.add_argument("--old_sizes", type=int, nargs="*", default=[1000, 2000], help="training images, as before (dense)")
    p.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--old", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage is not None:
        print(json.dumps(stage(args.stage, args.old)))
        return 0
    print(f"memorization audit memory, {datetime.date.today()}, {os.cpu_count()} CPU cores; {RESOLUTION}-px images, "
          f"{HELDOUT} held-out, {GENERATED} generated; peak resident memory above the start of the stage", flush=True)
    rows = []
    for n, old in [(n, True) for n in args.old_sizes] + [(n, False) for n in args.sizes]:
        done = subprocess.run([sys.executable, __file__, "--stage", str(n), *(["--old"] if old else [])], cwd=REPO,
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{'before (dense)' if old else 'streamed':>15} N={n:>6}: peak +{rows[-1]['peak_mb']:.0f} MB, "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
