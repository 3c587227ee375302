"""The paper's prompts, in one place: datamodule templates, textual inversion, sample grids, studies.

The paper (Table 4) generates from "a photo of a lung xray", "a photo of a lung xray with a visible
pleural effusion" and "a photo in the style of a lung xray"; a finding's prompt is the base prompt
followed by the finding's phrase.
"""
from __future__ import annotations

BASE_PROMPT = "a photo of a lung xray"
STYLE_PROMPT = "a photo in the style of a lung xray"
# What a prompt says about the image's finding, appended after the base prompt or a template.
FINDING_PHRASES = {
    "No Finding": "",
    "Pleural Effusion": "with a visible pleural effusion",
    "Cardiomegaly": "with cardiomegaly",
}


def finding_prompt(finding: str, base: str = BASE_PROMPT) -> str:
    """``base`` followed by the finding's phrase ("a photo of a lung xray with a visible pleural effusion")."""
    phrase = FINDING_PHRASES[finding]
    return f"{base} {phrase}" if phrase else base


FINDING_PROMPTS = {finding: finding_prompt(finding) for finding in FINDING_PHRASES}
PAPER_PROMPTS = (BASE_PROMPT, FINDING_PROMPTS["Pleural Effusion"], STYLE_PROMPT)


def prompt_finding(prompt: str) -> str:
    """The reference finding of a prompt (FID reference images, finding correctness): prompts that name a pleural
    effusion -> ``Pleural Effusion``, every other prompt (the plain and the style prompt) -> ``No Finding``."""
    return "Pleural Effusion" if "effusion" in prompt.lower() else "No Finding"


def normal_and_effusion_prompts(prompts) -> list[str]:
    """The plain prompt and the effusion prompt (paper Figure 1, finding correctness), or [] when one is missing."""
    normal = [p for p in prompts if prompt_finding(p) == "No Finding" and "style" not in p.lower()]
    effusion = [p for p in prompts if prompt_finding(p) == "Pleural Effusion"]
    return [normal[0], effusion[0]] if normal and effusion else []
