"""The text-encoder study (paper section 2.4, Tables 2 and 3): ``python evaluate.py text-encoders``.

Which text encoder keeps the clinical content of a radiology report? Each encoder turns the impression
section of every report into one vector, by up to four extractions:

=========  ===========================================================================================
cls        the last hidden state at the first position ([CLS] for BERT, the start token for CLIP)
mean       the mean of the last hidden states over the real tokens (attention mask; padding excluded)
pooler     BERT's ``pooler_output`` (tanh(Linear(CLS))), or CLIP's pooled output: the end-of-text
           state after the final layer norm
specific   the model's own sentence embedding where it has one: CXR-BERT-specialized's projected,
           L2-normalised [CLS] (``get_projected_text_embeddings``)
=========  ===========================================================================================

An extraction a model does not have is reported as ``None`` with the reason, never faked. In particular
a BERT checkpoint saved as a masked-LM model (RadBERT, CXR-BERT-general, CXR-BERT-specialized) carries
no pooler weights: transformers would draw that layer at random, so ``pooler`` is ``None`` for them.

Reports are scored by CheXpert@k (:mod:`metrics.chexpert_at_k`, which documents our reading of the
paper's formula and the tie rule), against the paper's bag-of-words baseline (intersection over union of
word sets). The sample is class-balanced: ``n_per_class`` reports positive for each of the 14 CheXpert
classes, drawn with a seed, rarest class first and without replacement, so that no report is drawn for
two classes. Each sampled report carries the class it was drawn for.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from datamodules.mimic_cxr import CHEXPERT_CLASSES, CHEXPERT_CSV
from datamodules.report_corpus import UNCERTAIN, ReportCorpusError, load_corpus, positive_matrix, sample_per_class
from core import plugins, provenance
from metrics.chexpert_at_k import (DEFAULT_MAX_CHUNK_ELEMENTS, MODES, CosineSimilarity, TokenIoUSimilarity,
                                      chexpert_at_k, class_matrices, is_degenerate)
from core.errors import UserError

EXTRACTIONS = ("cls", "mean", "pooler", "specific")
EXTRACTION_TITLES = {"cls": "CLS hidden state", "mean": "Mean hidden states", "pooler": "Pooler output", "specific": "Model specific"}
BASELINE = "Base"
STUDY_PACKAGES = ("torch", "transformers", "numpy", "pandas", "scipy", "matplotlib")


@dataclass(frozen=True)
class EncoderEntry:
    key: str  # registry key or the source as given
    name: str  # row name in Table 2
    short: str  # column name in Table 3
    source: str  # hub id, folder or preset


# The paper's seven encoders (ids in docs/formats.md §6), in its table order.
REGISTRY: dict[str, EncoderEntry] = {
    e.key: e
    for e in (
        EncoderEntry("pubmedbert", "PubMedBERT", "Pub.", "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"),
        EncoderEntry("clinicalbert", "ClinicalBERT", "Clin.", "emilyalsentzer/Bio_ClinicalBERT"),
        EncoderEntry("sapbert", "SapBERT", "Sap.", "cambridgeltl/SapBERT-from-PubMedBERT-fulltext"),
        EncoderEntry("radbert", "RadBERT", "Rad.", "StanfordAIMI/RadBERT"),
        EncoderEntry("cxr-bert-general", "CXRBERTgeneral", "gen.", "microsoft/BiomedVLP-CXR-BERT-general"),
        EncoderEntry("cxr-bert-specialized", "CXRBERTspecialized", "spe.", "microsoft/BiomedVLP-CXR-BERT-specialized"),
        EncoderEntry("clip", "ClipTextEncoder", "Clip.", "openai/clip-vit-large-patch14"),
    )
}
PAPER_ENCODERS = tuple(REGISTRY)


def offline_presets() -> dict[str, str]:
    """Encoders that need no download (plugins): domain-encoder presets (BERT) and SD presets (their CLIP); the suite's
    own have random or phantom-trained weights and exercise every code path."""
    from models.stable_diffusion import get_preset

    return {**{name: "BERT" for name in plugins.names(plugins.DOMAIN_ENCODERS)},
            **{name: "CLIP (SD preset)" for name in plugins.names(plugins.STABLE_DIFFUSION)
               if get_preset(name).family == "stable-diffusion"}}


def base_family_of(source: str) -> Optional[str]:
    """The family of a base that ``source`` names (a preset, or a folder with ``model_index.json``), else None."""
    from models.families import family_of_pipeline
    from models.stable_diffusion import get_preset, preset_names

    if source in preset_names():
        return get_preset(source).family
    index = Path(source).expanduser() / "model_index.json"
    if index.is_file():
        try:
            return family_of_pipeline(str(json.loads(index.read_text()).get("_class_name", "")))
        except (OSError, ValueError, AttributeError):
            return None
    return None


def refuse_other_families(entry: EncoderEntry) -> None:
    """The study compares CLIP's and BERT's extractions (CLS, mean, pooler, model-specific); a base of another family
    (Sana: Gemma-2, a decoder-only language model without a CLS token or pooler) is refused in one line."""
    family = base_family_of(entry.source)
    if family not in (None, "stable-diffusion"):
        raise TextEncoderStudyError(
            f"encoder {entry.key!r}: a {family} base; its text encoder (Gemma-2 for Sana) is a decoder-only language model "
            "without a CLS token, pooler or sentence embedding, and the study of such an encoder is not implemented (it "
            "compares CLIP and BERT encoders; give a Stable Diffusion base for its CLIP)")


class TextEncoderStudyError(UserError, ValueError):
    """Bad input to the text-encoder study: the message names the file, option or value."""


# ============================================================================================ encoders
class StudyEncoder:
    """One text encoder with its tokenizer, giving every extraction it has from one forward pass."""

    def __init__(self, entry: EncoderEntry, model: torch.nn.Module, tokenizer, kind: str, unavailable: dict[str, str],
                 max_length: int):
        self.entry = entry
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.kind = kind  # "bert", "cxr-bert" or "clip"
        self.unavailable = unavailable  # extraction -> reason
        self.max_length = max_length

    @property
    def extractions(self) -> tuple[str, ...]:
        return tuple(e for e in EXTRACTIONS if e not in self.unavailable)

    def _forward(self, batch: dict[str, torch.Tensor], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        if self.kind == "cxr-bert":
            out = self.model(**batch, output_cls_projected_embedding="specific" in wanted)
        else:
            out = self.model(**batch, return_dict=True)
        states = out.last_hidden_state  # CLIP: after final_layer_norm
        result = {}
        if "cls" in wanted:
            result["cls"] = states[:, 0]
        if "mean" in wanted:
            m = mask.unsqueeze(-1).to(states.dtype)
            result["mean"] = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
        if "pooler" in wanted:
            result["pooler"] = out.pooler_output
        if "specific" in wanted:
            result["specific"] = torch.nn.functional.normalize(out.cls_projected_embedding, dim=1)
        return result

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], extractions: Sequence[str] = EXTRACTIONS, batch_size: int = 64,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True
              ) -> tuple[dict[str, Optional[torch.Tensor]], int]:
        """``({extraction: [n, d] float32 on CPU, or None}, number of texts truncated)``.

        Texts are sorted by token length and batched, so padding is minimal; outputs come back in input order.
        """
        from tqdm.auto import tqdm

        wanted = [e for e in extractions if e not in self.unavailable]
        out: dict[str, Optional[torch.Tensor]] = {e: None for e in extractions}
        if not wanted:
            return out, 0
        self.model.to(device=device, dtype=dtype)
        ids = self.tokenizer(list(texts), truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        lengths = np.asarray([len(x) for x in ids])
        truncated = int((lengths > self.max_length).sum())
        order = np.argsort(-lengths, kind="stable")
        parts: dict[str, list[torch.Tensor]] = {e: [] for e in wanted}
        bar = tqdm(total=len(texts), desc=f"encoding with {self.entry.name}", unit="report", disable=not progress)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            for e, v in self._forward(batch, wanted).items():
                parts[e].append(v.float().cpu())
            bar.update(len(idx))
        bar.close()
        inverse = torch.from_numpy(np.argsort(order, kind="stable"))
        for e in wanted:
            out[e] = torch.cat(parts[e])[inverse]
        self.model.to("cpu")
        return out, truncated


def _offline_hint(entry: EncoderEntry) -> str:
    from models.stable_diffusion import is_local_path

    hub_id = REGISTRY[entry.key].source if entry.key in REGISTRY else entry.source
    how = (f"Download it on a machine with internet access (`hf download {hub_id} --local-dir <folder>`) and pass the folder as "
           f"{entry.key}=<folder>, or put the hub id in your Hugging Face cache (HF_HOME)." if not is_local_path(hub_id) else
           "Pass a folder holding the model's config.json, weights and tokenizer files.")
    return f"Text encoder {entry.key!r} ({entry.source}) could not be loaded. {how} Offline presets: " + ", ".join(offline_presets()) + "."


def _is_clip_source(entry: EncoderEntry, local_files_only: bool, revision: Optional[str]) -> tuple[bool, Optional[str]]:
    """``(is CLIP, subfolder)``: a CLIP(-text) config at the root, or a diffusers pipeline with text_encoder/."""
    from transformers import PretrainedConfig

    from models.stable_diffusion import is_local_path

    source = entry.source
    if is_local_path(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise TextEncoderStudyError(f"{folder}: no such folder. " + _offline_hint(entry))
        if (folder / "model_index.json").is_file() or ((folder / "text_encoder").is_dir() and not (folder / "config.json").is_file()):
            return True, "text_encoder"
        if not (folder / "config.json").is_file():
            raise TextEncoderStudyError(f"{folder}: no config.json, so this is not a transformers model folder. " + _offline_hint(entry))
    kwargs = dict(local_files_only=local_files_only, revision=revision)
    try:
        config, _ = PretrainedConfig.get_config_dict(source, **kwargs)
    except (OSError, ValueError):
        try:  # a diffusers pipeline on the hub (e.g. CompVis/stable-diffusion-v1-4) has no root config.json
            PretrainedConfig.get_config_dict(source, subfolder="text_encoder", **kwargs)
            return True, "text_encoder"
        except (OSError, ValueError) as err:
            raise TextEncoderStudyError(_offline_hint(entry) + f"\nUnderlying error: {err}") from None
    return config.get("model_type") in ("clip", "clip_text_model"), None


def preflight(entries: Sequence[EncoderEntry], local_files_only: bool = False) -> None:
    """Fail before any work when an encoder's config cannot be found (missing folder, id not cached offline)."""
    for entry in entries:
        if entry.source not in offline_presets():
            _is_clip_source(entry, local_files_only, None)


