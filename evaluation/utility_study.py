"""Are synthetic images useful to a classifier? ``python evaluate.py utility --runs RUN --mimic_root ROOT --out DIR``.

For each source (the base model with ``--base``, then every run or export) a **synthetic set** mirrors the real
training set: one image per real training image (frontal ``train``-split images of ``--findings``, and "No Finding"
images as negatives), prompted from that image's labels (``--prompt_source template``: the prompt of its first
positive finding) or its report's impression (``impression``), carrying the same labels; seed ``seed + i`` for image
``i``. Each image is generated at the model's native size (SD v1.4: 512 px), kept at it, and resized to the
classifier's resolution by the real images' own loader. Images already written to ``--out/synthetic/<source>/`` are
kept, so an interrupted generation resumes; its ``synthetic.json`` records what made them (the generator's weights
fingerprint, sampler, steps, guidance, native size, seed, each image's prompt): images made otherwise are generated
again, with one line saying which setting differs.

Four arms, each trained ``--seeds`` times (Lightning, :class:`lightning_modules.classifier_training.ClassifierTraining`)
and scored on the **real test split**:

* (a) real only, ``--steps`` steps; (b) synthetic only, ``--steps`` steps; (c) real + synthetic mixed, ``--steps``
  steps: a, b and c see the same number of images at the same rate, the **equal budget**;
* (d) synthetic pretraining for ``--steps`` steps, then real fine-tuning for ``--steps`` steps (RoentGen-v2's recipe:
  twice the steps, half of them on real images, stated as such).

Per arm and seed: per-finding and macro AUROC with bootstrap 95% intervals over the test images; per arm the
difference to (a) averaged over seeds with a paired bootstrap interval (the same resampled test images for both arms).
Outputs: ``utility.md``, ``utility.csv`` (arm × seed × finding), ``differences.csv``, ``utility.png``,
``provenance.json``. A finished arm (``arms/<source>/<arm>-seed<k>.npz``: its test probabilities and the settings they
came from) is not trained again; one trained with other settings (budget, ``--init``, classifier, findings, real
images, synthetic images) is trained again, with one line naming them, so the report describes its numbers' settings.

``--init pretrained`` from torchxrayvision weights trained on MIMIC-CXR ("all", "mimic_ch", "mimic_nb") is refused when
the test split scored is MIMIC-CXR's, unless ``--i_know_init_saw_mimic_test``: xrv split MIMIC-CXR at random, not by
its official split, so those weights very likely saw test-split patients.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
from contextlib import contextmanager
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from core import plugins, provenance
from core.cache import atomic_write
from core.errors import UserError, writable_folder
from datamodules.mimic_cxr import CHEXPERT_CLASSES, MIMICDataError
from datamodules.prompts import FINDING_PROMPTS
from datamodules.study_images import ImageSelectionError, load_images, select_mimic
from evaluation.sources import (SourceError, Strategy, above, at_least, choose_samplers, generator_fingerprint, load_strategies,
                                study_device, study_sampler, study_seed)
from metrics.classifiers import classifier_weights_file
from metrics.scores import auroc

ARMS = {"a": "real only", "b": "synthetic only", "c": "real + synthetic (mixed)", "d": "synthetic, then real"}
PACKAGES = ("torch", "lightning", "diffusers", "torchxrayvision", "numpy")
# The marker synthetic.phantoms.write_phantom_mimic writes into a phantom root (named, not imported: production code
# does not import the demo package). Every other --mimic_root is taken to be MIMIC-CXR-JPG.
PHANTOM_MARKER = "PHANTOMS.json"
SYNTHETIC_RECORD = "synthetic.json"  # in each synthetic folder: what made its images
# A synthetic set's generator settings: when one differs, every kept image is made again (each image's prompt is
# compared on its own: a changed real training set regenerates only the images whose prompt changed)
# the sampler of a Stable Diffusion model when no --scheduler is given (as before other families existed: kept synthetic
# sets stay valid); a model of another family samples with its own (Sana: euler)
SD_SAMPLER = "ddim"
GENERATOR_SETTINGS = ("generator", "gen_steps", "guidance", "scheduler", "native_px", "seed", "prompt_source")
# Settings recorded as digests, named in words when they differ (the others are options: "--steps 5, now 7")
DIGESTS = {"generator": "model weights (fingerprint)", "native_px": "native size",
           "prompts": "prompts",
           "training_images": "real training images", "test_images": "real test images"}


class UtilityStudyError(UserError, ValueError):
    """Bad input to the utility study: the message names the option, class or folder."""


@dataclass
class UtilityConfig:
    mimic_root: str
    out: str
    runs: list[str] = field(default_factory=list)
    base: Optional[str] = None
    findings: list[str] = field(default_factory=lambda: ["Pleural Effusion"])
    classifier: str = "densenet121-res224-all"
    init: str = "scratch"
    xrv_cache_dir: Optional[str] = None
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 1e-3
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    prompt_source: str = "template"
    reports_root: Optional[str] = None
    resolution: Optional[int] = None
    gen_steps: int = 25
    guidance: float = 7.5  # one guidance for every model, Sana's included (SanaPipeline's own default: 4.5)
    scheduler: Optional[str] = None  # None: each model's own (SD_SAMPLER for Stable Diffusion; sources.study_sampler)
    max_real: Optional[int] = None
    n_boot: int = 200
    seed: int = 0
    device: str = "auto"
    on_bad_image: str = "fail"
    i_know_init_saw_mimic_test: bool = False

    def validate(self) -> None:
        unknown = [f for f in self.findings if f not in CHEXPERT_CLASSES or f == "No Finding"]
        if unknown:
            raise UtilityStudyError(f"--findings: {unknown} are not CheXpert findings (No Finding images are the negatives)")
        if not self.runs and not self.base:
            raise UtilityStudyError("nothing to make synthetic images with: give --runs and/or --base")
        if self.prompt_source not in ("template", "impression"):
            raise UtilityStudyError(f"--prompt_source {self.prompt_source!r}: expected template or impression")
        leak = init_saw_test(self)
        if leak and not self.i_know_init_saw_mimic_test:
            raise UtilityStudyError(f"{leak}; use --init scratch, or pass --i_know_init_saw_mimic_test to run anyway")


def init_saw_test(cfg: UtilityConfig) -> Optional[str]:
    """Why ``--init pretrained`` very likely starts from weights that saw the test patients, or None.

    torchxrayvision's weights file names list their training sets (``nih-pc-chex-mimic_ch-...-densenet121-...pt``);
    those with MIMIC-CXR trained on a random 80% of its images (xrv's ``scripts/train_utils.py``: ``random_split``),
    not on its official train split. Only xrv weights are judged (a registered classifier, such as the phantom one, is
    not), and only when the test split scored is MIMIC-CXR's (any root but the phantoms').
    """
    if cfg.init != "pretrained" or cfg.classifier in plugins.names(plugins.CLASSIFIERS):
        return None
    weights = classifier_weights_file(cfg.classifier, cfg.xrv_cache_dir)
    if weights is None or "mimic" not in Path(weights).name or (Path(cfg.mimic_root) / PHANTOM_MARKER).is_file():
        return None
    return (f"--init pretrained: torchxrayvision's weights {Path(weights).name} (--classifier {cfg.classifier}) were "
            f"trained on MIMIC-CXR split at random, not by its official split, so very likely on patients of the "
            f"MIMIC-CXR test split scored here ({cfg.mimic_root}): the AUROCs would be optimistic")


@dataclass
class RealData:
    train: pd.DataFrame
    train_images: np.ndarray
    train_labels: np.ndarray  # [N, F] in {0, 1}
    test_images: np.ndarray
    test_labels: np.ndarray
    test_ids: list[str] = field(default_factory=list)  # the test images' dicom_ids, in order
    skipped: list[dict] = field(default_factory=list)  # unreadable images left out (--on_bad_image skip)


def labels_of(records: pd.DataFrame, findings: Sequence[str]) -> np.ndarray:
    """1 where a finding is positive (1.0), else 0 (negative, blank, and uncertain -1.0)."""
    return np.stack([(records[f].to_numpy() == 1.0) for f in findings], axis=1).astype(np.float32)


def real_data(cfg: UtilityConfig, resolution: int) -> RealData:
    try:
        train = select_mimic(cfg.mimic_root, None, cfg.seed, "train")
        test = select_mimic(cfg.mimic_root, None, cfg.seed, "test")
    except (MIMICDataError, ImageSelectionError) as err:
        raise UtilityStudyError(str(err)) from None
    train = train[(train[[*cfg.findings, "No Finding"]] == 1.0).any(axis=1)].reset_index(drop=True)
    absent = [f for f in cfg.findings if not (train[f] == 1.0).any()]
    if absent:
        raise UtilityStudyError(f"{cfg.mimic_root}: the real training set (frontal train-split images) has no image "
                                f"positive for {absent}; every finding needs positives to train and to mirror")
    if cfg.max_real is not None and len(train) > cfg.max_real:
        train = train.sample(n=cfg.max_real, random_state=cfg.seed).sort_values("dicom_id").reset_index(drop=True)
    try:  # an unreadable image: one line naming it (and --on_bad_image skip)
        train, train_images, skipped = load_images(train, resolution, cfg.on_bad_image)
        test, test_images, skipped_test = load_images(test, resolution, cfg.on_bad_image)
    except ImageSelectionError as err:
        raise UtilityStudyError(str(err)) from None
    return RealData(train, train_images, labels_of(train, cfg.findings), test_images, labels_of(test, cfg.findings),
                    test["dicom_id"].tolist(), skipped + skipped_test)


def prompts_for(cfg: UtilityConfig, real: RealData) -> list[str]:
    """One prompt per real training image: its first positive finding's template (or No Finding's), or its impression."""
    if cfg.prompt_source == "impression":
        from datamodules.reports import extract_impression, report_path

        root, prompts = Path(cfg.reports_root or cfg.mimic_root), []
        for r in real.train.itertuples():
            path = report_path(root, r.subject_id, r.study_id)
            section, text = extract_impression(path.read_text(encoding="utf-8")) if path.is_file() else (None, None)
            if section != "impression":
                raise UtilityStudyError(f"{path}: no IMPRESSION section for training image {r.dicom_id}; use "
                                        "--prompt_source template or give --reports_root")
            prompts.append(text)
        return prompts
    first = [next((f for f, y in zip(cfg.findings, row) if y), "No Finding") for row in real.train_labels]
    return [FINDING_PROMPTS[f] for f in first]


def digest(values) -> str:
    """16 hex digits of the SHA-1 of ``values`` as JSON: what a record keeps of a long list."""
    return hashlib.sha1(json.dumps(values).encode()).hexdigest()[:16]


def changes(kept: Optional[dict], now: dict) -> list[str]:
    """The settings of ``now`` that ``kept`` (a cached output's record) differs in, in words; ``kept`` None: no record."""
    if kept is None:
        return ["no record of its settings (an earlier version of the study)"]
    out = []
    for key, value in now.items():
        before = kept.get(key)
        if isinstance(value, dict):
            out += [f"synthetic images of {c}" for c in changes(before if isinstance(before, dict) else {}, value)]
        elif before != value:
            out.append(f"other {DIGESTS[key]}" if key in DIGESTS else f"--{key} {before}, now {value}")
    return out


def synthetic_record(cfg: UtilityConfig, strategy: Strategy, asked: Sequence[str]) -> dict:
    """What a synthetic set is made with: the generator's weights fingerprint, its sampler settings and native size, the
    data seed (image ``i`` has seed ``seed + i``), and each image's prompt (a digest each); ``source`` only informs."""
    return {"generator": generator_fingerprint(strategy.generator), "gen_steps": cfg.gen_steps, "guidance": cfg.guidance,
            "scheduler": strategy.sampler or study_sampler(strategy.generator, cfg.scheduler, SD_SAMPLER),
            "native_px": strategy.generator.native_size, "seed": cfg.seed,
            "prompt_source": cfg.prompt_source, "source": strategy.source, "prompts": [digest(p) for p in asked]}


def stale_images(folder: Path, record: dict, n: int, name: str, log) -> list[Path]:
    """The images in ``folder`` not made as ``record`` says: all of them when a generator setting differs, else those
    whose prompt differs or that are not among the ``n`` wanted; unreadable ones (damaged outside the study: it writes
    each image whole). One line says why. Images without a record are refused: nothing says what made them."""
    from PIL import Image

    present = {int(p.stem): p for p in folder.glob("*.png") if p.stem.isdigit()}
    try:
        kept = json.loads((folder / SYNTHETIC_RECORD).read_text())
    except FileNotFoundError:
        if present:
            raise UtilityStudyError(f"{folder}: {len(present)} synthetic images without {SYNTHETIC_RECORD}, the record of "
                                    "what made them (an earlier version of the study?); remove the folder to generate "
                                    "them again") from None
        return []
    except ValueError:  # the record is written whole, so only damaged from outside: trust none of its images
        kept = None
    differ = changes(kept, {k: record[k] for k in GENERATOR_SETTINGS})
    if differ and present:
        log(f"{name}: the {len(present)} synthetic images in {folder} were made with {'; '.join(differ)}: generating them again")
        return list(present.values())
    prompts = (kept or {}).get("prompts", [])
    stale = [p for i, p in present.items() if i >= n or i >= len(prompts) or prompts[i] != record["prompts"][i]]
    if stale:
        log(f"{name}: {len(stale)} of the {len(present)} synthetic images in {folder} were made for other prompts (the "
            "real training set changed: --max_real, --findings, --seed, --mimic_root): generating them again")
    unreadable = []
    for p in set(present.values()) - set(stale):
        try:
            with Image.open(p) as im:
                im.verify()
        except (OSError, SyntaxError) as err:  # PIL's verify raises SyntaxError for a broken PNG chunk
            unreadable.append(p)
            log(f"{name}: {p} is unreadable ({err}): generating it again")
    return stale + unreadable


def synthetic_set(cfg: UtilityConfig, strategy: Strategy, prompts: Sequence[str], resolution: int, log,
                  device="cpu") -> tuple[np.ndarray, dict]:
    """The source's mirror of the real training set, generated where missing (``--out/synthetic/<source>/NNNNNN.png``)
    on ``device``, and the record of what made it (:func:`synthetic_record`, kept in the folder's ``synthetic.json``).

    Generated and kept at the model's native size (the U-Net's sample_size x the VAE factor: at the classifier's 224 px
    SD v1.4 would sample 28-px latents it never saw), then decoded and resized to ``resolution`` by ``load_images``,
    the very loader of the real images (shorter side, Lanczos, centre crop).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    native = strategy.generator.native_size
    folder = Path(cfg.out) / "synthetic" / strategy.name.replace("/", "_").replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    asked = [strategy.generator.paper_prompt(p) for p in prompts]
    record = synthetic_record(cfg, strategy, asked)  # on the CPU the weights are loaded to: the same fingerprint anywhere
    for path in stale_images(folder, record, len(prompts), strategy.name, log):
        path.unlink()
    atomic_write(folder / SYNTHETIC_RECORD, json.dumps(record).encode())  # before any image it describes
    paths = [folder / f"{i:06d}.png" for i in range(len(prompts))]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    log(f"{strategy.name}: {len(prompts) - len(missing)} synthetic images kept, {len(missing)} to generate in {folder}")
    if missing:
        strategy.generator.to(device)
    for s in tqdm(range(0, len(missing), cfg.batch_size), desc=f"{strategy.name}: synthetic set", disable=not missing):
        chunk = missing[s:s + cfg.batch_size]
        images = strategy.generator.generate([asked[i] for i in chunk], seeds=[cfg.seed + i for i in chunk],
                                             steps=cfg.gen_steps, guidance=cfg.guidance, scheduler=strategy.sampler,
                                             height=native, width=native)
        for i, image in zip(chunk, images.mean(1)):
            png = io.BytesIO()  # written whole or not at all: a kill mid-save leaves no truncated image to keep
            Image.fromarray((image.numpy() * 255).round().clip(0, 255).astype(np.uint8)).save(png, format="PNG")
            atomic_write(paths[i], png.getvalue())
    strategy.generator.to("cpu")
    sizes = {}
    for p in paths:
        with Image.open(p) as im:
            sizes.setdefault(im.size, p)
    if set(sizes) != {(native, native)}:
        other = next(p for s, p in sizes.items() if s != (native, native))
        raise UtilityStudyError(f"{other}: not the model's native {native} px (not written by the study?); remove the "
                                "folder to regenerate")
    try:
        _, images, _ = load_images(pd.DataFrame({"image_id": [p.name for p in paths], "path": [str(p) for p in paths]}),
                                   resolution)
    except ImageSelectionError as err:
        raise UtilityStudyError(f"{folder}: {err}") from None
    return images, {k: v for k, v in record.items() if k != "prompts"} | {"prompts": digest(record["prompts"])}


def train_arm(cfg: UtilityConfig, arm: str, seed: int, real: RealData, synthetic: np.ndarray, device) -> np.ndarray:
    """Train one arm with one seed; its probabilities ``[N_test, F]`` on the real test split."""
    with _quiet_lightning():  # no "GPU available" lines for every arm
        return _fit_arm(cfg, arm, seed, real, synthetic, device)


@contextmanager
def _quiet_lightning():
    """Lightning's INFO lines off while the arms train, the caller's logging level back afterwards."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _fit_arm(cfg: UtilityConfig, arm: str, seed: int, real: RealData, synthetic: np.ndarray, device) -> np.ndarray:
    from lightning.pytorch import Trainer, seed_everything

    from datamodules.labelled_images import LabelledImages
    from lightning_modules.classifier_training import ClassifierTraining

    seed_everything(seed, verbose=False)
    model = ClassifierTraining(cfg.classifier, cfg.findings, cfg.init, cfg.learning_rate, xrv_cache_dir=cfg.xrv_cache_dir,
                               seed=seed)
    sets = {"a": [(real.train_images, real.train_labels)], "b": [(synthetic, real.train_labels)],
            "c": [(np.concatenate([real.train_images, synthetic]), np.concatenate([real.train_labels, real.train_labels]))],
            "d": [(synthetic, real.train_labels), (real.train_images, real.train_labels)]}[arm]
    for images, labels in sets:
        trainer = Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=cfg.steps,
                          logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                          enable_progress_bar=sys.stderr.isatty())
        trainer.fit(model, LabelledImages(images, labels, cfg.steps, cfg.batch_size, seed))
    return model.to(device).probabilities(real.test_images)


