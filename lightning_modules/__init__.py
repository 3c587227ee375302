"""The strategies: one LightningModule each over the shared training step (``base``), with fit-time preparation
(``preparation``) and loading of trained runs (``runs``)."""