def load_study_encoder(entry: EncoderEntry, local_files_only: bool = False, revision: Optional[str] = None) -> StudyEncoder:
    """Load ``entry``'s model and tokenizer and work out which extractions it really has."""
    from models.domain_encoder import DomainEncoderLoadError, DomainEncoderSpec, load_domain_encoder
    from models.stable_diffusion import StableDiffusionLoadError, load_text_encoder, preset_names

    source = entry.source
    clip_reasons = {"specific": "SD's CLIP text encoder has no model-specific sentence embedding (it is used without CLIP's projection)"}
    if source in preset_names():
        tokenizer, model = load_text_encoder(source)
        return StudyEncoder(entry, model, tokenizer, "clip", clip_reasons, int(tokenizer.model_max_length))
    if source not in offline_presets():
        is_clip, subfolder = _is_clip_source(entry, local_files_only, revision)
        if is_clip:
            from transformers import CLIPTextModel, CLIPTokenizer

            kwargs = dict(local_files_only=local_files_only, revision=revision)
            try:
                if subfolder:
                    tokenizer, model = load_text_encoder(dict(pretrained=source, **kwargs))
                else:
                    tokenizer = CLIPTokenizer.from_pretrained(source, **kwargs)
                    model = CLIPTextModel.from_pretrained(source, dtype=torch.float32, **kwargs)
            except (OSError, ValueError, StableDiffusionLoadError) as err:
                raise TextEncoderStudyError(_offline_hint(entry) + f"\nUnderlying error: {err}") from None
            limit = min(int(model.config.max_position_embeddings), int(tokenizer.model_max_length or 77))
            return StudyEncoder(entry, model, tokenizer, "clip", clip_reasons, limit)
    try:
        enc = load_domain_encoder(DomainEncoderSpec(pretrained=source, extraction="cls", local_files_only=local_files_only,
                                                    revision=revision))
    except DomainEncoderLoadError as err:
        raise TextEncoderStudyError(f"text encoder {entry.key!r}: {err}") from None
    unavailable = {}
    if reason := enc.extraction_unavailable("pooler"):
        unavailable["pooler"] = reason
    if not enc.is_cxr_bert:
        unavailable["specific"] = f"{type(enc.model).__name__} has no model-specific sentence embedding"
    return StudyEncoder(entry, enc.model, enc.tokenizer, "cxr-bert" if enc.is_cxr_bert else "bert", unavailable, enc.max_length)


