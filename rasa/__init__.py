"""RASA: Removal of Absolute Spatial Attributes, a post-hoc positional-debiasing head (docs/rasa.md)."""

from franca.models.rasa_head import RASAHead

__all__ = ["RASAHead"]
