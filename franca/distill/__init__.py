"""``python -m franca.distill``: distil a large backbone into a small ViT or a timm model (training.md, "Distil")."""
