"""The RASA head (valeoai/Franca ``rasa/src/rasa_head.py``, ``RASAHead``): rank-2 removals of the subspaces
that predict a patch's (row, column).

Each weight W = [w_r; w_c] ∈ R^{2×D} defines the plane spanned by w_r and w_c; it is orthonormalised by Gram–Schmidt
(a = w_r/‖w_r‖, b' = normalised w_c − ⟨w_c, a⟩a) and x ← x − ⟨x, a⟩a − ⟨x, b'⟩b'. The pre-layers are applied in index
order, then ``pos_pred``. Keys match the original files: ``pre_pos_layers.{j}.weight``, ``pos_pred.weight``.
"""

import torch
from torch import nn

from franca.models.weights import load_strict, strip_prefixes


def plane_basis(weight: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [2, D] of the row space of a [2, D] weight (Gram–Schmidt in the original's order)."""
    a = weight[0] / weight[0].norm()
    b = weight[1] / weight[1].norm()
    b = b - (b @ a) * a
    return torch.stack((a, b / b.norm()))


def remove_plane(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split x [..., D] into (component in the plane of ``weight``, the rest)."""
    basis = plane_basis(weight.to(x.dtype))
    x_pos = (x @ basis.T) @ basis
    return x_pos, x - x_pos


class RASAHead(nn.Module):
    def __init__(self, input_dim: int, n_pos_layers: int = 9, pos_out_dim: int = 2):
        super().__init__()
        if pos_out_dim != 2:
            raise ValueError(f"RASAHead supports pos_out_dim=2 (row, column) only, got {pos_out_dim}")
        self.input_dim = input_dim
        self.pre_pos_layers = nn.ModuleList(nn.Linear(input_dim, 2, bias=False) for _ in range(n_pos_layers))
        self.pos_pred = nn.Linear(input_dim, 2, bias=False)

    @property
    def n_pos_layers(self) -> int:
        return len(self.pre_pos_layers)

    def weights(self, use_pos_pred: bool = True) -> list[torch.Tensor]:
        ws = [layer.weight for layer in self.pre_pos_layers]
        return ws + [self.pos_pred.weight] if use_pos_pred else ws

    def forward(
        self, x: torch.Tensor, use_pos_pred: bool = True, return_pos_info: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x_pos = torch.zeros_like(x)
        for w in self.weights(use_pos_pred):
            x_pos, x = remove_plane(x, w)
        return (x_pos, x) if return_pos_info else x

    def forward_pos_pred(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted normalised (row, column) in (0, 1)² for each token."""
        return torch.sigmoid(self.pos_pred(x))

    def folded_matrix(self, use_pos_pred: bool = True) -> torch.Tensor:
        """The whole removal as one D×D matrix M, applied as ``x @ M.T`` (M = (I−P_n)…(I−P_0))."""
        eye = torch.eye(self.input_dim, dtype=self.pos_pred.weight.dtype, device=self.pos_pred.weight.device)
        return self.forward(eye, use_pos_pred).T

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], source: str = "the RASA state dict") -> "RASAHead":
        """Build a head with as many pre-layers as the file has (8 in v1.0.0 files, 9 in v1.1.0) and load it
        (``module.`` / ``rasa_head.`` prefixes removed; ``source`` names the file in errors)."""
        state = {strip_prefixes(key, ("module.", "rasa_head.")): value for key, value in state_dict.items()}
        if "pos_pred.weight" not in state:
            raise ValueError(f"not a RASA head state dict: no 'pos_pred.weight' among keys {sorted(state)[:8]}")
        indices = sorted(int(k.split(".")[1]) for k in state if k.startswith("pre_pos_layers."))
        if indices != list(range(len(indices))):
            raise ValueError(f"RASA pre_pos_layers indices must be contiguous from 0, got {indices}")
        dim = state["pos_pred.weight"].shape[1]
        head = cls(dim, n_pos_layers=len(indices))
        load_strict(head, state, source, f"a RASA head with {len(indices)} pre-layers")
        return head
