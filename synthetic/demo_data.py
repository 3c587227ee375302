"""The demo reproduction's data: ``python -m synthetic.demo_data OUT [--findings ...]``.

Writes phantom MIMIC-CXR-JPG data (``OUT/mimic``; other "patients" for the memorization audit in ``OUT/heldout``), synthetic LAION parquet files (``OUT/laion``) and the candidate
helper's proposal of hand-picked training images (``OUT/selected.csv``, unreviewed: phantoms have no patients to
protect). ``reproduce.py --demo`` runs it; each part is written once.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from datamodules.candidates import propose
from synthetic.laion import write_synthetic_laion
from synthetic.phantoms import write_phantom_mimic


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synthetic.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--findings", nargs="+", default=["No Finding", "Pleural Effusion", "Cardiomegaly"])
    args = parser.parse_args(argv)
    write_phantom_mimic(args.out / "mimic", n_per_finding=12, size=64, seed=0, findings=args.findings)
    # other patients for the memorization audit's calibration: the demo root's own test split is a handful of images
    write_phantom_mimic(args.out / "heldout", n_per_finding=48, size=64, seed=11, findings=args.findings)
    if not any((args.out / "laion").glob("*.parquet")):
        write_synthetic_laion(args.out / "laion", n_captions=500, seed=0)
    selected = args.out / "selected.csv"
    if not selected.is_file():
        df = propose(args.out / "mimic", n=5, k=5)
        df.loc[df["selected"], ["dicom_id", "finding"]].to_csv(selected, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
