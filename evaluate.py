"""Evaluation studies: ``python evaluate.py {vae,text-encoders,generation} ...``.

The three studies of the paper (VAE reconstruction, text-encoder CheXpert@k, generation quality)
are planned but not implemented yet; each subcommand says so instead of pretending to run.
"""
from __future__ import annotations

import argparse
import sys

STUDIES = {
    "vae": "VAE reconstruction study (paper Table 1, Figure 3)",
    "text-encoders": "text-encoder CheXpert@k study (paper Tables 2 and 3)",
    "generation": "generation quality study (paper Table 4, Figure 4)",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES), help="which study to run")
    args, _ = parser.parse_known_args(argv)
    print(f"evaluate.py: error: the {STUDIES[args.study]} is not implemented yet.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
