"""The memorization audit: ``python evaluate.py memorization --runs runs/demo --out results/memorization``.

Does a model copy its training patients? For each model (the base model as a control, then each run or export) the
audit generates ``--n_per_prompt`` images per training finding with fixed seeds (or reads ``--generated FOLDER``: the
images ``generate.py`` wrote there with the prompts and seeds of its ``generation.json``, its labelled grid left out,
and any other image), and compares them in one feature space (``--features``: a classifier's ``features2``, default
torchxrayvision's DenseNet, ``--classifier tiny-phantom`` for the demo; or ``pixel``: gray pixels, best correlation
over shifts of a few pixels) with

* the run's **training images**, read from its ``data.json`` (exactly what the run saw), and
* **held-out images**: the test split's frontal images positive for the same findings, from **other patients** (a
  test image of a training patient is an error naming the patients).

A generated image is a **copy** when it is closer to a training image than the ``--quantile`` (default 0.99) of
held-out images come (:mod:`metrics.memorization`); the false-positive rate of that threshold on held-out images is
measured and reported. Outputs in ``--out``: ``memorization.md`` and ``memorization.csv`` (one row per generated image),
``closest_pairs.png`` (the closest generated/training pairs side by side), ``similarities.png`` (histograms of
nearest-training similarity for generated, held-out and training images, the latter self-excluded, of a seeded sample
of at most 2,000 training images) and ``provenance.json``.

**At full size.** Real images are read, embedded and dropped :data:`metrics.memorization.CHUNK` at a time (only their
features are kept) and nearest neighbours are found block by block (:func:`metrics.memorization.nearest_blockwise`):
no pixel array of the training set, no train × train matrix.

**Local only.** Training images are real patient images: the figures stay in ``--out`` and nothing is logged to W&B.
A feature-space criterion is evidence of copying, not proof of privacy either way.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from core import provenance
from core.errors import UserError, read_text, writable_folder
from core.run_folder import RunFolder, RunFolderError
from datamodules.mimic_cxr import check_patient_disjoint
from datamodules.prompts import FINDING_PROMPTS
from datamodules.study_images import ImageSelectionError, load_images, select_folder, select_mimic
from evaluation.sources import SourceError, Strategy, at_least, choose_samplers, fraction, load_strategies, study_seed
from metrics.memorization import SimilaritySpace, audit, calibrate
from metrics.scores import MetricInputError, frechet_distance

STUDY_PACKAGES = ("torch", "diffusers", "transformers", "torchxrayvision", "numpy")
TRAIN_SELF_SAMPLE = 2000  # training images whose nearest other training image the histogram shows (seeded sample)


class MemorizationAuditError(UserError, ValueError):
    """Bad input to the audit: the message names the option, run or file."""


@dataclass
class AuditConfig:
    runs: list[str]
    out: str
    train_data: Optional[str] = None
    base: Optional[str] = "auto"
    generated: Optional[str] = None
    n_per_prompt: int = 16
    steps: int = 25
    guidance: float = 7.5  # one guidance for every model, Sana's included (SanaPipeline's own default: 4.5)
    seed: int = 0
    features: str = "classifier"
    classifier: str = "densenet121-res224-all"
    image_encoder: Optional[str] = None
    xrv_cache_dir: Optional[str] = None
    quantile: float = 0.99
    max_heldout: Optional[int] = None
    heldout_root: Optional[str] = None
    overwrite: bool = False
    calibrate_only: bool = False
    on_bad_image: str = "fail"
    scheduler: Optional[str] = None  # None: each model's own sampler (generator.sample_scheduler; Sana: euler)


@dataclass
class RealSets:
    """The training and held-out records; their pixels are read when needed (:meth:`read`), never all kept."""

    train: pd.DataFrame
    heldout: pd.DataFrame
    findings: list[str]
    resolution: int
    on_bad_image: str = "fail"
    skipped: list[dict] = field(default_factory=list)  # unreadable images left out (--on_bad_image skip)

    def read(self, records: pd.DataFrame) -> np.ndarray:
        """uint8 ``[len(records), H, W]``, decoded and resized as training does (an unreadable image is an error)."""
        return load_images(records, self.resolution)[1]

    def embed(self, space: SimilaritySpace, records: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
        """The features of ``records``, read and embedded a chunk at a time, and the records they are of: with
        ``--on_bad_image skip`` an unreadable image is left out and listed in :attr:`skipped` (a blank holds its row
        while embedding, as ``embed_stream`` keeps one row per record, and is dropped after)."""
        readable = np.ones(len(records), dtype=bool)

        def read(start: int, stop: int) -> np.ndarray:
            chunk = records.iloc[start:stop]
            kept, images, skipped = load_images(chunk, self.resolution, self.on_bad_image)
            if not skipped:
                return images
            self.skipped += skipped
            readable[start:stop] = chunk["image_id"].isin(kept["image_id"]).to_numpy()
            full = np.zeros((len(chunk), *images.shape[1:]), dtype=images.dtype)
            full[readable[start:stop]] = images
            return full

        features = space.embed_stream(read, len(records))
        return features[torch.from_numpy(readable)], records[readable].reset_index(drop=True)


def read_training_data(cfg: AuditConfig) -> dict:
    """The training images' record: ``--train_data`` (a run folder or a ``data.json``), else the first ``--runs``."""
    source = cfg.train_data or cfg.runs[0]
    option = "--train_data" if cfg.train_data else "--runs"
    path = Path(source)
    if path.is_dir() and (path / "export.json").is_file() and not (path / "data.json").is_file():
        raise MemorizationAuditError(f"{option} {source}: an export holds no data.json (the record of its training images); "
                                     "give --train_data RUN_FOLDER (the run it was exported from) or that run's data.json")
    try:
        data = json.loads(read_text(path)) if path.is_file() else RunFolder(source).data()
    except (RunFolderError, UserError, OSError, ValueError) as err:
        raise MemorizationAuditError(f"{option} {source}: {err}; the audit checks exactly the images a run trained on") from None
    if not isinstance(data, dict) or data.get("dataset") != "MIMIC-CXR-JPG" or not data.get("train"):
        what = data.get("dataset") if isinstance(data, dict) else type(data).__name__
        raise MemorizationAuditError(f"{option} {source}: its data.json lists no training images ({what!r}); the "
                                     "audit applies to runs trained on MIMIC-CXR-JPG images")
    return data


