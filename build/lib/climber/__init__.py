"""Climber: efficient, scalable Transformer ranking models for recommendation (arXiv 2502.09888)."""

__version__ = "0.1.0"
