"""The model card every export carries: ``README.md`` in the Hugging Face Hub's format (YAML metadata, then text).

It states the base model, the strategy, what was trained and on what data, the steps, the data-use notice (weights
trained on MIMIC-CXR may only be shared with credentialed users, as RoentGen gates its weights), and the suite's
evaluation results for the run where they exist.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

MIMIC_NOTICE = (
    "**Data use.** These weights were trained on MIMIC-CXR, which is credentialed data (PhysioNet data use agreement). "
    "Weights trained on it may only be shared with credentialed users: keep this repository private or gated, as "
    "RoentGen gates its weights. Generated images can copy training images; check with a memorization audit before "
    "sharing any."
)
SYNTHETIC_NOTICE = "Trained on synthetic data only (chest X-ray phantoms): no patient data; it means nothing clinically."
LAION_NOTICE = ("Trained on LAION image captions (text only: no images, no patient data); LAION's own terms apply to "
                "the captions.")


def model_card(manifest: dict, data: Optional[dict] = None, steps: Optional[int] = None, results: Optional[dict] = None) -> str:
    """``README.md`` text for an export described by its ``export.json`` manifest, the run's ``data.json``, the
    optimizer steps trained and evaluation results (``name -> short text``)."""
    base = manifest.get("base_model") or {}
    base_id = base.get("pretrained", "unknown")
    strategy, kind = manifest.get("strategy", "unknown"), manifest.get("kind", "unknown")
    dataset = (data or {}).get("dataset", "unknown")
    mimic = dataset == "MIMIC-CXR-JPG" and not (data or {}).get("synthetic")  # files in MIMIC's layout: patients unless marked
    family = manifest.get("base_family", "stable-diffusion")
    tags = [family, "text-to-image", "chest-x-ray", "radiology", "cxr-diffusion", kind.replace("_", "-")]
    meta = ["---", "library_name: diffusers", f"base_model: {base_id}", "license: other",
            "tags:", *[f"- {t}" for t in tags], "inference: false", "---", ""]
    lines = [f"# {strategy} on {base_id}", "",
             f"Made with cxr-diffusion's `export.py`: a `{kind}` export (see `export.json`).", "",
             "| | |", "|---|---|",
             f"| base model | `{base_id}`" + (f" (revision {base['revision']})" if base.get("revision") else "") + " |",
             f"| strategy | {strategy} |",
             f"| trained | {', '.join(manifest.get('trained', [])) or 'see export.json'} |",
             f"| weights | {manifest.get('weights', 'trained')} |",
             f"| optimizer steps | {steps if steps is not None else 'unknown'} |",
             f"| training data | {_data_line(data)} |", ""]
    lines += [_notice(data, mimic), ""]
    lines += _how_to_load(kind, base_id, manifest.get("pipeline_class", "StableDiffusionPipeline"), manifest.get("sampling") or {},
                          manifest.get("loading_code"))
    if results:
        lines += ["## Evaluation (cxr-diffusion)", ""] + [f"- {name}: {text}" for name, text in results.items()] + [""]
    return "\n".join(meta + lines)


def _notice(data: Optional[dict], mimic: bool) -> str:
    if not data:
        return "Training data: not recorded with this export."
    if mimic:
        return MIMIC_NOTICE
    if data.get("synthetic"):
        return SYNTHETIC_NOTICE
    return LAION_NOTICE if data.get("dataset") == "LAION captions" else f"Training data: {data.get('dataset', 'unknown')}."


def _data_line(data: Optional[dict]) -> str:
    if not data:
        return "unknown"
    if data.get("dataset") == "LAION captions":
        return f"LAION captions: {data.get('captions')} captions ({data.get('caption_style')} style)"
    findings = ", ".join(data.get("findings", []))
    return f"{data.get('dataset')}: {len(data.get('train', []))} training images ({findings}); {data.get('selection', '')}"


def _how_to_load(kind: str, base_id: str, pipeline: str = "StableDiffusionPipeline", sampling: Optional[dict] = None,
                 loading: Optional[str] = None) -> list[str]:
    code = {
        "pipeline": f'pipe = {pipeline}.from_pretrained("THIS_FOLDER")',
        "lora": f'pipe = {pipeline}.from_pretrained("{base_id}")\npipe.load_lora_weights("THIS_FOLDER")',
        "textual_inversion": f'pipe = {pipeline}.from_pretrained("{base_id}")\npipe.load_textual_inversion("THIS_FOLDER")',
    }.get(kind)
    if loading:  # a family whose pipeline has no loader for this kind says how to load it
        code = loading
    if code is None:
        return ["## Loading", "", "`models.exports.load_export(\"THIS_FOLDER\")` in cxr-diffusion.", ""]
    if sampling:  # arguments the model was trained with that the pipeline's defaults differ from
        args = ", ".join(f"{k}={v!r}" for k, v in sampling.items())
        code += f'\nimage = pipe("a photo of a lung xray", {args}).images[0]  # as it was trained'
    lines = ["## Loading", "", "```python", f"from diffusers import {pipeline}", code, "```", ""]
    if kind != "pipeline" and _is_preset(base_id):
        lines += [f"`{base_id}` is a cxr-diffusion preset, not a Hub id: write it as a folder first with "
                  f"`models.stable_diffusion.load_stable_diffusion({{\"pretrained\": \"{base_id}\"}}).pipeline().save_pretrained(FOLDER)` "
                  "and load the base from that folder.", ""]
    return lines


def _is_preset(name: str) -> bool:
    from models.stable_diffusion import preset_names

    return name in preset_names()


def write_model_card(folder: Path, manifest: dict, data: Optional[dict] = None, steps: Optional[int] = None,
                     results: Optional[dict] = None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(manifest, data, steps, results))
    return path
