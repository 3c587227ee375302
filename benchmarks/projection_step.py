"""Time textual-projection training steps: ``python benchmarks/projection_step.py [--sd ID --domain ID --device cuda]``.

Measures, in one process on one device, the time of one optimisation step (forward, MSE, backward,
AdamW) of the projection MLP for

* document level reading the on-disk cache (what ``projection_document.yaml`` does),
* document level encoding both texts on the fly (``cache_embeddings: false``),
* token level encoding on the fly (what ``projection_token.yaml`` does),

and prints ms per step, hours per 10k steps (the paper: 3 h document, 8 h token level per 10k steps
on a Quadro P5000) and the ratios between the three. Defaults are the tiny presets on CPU; pass
``--sd CompVis/stable-diffusion-v1-4 --domain microsoft/BiomedVLP-CXR-BERT-specialized --device cuda``
for the real models (downloaded beforehand).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _time(step, n: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - start) / n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sd", default="tiny-phantom")
    parser.add_argument("--domain", default="tiny-bert")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    args = parser.parse_args(argv)

    from synthetic.laion import SyntheticLAIONDataModule
    from datamodules.contract import CaptionSet
    from lightning_modules.preparation import DocumentEmbeddings, DocumentEncoder, fill_document_embeddings
    from lightning_modules.projection import TextualProjection

    device = torch.device(args.device)
    dtype = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        dm = SyntheticLAIONDataModule(root=str(Path(tmp) / "laion"), n_captions=max(512, 4 * args.batch_size), cache_dir=str(Path(tmp) / "hf"))
        dm.setup()
        captions = [dm.caption_dataset()[i]["caption"] for i in range(dm.num_captions)]
        results = {}
        for level, cached in (("document", True), ("document", False), ("token", False)):
            module = TextualProjection(model={"pretrained": args.sd}, domain_encoder={"pretrained": args.domain}, level=level,
                                       cache_embeddings=cached).to(device)
            module.sd.set_frozen_dtype(dtype)
            module.domain.to(dtype=dtype)
            opt = torch.optim.AdamW(module.projection.parameters(), lr=1e-4)
            rng = np.random.default_rng(0)
            if cached:  # what the fit-time preparation builds, filled here without a Trainer
                c = module.conditioning
                folder = Path(tmp) / "cache"
                folder.mkdir(exist_ok=True)
                for name, width in (("domain", c.in_features), ("clip", c.out_features)):
                    np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(len(captions), width)).flush()
                encoder = DocumentEncoder(lambda texts: (c.inputs(texts), c.targets(texts)), c.in_features, c.out_features, {}, folder)
                fill_document_embeddings(folder, encoder, CaptionSet("benchmark", len(captions), lambda rows: [captions[i] for i in rows]),
                                         np.arange(len(captions)), progress=False)
                module.prepared.documents = DocumentEmbeddings(folder)

            def step():
                index = torch.from_numpy(rng.choice(len(captions), args.batch_size, replace=False))
                loss = module.projection_loss({"caption": [captions[i] for i in index.tolist()], "index": index})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            name = f"{level} ({'cached' if cached else 'on the fly'})"
            results[name] = _time(step, args.steps, args.warmup, sync)
    print(f"projection step times, batch {args.batch_size}, SD {args.sd}, domain encoder {args.domain}, {args.device}, "
          f"precision {args.precision}, mean of {args.steps} steps")
    for name, t in results.items():
        print(f"  {name:<26} {1000 * t:9.2f} ms/step   {t * 10_000 / 3600:7.3f} h per 10k steps")
    base = results["document (cached)"]
    for name, t in results.items():
        print(f"  {name:<26} {t / base:7.1f}x the cached document step")
    return results


if __name__ == "__main__":
    main()