def parse_encoders(specs: Sequence[str]) -> list[EncoderEntry]:
    """``key`` (registry or preset), ``key=source`` (a registry encoder from a folder or mirror) or ``source``."""
    entries: list[EncoderEntry] = []
    for spec in specs:
        key, _, source = spec.partition("=")
        key = key.strip()
        refuse_other_families(EncoderEntry(key, key, key, source.strip() or key))
        if source:
            base = REGISTRY.get(key)
            entries.append(EncoderEntry(key, base.name if base else key, base.short if base else key[:8], source.strip()))
        elif key in REGISTRY:
            entries.append(REGISTRY[key])
        elif key in offline_presets():
            entries.append(EncoderEntry(key, key, key, key))
        elif Path(key).expanduser().exists() or "/" in key:
            name = Path(key).name or key
            entries.append(EncoderEntry(key, name, name[:8], key))
        else:
            raise TextEncoderStudyError(
                f"encoder {key!r}: not a registered encoder ({', '.join(REGISTRY)}), a preset ({', '.join(offline_presets())}), "
                "a hub id (owner/name) or a folder"
            )
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TextEncoderStudyError(f"encoders: {dup} given more than once")
    shorts = [e.short for e in entries]
    if len(set(shorts)) < len(shorts) or BASELINE in shorts:  # keep Table 3 columns distinct
        entries = [EncoderEntry(e.key, e.name, e.name, e.source) for e in entries]
    return entries


