"""Evaluation studies: ``python evaluate.py {vae,vae-scores,text-encoders,generation} ...``.

* ``vae``: the VAE reconstruction study (paper Table 1, Figure 3), see :mod:`evaluation.vae_study`;
* ``vae-scores SHEET.csv``: summarise a filled reader-study scoring sheet (mean ± sd, median, range).

* ``text-encoders``: the text-encoder CheXpert@k study (paper Tables 2 and 3), see
  :mod:`evaluation.text_encoder_study`.

* ``generation``: the generation study (paper Table 4, Figure 4) with finding correctness and diversity,
  see :mod:`evaluation.generation_study`;
* ``generation-scores SHEET.csv``: the filled reader sheet of generated images, per strategy and prompt.
* ``memorization``: the memorization audit (do generated images copy training patients?), see
  :mod:`evaluation.memorization_study`.
* ``utility``: are synthetic images useful to a classifier (real / synthetic / mixed / pretrain-then-real arms)? See
  :mod:`evaluation.utility_study`.

``vae`` and ``generation`` refuse an ``--out`` that already holds a reader kit unless ``--overwrite`` is given; even then
the earlier kit's key and a filled score sheet are kept under time-stamped names (:mod:`evaluation.reader_kit`).
"""
from __future__ import annotations

import argparse
import sys

from core.errors import run_main

STUDIES = {
    "vae": "VAE reconstruction study (paper Table 1, Figure 3)",
    "vae-scores": "summary of a filled reader-study scoring sheet",
    "text-encoders": "text-encoder CheXpert@k study (paper Tables 2 and 3)",
    "generation": "generation quality study (paper Table 4, Figure 4)",
    "generation-scores": "summary of a filled reader sheet of generated images, per strategy and prompt",
    "memorization": "memorization audit: do generated images copy the training patients?",
    "utility": "downstream utility: a classifier trained on real, synthetic, mixed or synthetic-then-real images",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "vae":
        from evaluation.vae_study import main as vae_main

        return vae_main(argv[1:])
    if argv and argv[0] == "vae-scores":
        from evaluation.reader_kit import scores_main  # the sheet alone: no study (and no torch) to import

        return scores_main(argv[1:])
    if argv and argv[0] == "text-encoders":
        from evaluation.text_encoder_study import main as text_main

        return text_main(argv[1:])
    if argv and argv[0] == "generation-scores":
        from evaluation.generation_study import scores_main as generation_scores_main

        return generation_scores_main(argv[1:])
    if argv and argv[0] == "memorization":
        from evaluation.memorization_study import main as memorization_main

        return memorization_main(argv[1:])
    if argv and argv[0] == "utility":
        from evaluation.utility_study import main as utility_main

        return utility_main(argv[1:])
    if argv and argv[0] == "generation":
        from evaluation.generation_study import main as generation_main

        return generation_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES), help="; ".join(f"{k}: {v}" for k, v in STUDIES.items()))
    parser.parse_args(argv[:1])  # exits with the list of studies
    return 2


if __name__ == "__main__":
    raise SystemExit(run_main("evaluate.py", main))
