"""The bottom layer: the cache, the run folder, provenance, plugin look-up and image grids. Imports no other package
of the suite (docs/architecture.md)."""
