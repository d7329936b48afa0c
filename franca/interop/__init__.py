"""Moving backbones between franca, Hugging Face transformers and timm (docs/export.md, "transformers and timm").

* :mod:`franca.interop.transformers_format`: our ViT ↔ a ``transformers`` folder (``Dinov2Model`` /
  ``Dinov2WithRegistersModel`` out and in; ``DINOv3ViTModel`` in);
* :mod:`franca.interop.timm_format`: our ViT ↔ a timm Hub folder (DINOv2-style ``VisionTransformer`` out and in;
  DINOv3 ``Eva`` in);
* :mod:`franca.interop.folders`: recognising and reading such folders (:func:`franca.hub.load_backbone` uses it);
* :mod:`franca.interop.model_card`: the ``README.md`` model card of an exported folder;
* :mod:`franca.interop.extras`: the optional libraries, imported on first use.

Importing this package imports neither transformers nor timm: only reading a folder's library config, exporting and
checking an export do (``pip install 'franca[hf]'`` / ``'franca[timm]'``).
"""