def real_sets(cfg: AuditConfig) -> RealSets:
    """The training images (from the run's data.json) and the held-out test-split images of other patients."""
    data = read_training_data(cfg)
    root, findings, resolution = data["root"], list(data["findings"]), int(data["resolution"])
    source = cfg.train_data or cfg.runs[0]
    indexed = select_mimic(root, None, cfg.seed, "all").drop_duplicates("dicom_id").set_index("dicom_id")
    wanted = list(dict.fromkeys(r["dicom_id"] for r in data["train"]))  # in the run's order
    missing = [d for d in wanted if d not in indexed.index]
    if missing:
        raise MemorizationAuditError(f"{root}: {len(missing)} training image(s) of {source} are not in its metadata, "
                                     f"e.g. {missing[:3]}; the audit needs the data the run trained on")
    train = indexed.loc[wanted].reset_index()
    heldout_root = cfg.heldout_root or root
    heldout = select_mimic(heldout_root, None, cfg.seed, "test")
    heldout = heldout[(heldout[findings] == 1.0).any(axis=1)].reset_index(drop=True)
    check_patient_disjoint(train, heldout, f"the training images of {source} and the held-out images (test split of {heldout_root})")
    if cfg.max_heldout is not None and len(heldout) > cfg.max_heldout:
        heldout = heldout.sample(n=cfg.max_heldout, random_state=cfg.seed).reset_index(drop=True)
    return RealSets(train, heldout, findings, resolution, cfg.on_bad_image)


def reference_features(space: SimilaritySpace, real: RealSets, quantile: float, seed: int) -> dict:
    """Training and held-out features (streamed), the held-out images' nearest training images and the calibration
    (too few held-out images: refused here, before anything is generated). Unreadable images skipped
    (``--on_bad_image skip``) leave ``real``'s records too."""
    feats = {}
    feats["train"], real.train = real.embed(space, real.train)
    feats["heldout"], real.heldout = real.embed(space, real.heldout)
    feats["h2t"] = space.nearest(feats["heldout"], feats["train"])
    feats["calibration"] = calibrate(feats["h2t"][1], quantile, seed)
    return feats


