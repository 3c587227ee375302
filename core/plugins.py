"""Named things the production code can use without importing the package that provides them.

The tiny presets, the phantom classifier and the other demo fixtures live in the ``synthetic`` package, which imports
the production code; the production code never imports it. It finds them by name through Python entry points,
declared in ``pyproject.toml`` (so the suite must be installed, ``pip install -e .``)::

    [project.entry-points."cxr_diffusion.stable_diffusion"]   tiny-random = "synthetic.presets:tiny_random"
    [project.entry-points."cxr_diffusion.domain_encoders"]    tiny-bert = "synthetic.presets:tiny_bert"
    [project.entry-points."cxr_diffusion.classifiers"]        tiny-phantom = "synthetic.phantom_classifier:load"

Any installed package can add entries to these groups (your own preset, a re-identification network, ...).
"""
from __future__ import annotations

import functools
from importlib import metadata

from core.errors import UserError

STABLE_DIFFUSION = "cxr_diffusion.stable_diffusion"
DOMAIN_ENCODERS = "cxr_diffusion.domain_encoders"
CLASSIFIERS = "cxr_diffusion.classifiers"


class PluginError(UserError, LookupError):
    """A named plugin is not installed."""


@functools.lru_cache(maxsize=None)
def names(group: str) -> tuple[str, ...]:
    """The names registered in ``group``, sorted."""
    return tuple(sorted({ep.name for ep in metadata.entry_points(group=group)}))


@functools.lru_cache(maxsize=None)
def load(group: str, name: str):
    """The object registered as ``name`` in ``group`` (looked up once per process)."""
    found = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    if not found:
        known = ", ".join(names(group)) or "none: is the suite installed? (pip install -e .)"
        raise PluginError(f"{name!r} is not registered in {group} (known: {known})")
    return found[0].load()
