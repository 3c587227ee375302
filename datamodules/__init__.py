"""Data: MIMIC-CXR-JPG image–prompt pairs, reports, LAION captions, the fit-time contract with the strategies
(``contract``), the latent cache, images for the studies and the paper's prompts."""
