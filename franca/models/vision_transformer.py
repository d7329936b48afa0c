"""The Franca backbone: a DINOv2-style ViT (valeoai/Franca ``franca/models/vision_transformer.py``,
``DinoVisionTransformer``).

Blocks are stored flat (``blocks.{i}``); :mod:`franca.models.weights` also reads the released chunked
``blocks.{c}.{i}`` keys. The constructor arguments are one :class:`~franca.models.config.ViTConfig`. Token
preparation, the output dict and the position-embedding interpolation reproduce the original exactly, so released
weights give the original outputs at any input size divisible by the patch size.

With ``position_encoding="rope"`` (DINOv3 backbones) there is no ``pos_embed``: each block rotates the patch queries
and keys by their grid position (:class:`~franca.layers.RotaryPositions`), registers sit after CLS as before, and the
plain path is untouched (the blocks are called exactly as without RoPE).
"""

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from franca.layers import Block, Mlp, PatchEmbed, RotaryPositions, SwiGLUFFN
from franca.models.config import ARCHITECTURES as ARCHITECTURES  # re-exported: the names build_vit accepts
from franca.models.config import INPUT_DECODING_KEY, ViTConfig
from franca.utils.precision import at_least_fp32

FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}


def resize_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """[1, 1 + M², D] position embeddings → [1, 1 + h·w, D] for an h×w patch grid, the ViT's run-time interpolation.

    The M×M patch grid is resized bicubically in float32 (float64 stays float64) with
    ``scale_factor=((h + offset)/M, (w + offset)/M)`` (not a target size: the 0.1 offset of the original moves the
    sampling positions; ``size=`` when the offset is 0); the CLS row is kept. Returns float32 (float64 for a float64
    input). Used at run time and to rebuild a checkpoint for another image size.
    """
    rows = pos_embed.shape[1] - 1
    side = math.isqrt(rows)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or side * side != rows:
        raise ValueError(f"pos_embed must be [1, 1 + M², D] with a square grid, got {tuple(pos_embed.shape)}")
    h, w = grid
    pos = at_least_fp32(pos_embed)
    patch_grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resize = {"scale_factor": ((h + offset) / side, (w + offset) / side)} if offset else {"size": (h, w)}
    patch_grid = F.interpolate(patch_grid, mode="bicubic", antialias=antialias, **resize)
    if patch_grid.shape[-2:] != (h, w):
        raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_grid.shape[-2:])}, expected {(h, w)}")
    return torch.cat((pos[:, :1], patch_grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)), dim=1)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DinoVisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig | None = None, **kwargs):
        """Build from a :class:`ViTConfig`, or from its fields as keywords (``DinoVisionTransformer(depth=2)``)."""
        super().__init__()
        if config is None:
            config = ViTConfig().with_overrides(**kwargs)
        elif kwargs:
            raise TypeError(f"pass a ViTConfig or keywords, not both (got the keywords {sorted(kwargs)})")
        if config.img_size % config.patch_size:
            raise ValueError(f"img_size={config.img_size} is not divisible by patch_size={config.patch_size}")
        self.config = config
        img_size, patch_size, embed_dim, depth = config.img_size, config.patch_size, config.embed_dim, config.depth
        num_register_tokens = config.num_register_tokens
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.num_heads = config.num_heads
        self.patch_size = patch_size
        self.img_size = img_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = config.interpolate_offset
        self.interpolate_antialias = config.interpolate_antialias

        self.patch_embed = PatchEmbed(patch_size, config.in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = None if config.uses_rope else nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.rope = (
            RotaryPositions(embed_dim // config.num_heads, config.rope_base, config.rope_normalize_coords)
            if config.uses_rope
            else None
        )
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        max_rate = config.drop_path_rate
        if config.drop_path_uniform or depth == 1:
            rates = [max_rate] * depth
        else:
            rates = [max_rate * i / (depth - 1) for i in range(depth)]
        ffn_cls = FFN_LAYERS[config.ffn_layer]
        hidden = int(embed_dim * config.mlp_ratio)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                config.num_heads,
                ffn_cls(embed_dim, hidden, bias=config.ffn_bias),
                qkv_bias=config.qkv_bias,
                proj_bias=config.proj_bias,
                layerscale=config.layerscale,
                drop_path=rate,
                norm_eps=config.layer_norm_eps,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.head = nn.Identity()
        self.rasa_head: nn.Module | None = None
        # How image files become this model's input (franca.models.config.stored_input_decoding); None = unknown.
        self.input_decoding: dict | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """The original's initialisation (Linear trunc-normal .02, zero bias; conv/LayerNorm PyTorch defaults)."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.apply(_init_linear)

    # ----------------------------------------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h×w image, exactly as the original method of that name: unchanged at the
        construction grid for square inputs, else :func:`resize_pos_embed` to (h/P, w/P), cast to ``x``'s dtype."""
        if x.shape[1] - 1 == self.pos_embed.shape[1] - 1 and h == w:
            return self.pos_embed
        grid = (h // self.patch_size, w // self.patch_size)
        return resize_pos_embed(self.pos_embed, grid, self.interpolate_offset, self.interpolate_antialias).to(x.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask tokens (before position embeddings), CLS, position embeddings, registers."""
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        B, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x

    def _rope_tables(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sin, cos) for the images' patch grid with RoPE, else None."""
        if self.rope is None:
            return None
        h, w = images.shape[-2:]
        return self.rope(h // self.patch_size, w // self.patch_size, images.device)

    def _run_blocks(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, keep=()) -> tuple:
        """The tokens after all blocks, and the outputs of the blocks whose index is in ``keep``."""
        kept = []
        for i, blk in enumerate(self.blocks):
            x = blk(x) if rope is None else blk(x, rope)
            if i in keep:
                kept.append(x)
        return x, kept

    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None, use_rasa_head: bool) -> dict:
        x_norm = self.norm(x)
        out = {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : self.num_register_tokens + 1],
            "x_norm_patchtokens": x_norm[:, self.num_register_tokens + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }
        if use_rasa_head:
            if self.rasa_head is None:
                raise RuntimeError(
                    "forward_features(use_rasa_head=True) needs a RASA head: load one with "
                    "franca.hub (rasa_weights=...) or attach it with model.attach_rasa_head(head)"
                )
            out["patch_token_rasa"] = self.rasa_head(out["x_norm_patchtokens"])
        return out

    def forward_features(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        use_rasa_head: bool = False,
    ) -> dict | list[dict]:
        """Token dict as the original ``forward_features``; a list of batches gives a list of dicts (one pass each)."""
        if isinstance(x, (list, tuple)):
            masks_list = masks if masks is not None else [None] * len(x)
            return [self.forward_features(xi, mi, use_rasa_head) for xi, mi in zip(x, masks_list)]
        rope = self._rope_tables(x)
        x, _ = self._run_blocks(self.prepare_tokens_with_masks(x, masks), rope)
        return self._output_dict(x, masks, use_rasa_head)

    def forward(self, x: torch.Tensor, is_training: bool = False, **kwargs) -> torch.Tensor | dict:
        out = self.forward_features(x, **kwargs)
        return out if is_training else self.head(out["x_norm_clstoken"])

    def build_config(self) -> dict:
        """The stored ``backbone_config`` of this backbone: :meth:`ViTConfig.to_dict` without stochastic depth, and
        its ``input_decoding`` when known."""
        config = self.config.inference().to_dict()
        if self.input_decoding is not None:
            config[INPUT_DECODING_KEY] = dict(self.input_decoding)
        return config

    def attach_rasa_head(self, head: nn.Module | None) -> None:
        """Attach (or with None, remove) the post-hoc RASA positional-debiasing head."""
        if head is not None and getattr(head, "input_dim", self.embed_dim) != self.embed_dim:
            raise ValueError(
                f"RASA head for dim {head.input_dim} cannot be attached to a backbone of dim {self.embed_dim}"
            )
        self.rasa_head = head

    # ----------------------------------------------------------------------------------------------------------------
    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the listed block indices), as DINOv2."""
        B, _, h, w = x.shape
        total = len(self.blocks)
        take = set(range(total - n, total)) if isinstance(n, int) else set(n)
        bad = sorted(i for i in take if not 0 <= i < total)
        if bad:
            raise ValueError(f"get_intermediate_layers: block indices {bad} out of range for depth {total}")
        _, outputs = self._run_blocks(self.prepare_tokens_with_masks(x), self._rope_tables(x), take)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            gh, gw = h // self.patch_size, w // self.patch_size
            patches = [p.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)


def build_vit(arch: str, **kwargs) -> DinoVisionTransformer:
    """Build one of :data:`ARCHITECTURES` by name; keyword arguments (``depth`` too) override its defaults."""
    return DinoVisionTransformer(ViTConfig.for_arch(arch, **kwargs))


vit_tiny = partial(build_vit, "vit_tiny")
vit_small = partial(build_vit, "vit_small")
vit_base = partial(build_vit, "vit_base")
vit_large = partial(build_vit, "vit_large")
vit_giant2 = partial(build_vit, "vit_giant2")
