"""splitprefix: split prefix-tuning between a model party and data parties."""

__version__ = "0.1.0"
