"""Evaluation of frozen backbones: ``python -m franca.eval.<name>``."""
