"""fotlab: an experiment platform for Focused Transformer (FoT) models."""

__version__ = "0.1.0"