def train_self_nearest(space: SimilaritySpace, train: torch.Tensor, seed: int) -> tuple[np.ndarray, dict]:
    """For a seeded sample of at most :data:`TRAIN_SELF_SAMPLE` training images (all when fewer), the similarity of
    the nearest *other* training image, against every training image: the histogram's training curve without an
    ``[N, N]`` matrix. Returns the similarities and ``{"images", "of", "seed"}`` (kept in the provenance)."""
    n = len(train)
    rows = np.arange(n) if n <= TRAIN_SELF_SAMPLE else np.sort(
        np.random.default_rng(seed).choice(n, TRAIN_SELF_SAMPLE, replace=False))
    return space.nearest(train[rows], train, exclude=rows)[1], {"images": int(len(rows)), "of": n, "seed": seed}


def similarity_space(cfg: AuditConfig) -> SimilaritySpace:
    """``--features``: ``pixel``, ``classifier`` (``--classifier``: xrv weights name or tiny-phantom) or ``image_encoder``
    (``--image_encoder``: a Hugging Face id or folder, e.g. RAD-DINO or a re-identification network)."""
    if cfg.features == "pixel":
        return SimilaritySpace("pixel")
    if cfg.features == "classifier":
        return SimilaritySpace("classifier", classifier=cfg.classifier, xrv_cache_dir=cfg.xrv_cache_dir)
    if cfg.features == "image_encoder":
        if not cfg.image_encoder:
            raise MemorizationAuditError("--features image_encoder needs --image_encoder ID_OR_FOLDER (e.g. microsoft/rad-dino)")
        return SimilaritySpace("image_encoder", model=cfg.image_encoder)
    raise MemorizationAuditError(f"--features {cfg.features!r}: expected 'classifier', 'image_encoder' or 'pixel'")


def generated_sets(cfg: AuditConfig, real: RealSets) -> list[tuple[str, pd.DataFrame, np.ndarray]]:
    """``(model name, one row per image: prompt and seed, uint8 images)`` for the base model and every run."""
    if cfg.generated:
        kept, images, skipped = load_images(generated_records(cfg.generated), real.resolution, cfg.on_bad_image)
        real.skipped += skipped
        return [(Path(cfg.generated).name, kept, images)]
    prompts = [FINDING_PROMPTS[f] for f in real.findings if f in FINDING_PROMPTS]
    base = base_model(cfg.runs[0]) if cfg.base == "auto" else cfg.base
    sets = []
    strategies = load_strategies(None if base in (None, "none") else base, cfg.runs, prompts)
    choose_samplers(strategies, cfg.scheduler)  # each model's own unless --scheduler; one it cannot use is refused here
    for strategy in strategies:
        sets.append(generate_set(cfg, strategy, prompts, real.resolution))
    return sets


def generated_records(folder: str) -> pd.DataFrame:
    """Every image under ``folder`` with its prompt and seed: the images a ``generate.py`` output lists in its
    ``generation.json`` (any under ``folder``) with theirs, its labelled grid left out (it is not a generated image);
    any other image with an empty prompt and seed -1 (unknown)."""
    root = Path(folder).expanduser()
    records = select_folder(root)
    known, grids = {}, set()
    for path in sorted(root.rglob("generation.json")):
        try:
            record = json.loads(read_text(path))
            known.update({str(path.parent / image["file"]): (str(image["prompt"]), int(image["seed"]))
                          for image in record["images"]})
        except (UserError, ValueError, KeyError, TypeError) as err:
            raise MemorizationAuditError(f"--generated {folder}: {path} is not a generate.py record (a list of images "
                                         f"with file, prompt and seed): {type(err).__name__} {err}") from None
        if record.get("grid"):
            grids.add(str(path.parent / record["grid"]))
    missing = sorted(set(known) - set(records["path"]))
    if missing:
        raise MemorizationAuditError(f"--generated {folder}: {len(missing)} image(s) listed in generation.json are "
                                     f"missing, e.g. {missing[0]}")
    records = records[~records["path"].isin(grids)].reset_index(drop=True)
    return records.assign(prompt=[known.get(p, ("", -1))[0] for p in records["path"]],
                          seed=[known.get(p, ("", -1))[1] for p in records["path"]])


