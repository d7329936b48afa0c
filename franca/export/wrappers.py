"""A backbone wrapped for graph export: images in, a tuple of plain tensors out.

ONNX and Core ML want a module whose forward takes one tensor and returns tensors, with no Python branching on
shapes. :class:`ExportableBackbone` takes the weights of a :class:`DinoVisionTransformer` and returns
``(cls_token [B, D], patch_tokens [B, N, D])``, plus ``patch_tokens_rasa [B, N, D]`` when a RASA head is attached
(folded into one D×D matrix; valeoai/Franca ``rasa/src/rasa_head.py``, ``RASAHead.forward``).

Any other backbone with our ``forward_features`` dictionary (a distilled timm student,
:mod:`franca.models.timm_backbone`) is exported through :class:`ExportableFeatures`, with the same inputs and outputs;
:func:`exportable` picks the wrapper.

Position embeddings (valeoai/Franca ``DinoVisionTransformer.interpolate_pos_encoding``) come in two forms:

* fixed size: the embeddings for that one image size are computed once with the model's own interpolation and stored
  as a constant, so the graph holds no resize at all;
* dynamic size: the original's ``F.interpolate(bicubic, scale_factor=(h0 + 0.1) / M)`` is rewritten as two small
  matrix products ``A_h · G · A_wᵀ`` whose interpolation weights are computed in the graph from h0 = H/P and w0 = W/P
  with the same arithmetic as PyTorch's bicubic kernel (scale in float64 then float32, cubic convolution a = −0.75,
  edge-clamped taps), so every exporter and runtime gives PyTorch's numbers to ~1e-6 (:func:`bicubic_resize_matrix`).
"""

import argparse
import math
import os

import torch
from torch import nn

from franca.models.vision_transformer import DinoVisionTransformer

OUTPUT_NAMES = ("cls_token", "patch_tokens")
RASA_OUTPUT_NAME = "patch_tokens_rasa"
INPUT_NAME = "images"
CUBIC_A = -0.75


