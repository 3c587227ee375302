"""The plain model layer (PyTorch, diffusers, transformers; no Lightning): Stable Diffusion loading and presets, the
domain text encoder, placeholder-token embeddings, the projection MLP, the :class:`~models.generator.Generator` and
exports (:func:`~models.exports.load_export`)."""
