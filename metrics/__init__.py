"""Metrics and feature networks shared by the callbacks and the studies: ``scores`` (FID, KID, AUROC, MS-SSIM,
intervals), ``features`` (Inception, classifier features), ``classifiers`` (torchxrayvision and registered
classifiers), ``image_quality`` (per-image RMSE/PSNR/SSIM), ``finding_correctness`` and ``chexpert_at_k``."""
