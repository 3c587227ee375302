"""Time CheXpert@k (cosine and bag-of-words) on random data of the study's shapes.

    python benchmarks/chexpert_at_k.py                      # 700 and 10,000 reports on the default device
    python benchmarks/chexpert_at_k.py --n 700 100000 --device cuda

Prints, per size, the seconds of one CheXpert@10 over 768-d embeddings (paper mode, 14 classes) and the
peak memory the similarity chunks need (CUDA: ``max_memory_allocated``; CPU: the chunk size), so the
docs/text-encoder-study.md's "700 reports in milliseconds, 100k feasible in bounded memory" is a measured statement.
"""
from __future__ import annotations

import argparse
import time

import torch

from metrics.chexpert_at_k import (DEFAULT_MAX_CHUNK_ELEMENTS, CosineSimilarity, TokenIoUSimilarity, chexpert_at_k, chunk_rows,
                                   class_matrices)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[700, 10_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--bow_max", type=int, default=20_000, help="skip the bag-of-words timing above this many reports")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"dim {args.dim}, k {args.k}, chunk budget {DEFAULT_MAX_CHUNK_ELEMENTS:,} similarities")
    words = "small moderate large left right bilateral pleural effusion cardiomegaly edema atelectasis no acute process".split()
    for n in args.n:
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(n, args.dim, generator=g)
        drawn = torch.randint(0, 14, (n,), generator=g)
        member, scored = class_matrices(drawn, None, 14, "paper")
        classes = [str(i) for i in range(14)]
        sim = CosineSimilarity(emb, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        chexpert_at_k(sim, n, member, scored, args.k, classes)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res = chexpert_at_k(sim, n, member, scored, args.k, classes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        rows = chunk_rows(n)
        mem = (f"peak extra GPU memory {(torch.cuda.max_memory_allocated(device) - base) / 2**20:,.0f} MiB"
               if device.type == "cuda" else f"{rows} rows per chunk ({rows * n * 4 / 2**20:,.0f} MiB of similarities)")
        line = f"n={n:>7,}: cosine CheXpert@{args.k} {dt * 1000:9.1f} ms, {mem}, macro {100 * res.macro:.1f} (chance {100 / 14:.1f})"
        if n <= args.bow_max:
            texts = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=g).tolist()) for _ in range(n)]
            t0 = time.perf_counter()
            chexpert_at_k(TokenIoUSimilarity(texts), n, member, scored, args.k, classes)
            line += f"; bag of words {time.perf_counter() - t0:.2f} s"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
