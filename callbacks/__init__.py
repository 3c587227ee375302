"""Training callbacks: checkpoints (when and how), the loss log, the data manifest, sample grids, FID during training,
the memorization monitor, the step progress bar."""
