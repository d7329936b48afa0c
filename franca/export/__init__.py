"""Deployment exports of a backbone: ONNX, Core ML and safetensors (see docs/export.md).

Names are imported on first use, so ``python -m franca.export.<format>`` runs its module once and the optional
packages (onnx, onnxruntime, onnxscript, coremltools, safetensors: ``pip install franca[export]``) are imported only
when an export runs.
"""

import importlib

_EXPORTS = {
    "ExportableBackbone": "franca.export.wrappers",
    "bicubic_resize_matrix": "franca.export.wrappers",
    "output_names": "franca.export.wrappers",
    "export_onnx": "franca.export.onnx",
    "verify_onnx": "franca.export.onnx",
    "export_coreml": "franca.export.coreml",
    "backbone_config": "franca.export.safetensors",
    "export_safetensors": "franca.export.safetensors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'franca.export' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