# ============================================================================================ the study
@dataclass
class StudyConfig:
    out: str
    reports: Optional[str] = None
    labels: Optional[str] = None
    mimic_root: Optional[str] = None
    encoders: list[str] = field(default_factory=lambda: list(PAPER_ENCODERS))
    extractions: list[str] = field(default_factory=lambda: list(EXTRACTIONS))
    classes: list[str] = field(default_factory=lambda: list(CHEXPERT_CLASSES))
    k: int = 10
    mode: str = "paper"
    n_per_class: int = 50
    seed: int = 0
    uncertain: str = "negative"
    allow_short_classes: bool = False
    baseline: bool = True
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "fp32"
    local_files_only: bool = False
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS
    progress: bool = True

    def resolve_inputs(self) -> tuple[Path, Path]:
        if self.mimic_root:
            root = Path(self.mimic_root).expanduser()
            if not root.is_dir():
                raise TextEncoderStudyError(f"{root}: --mimic_root folder not found")
            labels = Path(self.labels) if self.labels else root / CHEXPERT_CSV
            if self.reports:
                reports = Path(self.reports)
            else:
                candidates = [root / "mimic-cxr-reports" / "files", root / "mimic-cxr-reports", root / "files"]
                reports = next((c for c in candidates if c.is_dir()), root)
            return reports, labels
        if not (self.reports and self.labels):
            raise TextEncoderStudyError("give --mimic_root, or both --reports (the report folder) and --labels (the CheXpert label CSV)")
        return Path(self.reports), Path(self.labels)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise TextEncoderStudyError(f"--mode: unknown value {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.uncertain not in UNCERTAIN:
            raise TextEncoderStudyError(f"--uncertain: unknown value {self.uncertain!r}; expected one of {', '.join(UNCERTAIN)}")
        bad = [e for e in self.extractions if e not in EXTRACTIONS]
        if bad or not self.extractions:
            raise TextEncoderStudyError(f"--extractions: unknown {bad}; expected some of {', '.join(EXTRACTIONS)}")
        unknown = [c for c in self.classes if c not in CHEXPERT_CLASSES]
        if unknown or not self.classes:
            raise TextEncoderStudyError(f"--classes: unknown {unknown}; expected some of {list(CHEXPERT_CLASSES)}")
        if self.k < 1:
            raise TextEncoderStudyError(f"--k {self.k}: expected k >= 1")
        if self.n_per_class < 0:
            raise TextEncoderStudyError(f"--n_per_class {self.n_per_class}: expected >= 0 (0: every usable report)")
        if self.n_per_class == 0 and self.mode == "paper":
            raise TextEncoderStudyError("--n_per_class 0 scores every report, which carries no single class: use --mode multilabel")
        if self.dtype not in DTYPES:
            raise TextEncoderStudyError(f"--dtype: unknown value {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if not self.encoders and not self.baseline:
            raise TextEncoderStudyError("nothing to score: no --encoders and --no_baseline")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Cell:
    encoder: str
    extraction: str
    status: str  # "scored", "none" (the model lacks it) or "degenerate"
    macro: float = float("nan")
    per_class: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class Sample:
    """The reports of the study and which class each is scored for."""

    corpus: object  # Corpus
    table: pd.DataFrame
    member: torch.Tensor
    scored_for: torch.Tensor
    classes: list[str]  # the classes with at least one scored report

    @property
    def n(self) -> int:
        return len(self.table)


def run_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> Path:
    """Run the study and write its tables; return the output folder."""
    cfg.validate()
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    entries = parse_encoders(cfg.encoders)
    reports_root, labels_csv = cfg.resolve_inputs()
    preflight(entries, cfg.local_files_only)  # a missing encoder stops the study before any work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sample = draw_sample(cfg, reports_root, labels_csv, out, log)
    cells, encoders_info, timings = [], {}, {}
    if cfg.baseline:
        cells.append(score_baseline(cfg, sample, timings))
    for entry in entries:
        entry_cells, encoders_info[entry.name] = score_encoder(cfg, entry, sample, log)
        cells += entry_cells
    log(write_outputs(out, cfg, entries, cells, sample.classes, sample.n))
    write_summary_and_provenance(cfg, out, reports_root, labels_csv, sample, cells, encoders_info, timings, started)
    log(f"wrote {out}/results.md, table2.csv, table3.csv, table3_heatmap.png, scores.csv, sample.csv, summary.json, provenance.json")
    return out


def draw_sample(cfg: StudyConfig, reports_root: Path, labels_csv: Path, out: Path, log) -> Sample:
    """Read the corpus, draw the class-balanced sample (or take every report) and write sample.csv (ids only)."""
    corpus = load_corpus(reports_root, labels_csv, cfg.uncertain, cfg.progress, log)
    sk = corpus.skipped
    log(f"reports: {len(corpus.table)} usable (sections: " + ", ".join(f"{k} {v}" for k, v in corpus.sections_used.items())
        + f"); skipped: {sk['no_usable_section']} without a usable section, {sk['reports_without_labels']} without labels, "
        f"{sk['labels_without_report']} label rows without a report, {sk['unreadable']} unreadable"
        + (f", {sk['uncertain_excluded']} with an uncertain label (--uncertain exclude)" if cfg.uncertain == "exclude" else ""))
    if cfg.n_per_class > 0:
        table = sample_per_class(corpus, cfg.n_per_class, cfg.seed, cfg.uncertain, cfg.allow_short_classes, cfg.classes)
        drawn = torch.tensor(table["class"].map({c: i for i, c in enumerate(CHEXPERT_CLASSES)}).to_numpy())
    else:
        table, drawn = corpus.table.copy(), None
    n = len(table)
    if cfg.k >= n:
        raise TextEncoderStudyError(f"--k {cfg.k}: the study has only {n} reports, and each report's k neighbours exclude itself; "
                                    f"use k <= {n - 1} or more reports")
    positives = torch.from_numpy(positive_matrix(table, cfg.uncertain))
    member, scored_for = class_matrices(drawn, positives, len(CHEXPERT_CLASSES), cfg.mode)
    scored_for = scored_for & torch.tensor([c in cfg.classes for c in CHEXPERT_CLASSES])
    classes = [c for i, c in enumerate(CHEXPERT_CLASSES) if bool(scored_for[:, i].any())]
    # ids only: the results folder holds no report text, so it can be shared without the credentialed data
    columns = ["subject_id", "study_id"] + (["class"] if "class" in table else []) + ["section"]
    table[columns].to_csv(out / "sample.csv", index=False)
    log(f"study: {n} reports" + (f", {cfg.n_per_class} per class (seed {cfg.seed})" if cfg.n_per_class else " (all)")
        + f"; CheXpert@{cfg.k}, mode {cfg.mode}, uncertain labels {cfg.uncertain}")
    return Sample(corpus, table, member, scored_for, classes)


def _score(cfg: StudyConfig, sample: Sample, similarity) -> tuple[float, dict]:
    res = chexpert_at_k(similarity, sample.n, sample.member, sample.scored_for, cfg.k, CHEXPERT_CLASSES, cfg.max_chunk_elements)
    return res.macro, res.per_class


def score_baseline(cfg: StudyConfig, sample: Sample, timings: dict) -> "Cell":
    """The paper's bag-of-words baseline: intersection over union of the reports' word sets."""
    t0 = time.perf_counter()
    macro, per_class = _score(cfg, sample, TokenIoUSimilarity(sample.table["text"].tolist()))
    timings["baseline"] = time.perf_counter() - t0
    return Cell(BASELINE, "bag of words (IoU)", "scored", macro, per_class)


def score_encoder(cfg: StudyConfig, entry: EncoderEntry, sample: Sample, log) -> tuple[list["Cell"], dict]:
    """Every extraction of one encoder: embed the reports once, score each extraction (None and degenerate ones flagged)."""
    device = _device(cfg.device)
    t0 = time.perf_counter()
    enc = load_study_encoder(entry, cfg.local_files_only)
    embeddings, truncated = enc.embed(sample.table["text"].tolist(), cfg.extractions, cfg.batch_size, device, DTYPES[cfg.dtype],
                                      cfg.progress)
    info = {"source": entry.source, "kind": enc.kind, "class": type(enc.model).__name__,
            "parameters": int(sum(p.numel() for p in enc.model.parameters())), "max_length": enc.max_length,
            "truncated_reports": truncated, "unavailable": {e: enc.unavailable[e] for e in cfg.extractions if e in enc.unavailable},
            "seconds_embedding": round(time.perf_counter() - t0, 3)}
    if truncated:
        log(f"note: {entry.name}: {truncated} of {sample.n} impressions are longer than {enc.max_length} tokens and were truncated")
    cells, t_metric = [], 0.0
    for extraction in cfg.extractions:
        emb = embeddings[extraction]
        if emb is None:
            cells.append(Cell(entry.name, extraction, "none", note=enc.unavailable[extraction]))
        elif is_degenerate(emb):
            cells.append(Cell(entry.name, extraction, "degenerate",
                              note="identical embedding for every report: the ranking would be tie-breaking only"))
            log(f"note: {entry.name} / {EXTRACTION_TITLES[extraction]}: every report gets the same embedding; flagged, not scored")
        else:
            t1 = time.perf_counter()
            cells.append(Cell(entry.name, extraction, "scored", *_score(cfg, sample, CosineSimilarity(emb, device))))
            t_metric += time.perf_counter() - t1
    info["seconds_metric"] = round(t_metric, 4)
    del enc, embeddings
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cells, info


def write_summary_and_provenance(cfg: StudyConfig, out: Path, reports_root: Path, labels_csv: Path, sample: Sample, cells: list,
                                 encoders_info: dict, timings: dict, started: float) -> None:
    """summary.json (counts, encoders, every cell) and provenance.json (core.provenance)."""
    corpus, scored_for = sample.corpus, sample.scored_for
    summary = {
        "study": "text encoders, CheXpert@k (paper Tables 2 and 3)",
        "reports_usable": int(len(corpus.table)), "skipped": corpus.skipped, "sections_used": corpus.sections_used,
        "reports_in_study": sample.n, "reports_per_class": {c: int(scored_for[:, i].sum()) for i, c in enumerate(CHEXPERT_CLASSES)},
        "encoders": encoders_info,
        "cells": [asdict(c) for c in cells],
        "seconds_total": round(time.time() - started, 1),
        "seconds_baseline_metric": round(timings.get("baseline", 0.0), 4),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress",)}
    inputs = {"reports_root": str(reports_root), "labels_csv": str(labels_csv),
              "encoders": {name: info["source"] for name, info in encoders_info.items()}}
    provenance.write(out / "provenance.json", provenance.record("study/text-encoders", settings, inputs, packages=STUDY_PACKAGES))


# ============================================================================================ outputs
def _pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def _cell_text(cell: Optional[Cell]) -> str:
    if cell is None:
        return ""
    return {"scored": _pct(cell.macro), "none": "None", "degenerate": "degenerate"}[cell.status]


def best_extraction(cells: Sequence[Cell], encoder: str) -> Optional[Cell]:
    """The encoder's scored cell with the highest macro score (first extraction in table order on a tie)."""
    scored = [c for c in cells if c.encoder == encoder and c.status == "scored" and np.isfinite(c.macro)]
    return max(scored, key=lambda c: c.macro) if scored else None


def tables(cfg: StudyConfig, entries: Sequence[EncoderEntry], cells: Sequence[Cell], classes: Sequence[str]
           ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """Table 2 (encoder × extraction, macro, strings) and Table 3 (class × encoder at its best extraction, floats in %)."""
    by = {(c.encoder, c.extraction): c for c in cells}
    t2 = pd.DataFrame(
        [[_cell_text(by.get((e.name, x))) for x in cfg.extractions] for e in entries],
        index=pd.Index([e.name for e in entries], name="Model"),
        columns=[EXTRACTION_TITLES[x] for x in cfg.extractions],
    )
    columns, best_of = {}, {}
    base = by.get((BASELINE, "bag of words (IoU)"))
    if base is not None:
        columns[BASELINE] = base
        best_of[BASELINE] = "bag of words (IoU)"
    for e in entries:
        best = best_extraction(cells, e.name)
        if best is not None:
            columns[e.short] = best
            best_of[e.short] = EXTRACTION_TITLES[best.extraction]
    t3 = pd.DataFrame({col: [100 * c.per_class[k] for k in classes] + [100 * c.macro] for col, c in columns.items()},
                      index=pd.Index(list(classes) + ["Macro"], name="Abnormality"))
    return t2, t3, best_of


def _markdown(df: pd.DataFrame, fmt: Callable = str) -> str:
    head = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [fmt(v) for v in row]) + " |")
    return "\n".join(lines)


def _fmt_pct(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.1f}"


def plot_heatmap(t3: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = t3.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * data.shape[1] + 3.2, 0.42 * data.shape[0] + 1.6))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(data.shape[1]), t3.columns)
    ax.set_yticks(range(data.shape[0]), t3.index)
    ax.axhline(data.shape[0] - 1.5, color="white", lw=2)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if np.isfinite(v) and v > 60 else "white")
    fig.colorbar(im, ax=ax, label="CheXpert@k (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, cfg: StudyConfig, entries: Sequence[EncoderEntry], cells: Sequence[Cell], classes: Sequence[str],
                  n_reports: int) -> str:
    t2, t3, best_of = tables(cfg, entries, cells, classes)
    t2.to_csv(out / "table2.csv")
    t3.round(2).to_csv(out / "table3.csv")
    rows = []
    for c in cells:
        for cls in CHEXPERT_CLASSES:
            if c.status == "scored" and cls in classes:
                rows.append({"encoder": c.encoder, "extraction": c.extraction, "class": cls, "score": c.per_class.get(cls)})
        rows.append({"encoder": c.encoder, "extraction": c.extraction, "class": "Macro",
                     "score": c.macro if c.status == "scored" else None, "status": c.status, "note": c.note})
    pd.DataFrame(rows).to_csv(out / "scores.csv", index=False)
    what = (f"{n_reports} impressions, {cfg.n_per_class} per class (seed {cfg.seed})" if cfg.n_per_class else f"{n_reports} impressions (all usable)")
    title = f"CheXpert@{cfg.k} ({cfg.mode} mode), {what}"
    if not t3.empty:
        plot_heatmap(t3, out / "table3_heatmap.png", title)
    notes = [f"- {c.encoder} / {EXTRACTION_TITLES.get(c.extraction, c.extraction)}: {c.note}" for c in cells if c.status != "scored"]
    md = [
        f"# Text-encoder study: CheXpert@{cfg.k}",
        "",
        f"{what}; mode **{cfg.mode}**; uncertain labels: {cfg.uncertain}. Scores in percent (the paper's scale).",
        "",
        f"## Table 2: macro CheXpert@{cfg.k} per model and extraction",
        "",
        _markdown(t2),
        "",
        "`None`: the model does not have this extraction; `degenerate`: every report gets the same vector, so the "
        "ranking is tie-breaking only (not a score).",
        "",
        f"## Table 3: CheXpert@{cfg.k} per class, each model at its best extraction",
        "",
        _markdown(t3, _fmt_pct),
        "",
        "Best extraction per column: " + "; ".join(f"{k}: {v}" for k, v in best_of.items()) + ".",
        "",
    ]
    if notes:
        md += ["## Cells not scored", ""] + notes + [""]
    md += ["![Table 3 heatmap](table3_heatmap.png)", ""]
    (out / "results.md").write_text("\n".join(md))
    return "\n".join(md[2:-2])