def score(probabilities: np.ndarray, labels: np.ndarray, findings: Sequence[str], idx: Optional[np.ndarray] = None) -> list[float]:
    """Per-finding AUROC (NaN where the test images hold one class only), then the macro (their mean)."""
    idx = np.arange(len(labels)) if idx is None else idx
    values = [auroc(labels[idx, j], probabilities[idx, j]) for j in range(len(findings))]
    return values + [float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")]


def intervals(stat: Callable[[np.ndarray], list[float]], n: int, n_boot: int, seed: int) -> np.ndarray:
    """Percentile 95% intervals ``[2, K]`` of a vector statistic of resampled test images."""
    rng = np.random.default_rng(seed)
    reps = np.array([stat(rng.integers(0, n, n)) for _ in range(max(n_boot, 0))])
    if not len(reps):
        return np.full((2, len(stat(np.arange(n)))), np.nan)
    return np.nanquantile(reps, [0.025, 0.975], axis=0)


def run_utility(cfg: UtilityConfig, log=print) -> Path:
    cfg.validate()
    leak = init_saw_test(cfg)
    if leak:  # the user said they know (--i_know_init_saw_mimic_test); utility.md and provenance.json say it too
        import warnings

        warnings.warn(leak, UserWarning, stacklevel=2)
    started, out = time.time(), Path(cfg.out)
    try:  # before any work: an --out that is a file would otherwise fail at the first image written
        writable_folder(out, "--out")
    except UserError as err:
        raise UtilityStudyError(str(err)) from None
    device = study_device(cfg.device)
    from lightning_modules.classifier_training import ClassifierTraining

    try:
        probe = ClassifierTraining(cfg.classifier, cfg.findings, "pretrained", xrv_cache_dir=cfg.xrv_cache_dir)
    except (ValueError, FileNotFoundError) as err:
        raise UtilityStudyError(f"--classifier {cfg.classifier}: {err}") from None
    resolution = cfg.resolution or int(getattr(probe.net, "resolution", 224))
    real = real_data(cfg, resolution)
    log(f"real: {len(real.train_images)} training images {dict(zip(cfg.findings, real.train_labels.sum(0).astype(int)))}, "
        f"{len(real.test_images)} test images; {resolution} px")
    prompts = prompts_for(cfg, real)
    rows, probabilities, native, made = [], {}, {}, {}
    strategies = load_strategies(cfg.base, cfg.runs, [])
    samplers = choose_samplers(strategies, cfg.scheduler, SD_SAMPLER)  # a sampler a model cannot use: refused here
    for strategy in strategies:
        native[strategy.name] = strategy.generator.native_size
        synthetic, made[strategy.name] = synthetic_set(cfg, strategy, prompts, resolution, log, device)
        for arm in ARMS:
            for seed in cfg.seeds:
                folder = "real" if arm == "a" else strategy.name.replace("/", "_").replace(" ", "_")  # (a) is the same for all
                path = out / "arms" / folder / f"{arm}-seed{seed}.npz"
                settings = arm_record(cfg, arm, real, resolution, made[strategy.name])
                p = kept_arm(path, settings, f"{strategy.name}: arm ({arm}) {ARMS[arm]}, seed {seed}", log)
                if p is None:
                    p = train_arm(cfg, arm, seed, real, synthetic, device)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    buffer = io.BytesIO()
                    np.savez(buffer, probabilities=p, settings=np.array(json.dumps(settings)))
                    atomic_write(path, buffer.getvalue())  # whole or not at all: a killed save is not kept
                probabilities[(strategy.name, arm, seed)] = p
                rows += score_rows(cfg, strategy.name, arm, seed, p, real.test_labels)
    from evaluation.utility_report import differences, write_outputs

    table, diffs = pd.DataFrame(rows), differences(cfg, probabilities, real.test_labels)
    write_outputs(cfg, out, table, diffs, real, resolution, native, samplers)
    provenance.write(out / "provenance.json", provenance.record(
        "study/utility", asdict(cfg), {"training_images": real.train["dicom_id"].tolist(), "test_images": len(real.test_images),
                                       "generated_px": native, "samplers": samplers, "synthetic": made, "init_saw_test": leak,
                                       "skipped_images": real.skipped,
                                       "seconds": round(time.time() - started, 1)}, packages=PACKAGES))
    log(f"wrote {out / 'utility.md'}")
    return out


def arm_record(cfg: UtilityConfig, arm: str, real: RealData, resolution: int, synthetic: dict) -> dict:
    """What an arm's test probabilities depend on (its seed is in its file name): the budget, the classifier and its
    start, the findings, the real training and test images, and for arms b, c and d the synthetic set's record."""
    record = {"steps": cfg.steps, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "init": cfg.init,
              "classifier": cfg.classifier, "findings": list(cfg.findings), "max_real": cfg.max_real,
              "resolution": resolution, "training_images": digest(real.train["dicom_id"].tolist()),
              "test_images": digest(real.test_ids)}
    if arm != "a":
        record["synthetic"] = {k: v for k, v in synthetic.items() if k != "source"}
    return json.loads(json.dumps(record))  # as it reads back


def kept_arm(path: Path, settings: dict, what: str, log) -> Optional[np.ndarray]:
    """The probabilities a finished arm kept at ``path`` when they came from ``settings``; else None, and one line
    saying it is trained (again, and why)."""
    if not path.is_file():
        log(what)
        return None
    try:
        with np.load(path) as kept:
            p = kept["probabilities"]
            recorded = json.loads(str(kept["settings"])) if "settings" in kept.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log(f"{what}: {path} is unreadable ({type(err).__name__}): training it again")
        return None
    differ = changes(recorded, settings)
    if differ:
        log(f"{what}: the kept one was trained with {'; '.join(differ)}: training it again")
        return None
    return p


def score_rows(cfg: UtilityConfig, source: str, arm: str, seed: int, p: np.ndarray, labels: np.ndarray) -> list[dict]:
    value = score(p, labels, cfg.findings)
    lo, hi = intervals(lambda idx: score(p, labels, cfg.findings, idx), len(labels), cfg.n_boot, seed)
    return [{"source": source, "arm": arm, "arm_name": ARMS[arm], "seed": seed, "finding": f, "auroc": v, "ci_low": a,
             "ci_high": b, "steps": cfg.steps * (2 if arm == "d" else 1), "batch_size": cfg.batch_size,
             "learning_rate": cfg.learning_rate} for f, v, a, b in zip([*cfg.findings, "macro"], value, lo, hi)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py utility", description=__doc__.split("\n")[0])
    p.add_argument("--mimic_root", required=True, help="MIMIC-CXR-JPG root: the real train split (mirrored) and test split (scored)")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", nargs="*", default=[], help="run or export folders whose synthetic images to test")
    p.add_argument("--base", default=None, help="also the base model (hub id, folder or preset) as a source")
    p.add_argument("--findings", nargs="+", default=["Pleural Effusion"])
    p.add_argument("--classifier", default="densenet121-res224-all", help="the architecture: an xrv weights name "
                   "(DenseNet-121) or tiny-phantom (demo)")
    p.add_argument("--init", default="scratch", choices=("scratch", "pretrained"), help="re-initialised (seeded) or from its weights")
    p.add_argument("--i_know_init_saw_mimic_test", action="store_true", help="run --init pretrained from xrv weights "
                   "trained on MIMIC-CXR (all, mimic_ch, mimic_nb) although the test split scored is MIMIC-CXR's")
    p.add_argument("--xrv_cache_dir", default=None)
    p.add_argument("--steps", type=at_least(1), default=500, help="optimizer steps per arm (arm d: this many twice)")
    p.add_argument("--batch_size", type=at_least(1), default=16)
    p.add_argument("--learning_rate", type=above(0), default=1e-3)
    p.add_argument("--seeds", type=study_seed, nargs="+", default=[0, 1, 2], help="one replicate of every arm per seed "
                   "(distinct, 0 to 2**32-1)")
    p.add_argument("--prompt_source", default="template", choices=("template", "impression"))
    p.add_argument("--reports_root", default=None, help="with --prompt_source impression (default: --mimic_root)")
    p.add_argument("--resolution", type=at_least(1), default=None, help="the classifier's input, default its own (224; "
                   "tiny-phantom 64); synthetic images are generated at the model's native size and resized to it as "
                   "the real ones are")
    p.add_argument("--gen_steps", type=at_least(1), default=25)
    p.add_argument("--guidance", type=at_least(0, float), default=7.5)
    p.add_argument("--scheduler", default=None, choices=("pndm", "ddim", "euler", "dpm"), help="one sampler for every "
                   f"model (default: each model's own: {SD_SAMPLER} for Stable Diffusion, the base's for other families: "
                   "Sana euler; Sana refuses pndm and ddim)")
    p.add_argument("--max_real", type=at_least(1), default=None, help="at most this many real training images (seeded sample)")
    p.add_argument("--n_boot", type=at_least(1), default=200, help="bootstrap resamples of the test images per interval")
    p.add_argument("--seed", type=study_seed, default=0, help="data seed: the --max_real sample, the synthetic images' "
                   "seeds (seed + i), the intervals")
    p.add_argument("--on_bad_image", default="fail", choices=("fail", "skip"), help="an unreadable real image: stop, "
                   "naming it, or leave it out with a warning (listed in provenance.json)")
    p.add_argument("--device", default="auto")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:  # the same seed twice is one replicate counted twice: the mean over seeds would weigh it double
        parser.error(f"argument --seeds: {repeated} given more than once; each seed is one replicate, give distinct seeds")
    cfg = UtilityConfig(**vars(args))
    try:
        run_utility(cfg)
    except (UtilityStudyError, SourceError) as err:
        print(f"evaluate.py utility: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