def output_names(with_rasa: bool) -> tuple[str, ...]:
    """Names of the exported graph's outputs, in order."""
    return OUTPUT_NAMES + ((RASA_OUTPUT_NAME,) if with_rasa else ())


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--weights`` / ``--rasa-weights`` / ``--arch`` options shared by the export commands."""
    parser.add_argument(
        "--weights",
        required=True,
        help="hub name (franca_vitb14, franca_vitb14:IN21K_224), checkpoint file, safetensors export folder or URL",
    )
    parser.add_argument("--rasa-weights", default=None, help="RASA head file: adds the patch_tokens_rasa output")
    parser.add_argument("--arch", default=None, help="architecture name, for checkpoints whose keys leave it open")


def load_export_model(
    weights: str | os.PathLike, rasa_weights: str | os.PathLike | None = None, arch: str | None = None
) -> DinoVisionTransformer:
    """The backbone to export, in eval mode on CPU with its stored dtype, through :func:`franca.hub.load_backbone`."""
    from franca.hub import load_backbone

    return load_backbone(weights, arch=arch, rasa_weights=rasa_weights).eval()


@torch.no_grad()
def reference_outputs(model: DinoVisionTransformer, images: torch.Tensor, with_rasa: bool) -> list[torch.Tensor]:
    """The PyTorch outputs an exported graph must reproduce, in :func:`output_names` order."""
    features = model.forward_features(images, use_rasa_head=with_rasa)
    outputs = [features["x_norm_clstoken"], features["x_norm_patchtokens"]]
    return outputs + [features["patch_token_rasa"]] if with_rasa else outputs


def check_image_size(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Validate an (H, W) export size: two positive multiples of the patch size."""
    if len(image_size) != 2:
        raise ValueError(f"image size must be two numbers (H, W), got {image_size!r}")
    height, width = (int(s) for s in image_size)
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        fix = f"{max(height // patch_size, 1) * patch_size} {max(width // patch_size, 1) * patch_size}"
        raise ValueError(
            f"image size {height}x{width} is not a positive multiple of the patch size {patch_size}; "
            f"use e.g. --image-size {fix}"
        )
    return height, width


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """Keys' cubic-convolution weights (a = −0.75) of the taps at distances 1 + t, t, 1 − t, 2 − t."""

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_resize_matrix(
    out_size: int | torch.SymInt, in_size: int, offset: torch.Tensor | None, native: torch.Tensor
) -> torch.Tensor:
    """Matrix A [out_size, in_size] (float32) with ``A @ g`` = bicubic resize of g along one axis, as the model does.

    Reproduces ``F.interpolate(mode="bicubic", align_corners=False, antialias=False)`` along one axis for
    ``scale_factor = (out_size + offset) / in_size`` (offset > 0) or ``size = out_size`` (offset None), as the
    original ``interpolate_pos_encoding``: the inverse scale is computed in float64 and rounded to float32 as
    PyTorch does; the source coordinate
    ``inverse_scale · (i + 0.5) − 0.5`` is rounded once to float32 (PyTorch's CPU kernel evaluates it as a fused
    multiply-add; two roundings would move some taps by an ulp of the coordinate, ~1e-6); the four taps
    ``floor − 1 … floor + 2`` are clamped to the grid and weighted by Keys' cubic (a = −0.75), evaluated in float64.
    ``native`` (a bool scalar tensor) selects ``src = i``, the model's unchanged grid at its construction size: the
    weights at t = 0 are exactly (0, 1, 0, 0), so A is then exactly the identity. ``offset`` is a float64 scalar
    tensor so that exporters keep it in double precision (a Python float would be stored as float32).
    """
    dst = torch.arange(out_size, dtype=torch.float64, device=native.device)
    n_out = torch.full((), out_size, dtype=torch.float64, device=native.device)
    if offset is not None:
        inverse_scale = (1.0 / ((n_out + offset) / in_size)).to(torch.float32)
    else:
        inverse_scale = (in_size / n_out).to(torch.float32)
    src = (inverse_scale.to(torch.float64) * (dst + 0.5) - 0.5).to(torch.float32)
    src = torch.where(native, dst.to(torch.float32), src)
    floor = torch.floor(src)
    weights = _cubic_weights((src - floor).to(torch.float64))
    columns = torch.arange(in_size, device=native.device)
    matrix = torch.zeros(dst.shape[0], in_size, dtype=torch.float64, device=native.device)
    for tap, weight in enumerate(weights):
        index = (floor.to(torch.int64) + (tap - 1)).clamp(0, in_size - 1)
        matrix = matrix + weight.unsqueeze(1) * (index.unsqueeze(1) == columns).to(torch.float64)
    return matrix.to(torch.float32)