# ============================================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py text-encoders",
        description="Text-encoder study (paper Tables 2 and 3): CheXpert@k of report-impression embeddings.",
    )
    src = p.add_argument_group("data (give --mimic_root, or --reports and --labels)")
    src.add_argument("--mimic_root", help="a folder holding mimic-cxr-2.0.0-chexpert.csv.gz and the reports "
                     "(mimic-cxr-reports/files/, or files/ as in the phantom demo data)")
    src.add_argument("--reports", help="folder of report files pXX/pSUBJECT/sSTUDY.txt (the unpacked mimic-cxr-reports.zip)")
    src.add_argument("--labels", help="CheXpert label CSV (mimic-cxr-2.0.0-chexpert.csv.gz)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoders", nargs="+", default=list(PAPER_ENCODERS), metavar="ENC",
                   help="registry keys (" + ", ".join(PAPER_ENCODERS) + "), KEY=FOLDER for a local copy, any hub id or "
                   "folder, or an offline preset (tiny-bert, tiny-cxr-bert, tiny-phantom, ...); default: the paper's seven")
    p.add_argument("--extractions", nargs="+", default=list(EXTRACTIONS), choices=EXTRACTIONS)
    p.add_argument("--classes", nargs="+", default=list(CHEXPERT_CLASSES), metavar="CLASS",
                   help="CheXpert classes to draw and score (default: all 14)")
    p.add_argument("--k", type=int, default=10, help="neighbours per report (default 10, as in the paper)")
    p.add_argument("--mode", default="paper", choices=MODES,
                   help="paper: a neighbour counts if it was drawn for the same class; multilabel: if it is positive for that class")
    p.add_argument("--n_per_class", type=int, default=50, help="reports drawn per CheXpert class (default 50: the paper's 700); "
                   "0: every usable report (needs --mode multilabel)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uncertain", default="negative", choices=UNCERTAIN,
                   help="an uncertain (-1.0) label counts as negative (default), as positive, or excludes the report")
    p.add_argument("--allow_short_classes", action="store_true", help="use the reports there are when a class has fewer than --n_per_class")
    p.add_argument("--no_baseline", dest="baseline", action="store_false", help="skip the bag-of-words baseline")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="encoder precision (bf16/fp16 only on GPU)")
    p.add_argument("--local_files_only", action="store_true", help="never contact the Hugging Face hub")
    p.add_argument("--no_progress", dest="progress", action="store_false")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = StudyConfig(**vars(args))
    try:
        run_study(cfg)
    except (TextEncoderStudyError, ReportCorpusError) as err:
        print(f"evaluate.py text-encoders: error: {err}", file=sys.stderr)
        return 2
    return 0