def base_model(source: str) -> str:
    """The base model a run or export started from (``--base auto``), from its config or ``export.json``."""
    try:
        if (Path(source) / "export.json").is_file():
            return json.loads(read_text(Path(source) / "export.json"))["base_model"]["pretrained"]
        return RunFolder(source).config()["model"]["init_args"]["model"]["pretrained"]
    except (RunFolderError, KeyError, TypeError, ValueError):
        raise MemorizationAuditError(f"--base auto: the base model of {source} is not in its config.yaml "
                                     "(model.init_args.model.pretrained) or export.json; name it with --base, or --base none"
                                     ) from None


def generate_set(cfg: AuditConfig, strategy: Strategy, prompts: Sequence[str], resolution: int):
    seeds = [cfg.seed + j for j in range(cfg.n_per_prompt)]
    rows, images = [], []
    for asked, prompt in zip(prompts, strategy.prompts):
        out = strategy.generator.generate([prompt] * len(seeds), seeds=seeds, steps=cfg.steps, guidance=cfg.guidance,
                                          height=resolution, width=resolution, scheduler=strategy.sampler)
        images.append((out.mean(1) * 255).round().clamp(0, 255).to(torch.uint8).numpy())
        rows += [{"prompt": asked, "seed": s, "sampler": strategy.sampler} for s in seeds]
    return strategy.name, pd.DataFrame(rows), np.concatenate(images)


def audit_model(cfg: AuditConfig, space: SimilaritySpace, real: RealSets, feats: dict, name: str, rows: pd.DataFrame,
                images: np.ndarray) -> tuple[pd.DataFrame, dict]:
    gen_feats = space.embed_stream(lambda start, stop: images[start:stop], len(images))
    result = audit(space.nearest(gen_feats, feats["train"]), None, real.train["subject_id"].tolist(), cfg.quantile,
                   seed=cfg.seed, calibration=feats["calibration"], n_train=len(real.train))
    held_index, held_sim = space.nearest(gen_feats, feats["heldout"])
    table = rows.reset_index(drop=True).assign(
        model=name, nearest_train=real.train["dicom_id"].to_numpy()[result["nearest_train"]],
        train_similarity=result["similarity"], nearest_heldout=real.heldout["dicom_id"].to_numpy()[held_index],
        heldout_similarity=held_sim, copy=result["is_copy"])
    sampler = rows["sampler"].iloc[0] if "sampler" in rows.columns and len(rows) else None  # None: --generated images
    summary = {"model": name, "sampler": sampler, "n": len(images), **{f"copy_{k}": v for k, v in result["copy_rate"].items()},
               "mean_train_similarity": float(result["similarity"].mean()),
               "train_images_copied": int((result["copies_per_train_image"] > 0).sum()),
               "subjects_copied": result["subjects_copied"]["copied"], "subjects": result["subjects_copied"]["of"]}
    if space.has_features:  # feature spaces compare by cosine: the nearest similarities are MiFID's
        summary.update(fid_and_mifid(gen_feats, feats["train"], result["similarity"]))
    return table, summary


def fid_and_mifid(generated: torch.Tensor, train: torch.Tensor, nearest_cosine: np.ndarray, epsilon: float = 0.1) -> dict:
    """FID of generated against training features, and MiFID: FID divided by the memorization distance ``d`` (mean over
    generated images of 1 − the largest cosine similarity to a training image, ``nearest_cosine``) when ``d < epsilon``
    (Bai et al. 2021; torchmetrics' ``MemorizationInformedFrechetInceptionDistance`` does the same on Inception
    features only)."""
    if len(generated) < 2 or len(train) < 2:
        return {"fid": float("nan"), "mifid": float("nan"), "memorization_distance": float("nan")}
    fid = frechet_distance(train.double(), generated.double())
    distance = float(1 - np.asarray(nearest_cosine).mean())
    return {"fid": fid, "mifid": fid / (distance + 1e-15) if distance < epsilon else fid, "memorization_distance": distance}


