"""RASA: Removal of Absolute Spatial Attributes, a post-hoc positional-debiasing head (reference §8)."""

from rasa.head import RASAHead

__all__ = ["RASAHead"]
