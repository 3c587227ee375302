"""The studies behind ``evaluate.py`` (VAE reconstruction, text encoders, generation; no study imports another), their
reader kits, and the reproduction summary."""
