"""Synthetic data and demo fixtures: chest X-ray phantoms in the MIMIC-CXR-JPG layout, made-up LAION captions,
the tiny model presets (``tiny-random``, ``tiny-phantom``, ``sd14-random``, ``tiny-bert``, ``tiny-cxr-bert``), the
phantom classifier, and the recipe that builds the shipped ``tiny-phantom`` weights.

This package imports the production code; the production code never imports it (an import-linter contract in
pyproject.toml). The production code reaches the presets and the phantom classifier by name, through the entry
points declared in pyproject.toml (:mod:`core.plugins`).
"""
