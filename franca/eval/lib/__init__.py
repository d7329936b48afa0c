"""What the evaluation commands share (loading, features, metrics, floors, pictures, provenance); the commands
themselves are the modules of :mod:`franca.eval` (``python -m franca.eval.<name>``)."""