def training_groups(cfg: AuditConfig) -> list[list[str]]:
    """``--runs`` grouped by training set (same root and images), in order: each group is audited against its own."""
    if cfg.generated or cfg.train_data or len(cfg.runs) == 1:
        return [list(cfg.runs)]
    groups: dict = {}
    for run in cfg.runs:
        data = read_training_data(replace(cfg, runs=[run]))
        groups.setdefault((str(data["root"]), tuple(sorted(r["dicom_id"] for r in data["train"]))), []).append(run)
    return list(groups.values())


def run_audit(cfg: AuditConfig, log=print) -> Path:
    """Audit ``cfg.runs``; runs with different training sets each into ``--out/<first run's name>/``, with an index."""
    try:  # before any work: an --out that is a file would otherwise fail when the results are written
        writable_folder(cfg.out, "--out")
    except UserError as err:
        raise MemorizationAuditError(str(err)) from None
    groups = training_groups(cfg)
    if len(groups) == 1:
        return audit_training_set(cfg, log)[0]
    out, rows = Path(cfg.out), []
    for group in groups:
        sub = replace(cfg, runs=group, out=str(out / Path(group[0]).name))
        log(f"training set of {', '.join(Path(r).name for r in group)}: audit into {sub.out}")
        rows += [{"training set of": Path(group[0]).name, **summary} for summary in audit_training_set(sub, log)[1]]
    if rows:
        summary_csv(rows, out)
        lines = ["# Memorization audit: one audit per training set", "",
                 "The runs trained on different images; each was audited against its own training images (its folder "
                 "holds the report, the threshold and the figures).", "",
                 "| training set of | model | copies | copy rate [95% CI] | mean nearest-training similarity |",
                 "|---|---|---|---|---|"]
        lines += [f"| [{r['training set of']}]({r['training set of']}/memorization.md) | {r['model']} | {r['copy_copies']}/"
                  f"{r['n']} | {100 * r['copy_rate']:.1f}% [{100 * r['copy_ci_low']:.1f}, {100 * r['copy_ci_high']:.1f}] | "
                  f"{r['mean_train_similarity']:.3f} |" for r in rows]
        (out / "memorization.md").write_text("\n".join(lines) + "\n")
        log(f"wrote {out / 'memorization.md'}")
    return out


def summary_csv(rows: list[dict], out: Path) -> None:
    """``summary.csv``: one row per model and training set (copy rate with its interval, mean similarity, FID/MiFID)."""
    keep = ["training set of", "model", "sampler", "n", "copy_copies", "copy_rate", "copy_ci_low", "copy_ci_high",
            "mean_train_similarity", "train_images_copied", "fid", "mifid"]
    table = pd.DataFrame(rows)
    table[[c for c in keep if c in table.columns]].to_csv(out / "summary.csv", index=False)


