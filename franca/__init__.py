"""franca: pretrain, load, debias, evaluate and export Franca vision foundation models (arXiv 2507.14137)."""

__version__ = "0.1.0"