class ExportableBackbone(nn.Module):
    """Inference-only graph of a float32 backbone: ``images [B, 3, H, W]`` → ``(cls_token, patch_tokens[, rasa])``.

    ``image_size=(H, W)`` bakes the position embeddings for that size (fixed-size export); ``image_size=None`` keeps
    the construction grid and interpolates it in the graph for any H, W divisible by the patch size. The backbone's
    modules and parameters are shared, not copied.
    """

    def __init__(self, model: DinoVisionTransformer, image_size: tuple[int, int] | None = None):
        super().__init__()
        if model.pos_embed is None:
            raise ValueError(
                "graph export (ONNX, Core ML) covers backbones with learned position embeddings; this one uses RoPE "
                "(DINOv3), which the exported graph does not compute: run it in PyTorch"
            )
        if model.pos_embed.dtype != torch.float32:
            raise ValueError(
                f"graph export expects a float32 model, got {model.pos_embed.dtype}; call model.float() first "
                "(reduced precision is chosen at conversion, e.g. Core ML --fp16)"
            )
        self.patch_size = model.patch_size
        self.num_register_tokens = model.num_register_tokens
        self.patch_embed = model.patch_embed
        self.class_embedding = model.cls_token
        self.register_tokens = model.register_tokens
        self.blocks = model.blocks
        self.norm = model.norm
        self.fixed_size = None if image_size is None else check_image_size(image_size, model.patch_size)
        with torch.no_grad():
            if self.fixed_size is None:
                self._init_dynamic_position(model)
            else:
                height, width = self.fixed_size
                n_tokens = 1 + (height // self.patch_size) * (width // self.patch_size)
                probe = torch.empty(1, n_tokens, model.embed_dim)
                self.register_buffer("pos_embed", model.interpolate_pos_encoding(probe, height, width).clone())
            rasa = model.rasa_head
            self.register_buffer("rasa_matrix", None if rasa is None else rasa.folded_matrix().detach())

    def _init_dynamic_position(self, model: DinoVisionTransformer) -> None:
        if model.interpolate_antialias:
            raise ValueError(
                "dynamic-size export reproduces the non-antialiased bicubic interpolation only, but the model has "
                "interpolate_antialias=True; export a fixed size instead (drop --dynamic-size)"
            )
        rows = model.pos_embed.shape[1] - 1
        side = math.isqrt(rows)
        if side * side != rows:
            raise ValueError(f"pos_embed has {rows} patch rows, which is not a square grid")
        self.grid_side = side
        self.register_buffer("cls_pos", model.pos_embed[:, :1].detach().clone())
        self.register_buffer("pos_grid", model.pos_embed[0, 1:].detach().reshape(side, side, -1).clone())
        offset = float(model.interpolate_offset)
        offset_tensor = torch.tensor(offset, dtype=torch.float64) if offset else None
        self.register_buffer("interpolate_offset", offset_tensor, persistent=False)

    def position_embeddings(self, h0: int | torch.SymInt, w0: int | torch.SymInt) -> torch.Tensor:
        """[1, 1 + h0·w0, D] position embeddings for an h0×w0 patch grid (``interpolate_pos_encoding``)."""
        if self.fixed_size is not None:
            return self.pos_embed
        side, dim = self.grid_side, self.pos_grid.shape[-1]
        native = (torch.full((), h0) == side) & (torch.full((), w0) == side)
        rows = bicubic_resize_matrix(h0, side, self.interpolate_offset, native)
        cols = bicubic_resize_matrix(w0, side, self.interpolate_offset, native)
        along_rows = torch.matmul(rows, self.pos_grid.reshape(side, side * dim)).reshape(-1, side, dim)
        patch_pos = torch.matmul(cols, along_rows).reshape(1, -1, dim)
        return torch.cat((self.cls_pos, patch_pos), dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = images.shape[0]
        x = self.patch_embed(images)
        x = torch.cat((self.class_embedding.expand(batch, -1, -1), x), dim=1)
        x = x + self.position_embeddings(images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(batch, -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        cls_token, patch_tokens = x[:, 0], x[:, 1 + self.num_register_tokens :]
        if self.rasa_matrix is None:
            return cls_token, patch_tokens
        return cls_token, patch_tokens, torch.matmul(patch_tokens, self.rasa_matrix.T)


class ExportableFeatures(nn.Module):
    """Inference-only graph of any other backbone with our ``forward_features`` (a timm student, whose convolutions
    need no position grid): ``images`` → ``(cls_token, patch_tokens[, patch_tokens_rasa])``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.patch_size = model.patch_size
        self.with_rasa = model.rasa_head is not None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.forward_features(images, use_rasa_head=self.with_rasa)
        outputs = (features["x_norm_clstoken"], features["x_norm_patchtokens"])
        return outputs + (features["patch_token_rasa"],) if self.with_rasa else outputs


def exportable(model: nn.Module, image_size: tuple[int, int] | None = None) -> nn.Module:
    """The graph wrapper of ``model`` in eval mode: :class:`ExportableBackbone` for our ViT (``image_size`` None =
    dynamic position grid), :class:`ExportableFeatures` for any other backbone (any size works as it is)."""
    if isinstance(model, DinoVisionTransformer):
        return ExportableBackbone(model.eval(), image_size).eval()
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("graph export expects a float32 model; call model.float() first")
    return ExportableFeatures(model.eval()).eval()