def audit_training_set(cfg: AuditConfig, log=print) -> tuple[Path, list[dict]]:
    """The audit of runs sharing one training set: ``(output folder, one summary per model)``."""
    started = time.time()
    out = Path(cfg.out)
    if (out / ("calibration.json" if cfg.calibrate_only else "memorization.csv")).exists() and not cfg.overwrite:
        raise MemorizationAuditError(f"--out {out}: holds an earlier audit; pass --overwrite or give another folder")
    real = real_sets(cfg)
    space = similarity_space(cfg)
    feats = reference_features(space, real, cfg.quantile, cfg.seed)
    calibration = feats["calibration"]
    log(f"training images: {len(real.train)}; held-out images (test split, other patients): {len(real.heldout)}; "
        f"features: {space.name}; copy threshold {calibration.threshold:.4f} (false-positive rate on held-out images "
        f"{100 * calibration.false_positive_rate:.1f}%)")
    if cfg.calibrate_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps({**calibration.as_dict(), "features": space.name,
                                                          "runs": cfg.runs}, indent=2) + "\n")
        log(f"wrote {out / 'calibration.json'} (--calibrate_only: nothing generated)")
        return out, []
    tables, summaries, pools = [], [], {}
    for name, rows, images in generated_sets(cfg, real):
        table, summary = audit_model(cfg, space, real, feats, name, rows, images)
        tables.append(table), summaries.append(summary)
        pools[name] = images
        log(f"{name}: {summary['copy_copies']}/{summary['n']} copies ({100 * summary['copy_rate']:.1f}%)")
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(out / "memorization.csv", index=False)
    from evaluation.memorization_report import pairs_figure, report_markdown, similarity_histogram

    train_self, sample = train_self_nearest(space, feats["train"], cfg.seed)
    similarity_histogram(table, feats["h2t"][1], train_self, calibration.threshold, out / "similarities.png",
                         train_of=sample["of"])
    by_id = real.train.set_index("dicom_id")
    pairs_figure(table, pools, lambda ids: real.read(by_id.loc[list(ids)].reset_index()), out / "closest_pairs.png")
    (out / "memorization.md").write_text(report_markdown(cfg, space.name, real, calibration, summaries))
    summary_csv([{"training set of": Path(cfg.train_data or cfg.runs[0]).name, **s} for s in summaries], out)
    settings = asdict(cfg)
    inputs = {"runs": cfg.runs, "samplers": {s["model"]: s["sampler"] for s in summaries},
              "training_images": len(real.train), "heldout_images": len(real.heldout),
              "skipped_images": real.skipped,
              "calibration": calibration.as_dict(), "train_self_sample": sample, "seconds": round(time.time() - started, 1)}
    provenance.write(out / "provenance.json", provenance.record("study/memorization", settings, inputs, packages=STUDY_PACKAGES))
    log(f"wrote {out / 'memorization.md'}")
    return out, summaries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py memorization", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run folders (their data.json names the training images) or exports")
    p.add_argument("--out", required=True, help="output folder (stays local: it shows training images)")
    p.add_argument("--train_data", default=None, help="the run folder (or its data.json) whose training images to check "
                   "against (default: the first --runs; needed when that is an export)")
    p.add_argument("--base", default="auto", help="base model as a control: 'auto' (the first run's), a preset/folder/id, or 'none'")
    p.add_argument("--generated", default=None, help="a folder of generated images to audit instead of generating")
    p.add_argument("--n_per_prompt", type=at_least(1), default=16)
    p.add_argument("--steps", type=at_least(1), default=25)
    p.add_argument("--guidance", type=at_least(0, float), default=7.5, help="classifier-free guidance, the same for "
                   "every model (default 7.5; SanaPipeline's own is 4.5)")
    p.add_argument("--scheduler", default=None, choices=("pndm", "ddim", "euler", "dpm"), help="one sampler for every "
                   "model (default: each model's own: ddim for Stable Diffusion, euler for Sana; Sana refuses pndm, ddim)")
    p.add_argument("--seed", type=study_seed, default=0, help="image j of a prompt has seed seed + j; also the "
                   "held-out sample and the calibration's halves (0 to 2**32-1)")
    p.add_argument("--features", default="classifier", choices=["classifier", "pixel", "image_encoder"])
    p.add_argument("--classifier", default="densenet121-res224-all", help="xrv weights name, or tiny-phantom (demo)")
    p.add_argument("--image_encoder", default=None, help="with --features image_encoder: a Hugging Face image encoder id "
                   "or folder (CLS embedding), e.g. microsoft/rad-dino or a re-identification network")
    p.add_argument("--xrv_cache_dir", default=None)
    p.add_argument("--quantile", type=fraction, default=0.99, help="copy threshold: this quantile of held-out similarities")
    p.add_argument("--max_heldout", type=at_least(1), default=None, help="at most this many held-out images (default: all)")
    p.add_argument("--heldout_root", default=None, help="a MIMIC-CXR-JPG root whose test split gives the held-out images "
                   "(default: the run's own root); its patients must not be training patients")
    p.add_argument("--calibrate_only", action="store_true", help="only calibrate the copy threshold and write "
                   "calibration.json (e.g. for MemorizationMonitor's threshold); nothing is generated")
    p.add_argument("--on_bad_image", default="fail", choices=("fail", "skip"), help="an unreadable training, held-out "
                   "or --generated image: stop, naming it, or leave it out with a warning (listed in provenance.json)")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = AuditConfig(**vars(build_parser().parse_args(argv)))
    try:
        run_audit(cfg)
    except (MemorizationAuditError, SourceError, MetricInputError, ImageSelectionError) as err:
        print(f"evaluate.py memorization: error: {err}", file=sys.stderr)
        return 2
    return 0
