"""Made-up LAION captions in the exact LAION-400M metadata format (demo and tests; no real data).

:func:`write_synthetic_laion` writes parquet files with all 8 columns of ``laion400m-meta`` (docs/formats.md §2);
:class:`SyntheticLAIONDataModule` is the real caption reader over such files, written on first use
(``projection_demo.yaml``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.laion import NSFW_TAGS, LAIONCaptionDataModule

_SUBJECTS = ("dog", "cat", "red car", "old house", "mountain lake", "city street", "bowl of fruit", "wooden chair",
             "sailing boat", "green field", "lung xray", "chest radiograph", "portrait of a woman", "pair of shoes")
_DETAILS = ("at sunset", "in the snow", "on a white background", "in the rain", "with a blue sky", "at night",
            "in black and white", "close up", "from above", "in a museum", "for sale", "on the beach")


def write_synthetic_laion(folder: str | Path, n_captions: int = 2000, seed: int = 0, n_files: int = 2) -> list[Path]:
    """Write ``n_files`` LAION-400M-format parquet files of made-up captions (demo and tests; no real data).

    All 8 columns, in order, snappy-compressed, as in ``laion400m-meta``; about 2 % of TEXT values are
    null and 1 % empty, and NSFW takes its three real values, so the reader's cleaning runs for real.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    per_file = -(-int(n_captions) // int(n_files))
    for f in range(int(n_files)):
        n = min(per_file, int(n_captions) - f * per_file)
        texts = []
        for _ in range(n):
            r = rng.uniform()
            if r < 0.02:
                texts.append(None)
            elif r < 0.03:
                texts.append("  ")
            else:
                subject = _SUBJECTS[int(rng.integers(len(_SUBJECTS)))]
                detail = _DETAILS[int(rng.integers(len(_DETAILS)))]
                texts.append(f"{subject} {detail}" if rng.uniform() < 0.7 else f"a {subject}")
        table = pa.table({
            "SAMPLE_ID": pa.array(np.arange(f * per_file, f * per_file + n), pa.int64()),
            "URL": pa.array([f"https://example.invalid/{f}/{i}.jpg" for i in range(n)]),
            "TEXT": pa.array(texts, pa.string()),
            "HEIGHT": pa.array(rng.integers(256, 1024, n), pa.int32()),
            "WIDTH": pa.array(rng.integers(256, 1024, n), pa.int32()),
            "LICENSE": pa.array(["?"] * n),
            "NSFW": pa.array(rng.choice(list(NSFW_TAGS), n, p=[0.9, 0.07, 0.03]).tolist()),
            "similarity": pa.array(rng.uniform(0.28, 0.4, n), pa.float64()),
        })
        path = folder / f"part-{f:05d}-synthetic-c000.snappy.parquet"
        pq.write_table(table, path, compression="snappy")
        paths.append(path)
    return paths


class SyntheticLAIONDataModule(LAIONCaptionDataModule):
    """:class:`LAIONCaptionDataModule` over made-up captions written to ``root`` on first use (demo configs).

    Args:
        root: folder of the synthetic parquet files (written once; delete it to rewrite).
        n_captions: how many rows to write.
        **kwargs: see :class:`LAIONCaptionDataModule` (``data_files`` is ``root``).
    """

    def __init__(self, root: str = "data/laion_synthetic", n_captions: int = 2000, **kwargs):
        super().__init__(data_files=str(root), **kwargs)  # its setting checks first: a refused start writes nothing
        self.root = Path(root)
        self.n_captions = int(n_captions)
        if not any(self.root.glob("*.parquet")):
            # written whole into a private folder, then renamed: DDP ranks may get here at once
            import shutil

            tmp = self.root.parent / f".{self.root.name}.tmp-{os.getpid()}"
            write_synthetic_laion(tmp, self.n_captions)
            try:
                if self.root.is_dir() and not any(self.root.iterdir()):
                    self.root.rmdir()
                os.replace(tmp, self.root)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)  # another process was first
                if not any(self.root.glob("*.parquet")):
                    raise
