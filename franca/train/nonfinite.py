"""The trainer's guard against non-finite losses: which terms went non-finite and since when, read without a host
sync per step, and the error that stops the run before a bad checkpoint is written."""

from pathlib import Path

import torch

from franca.checkpoint import latest_checkpoint
from franca.distributed import any_rank


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteTracker:
    """Remembers, on the device and without a host sync, which loss terms went non-finite and since when.

    The trainer reads it at log and checkpoint iterations (:meth:`check`), so a bad step is reported with its term and
    first iteration, and no checkpoint is ever written after one.
    """

    def __init__(self):
        self.bad: dict[str, torch.Tensor] = {}
        self.first: torch.Tensor | None = None

    def update(self, losses: dict[str, torch.Tensor], iteration: int) -> None:
        for name, value in losses.items():
            flag = ~torch.isfinite(value)
            self.bad[name] = flag if name not in self.bad else self.bad[name] | flag
        any_bad = torch.stack(list(self.bad.values())).any()
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.long, device=any_bad.device)
        self.first = torch.where((self.first < 0) & any_bad, iteration, self.first)

    def check(self, losses: dict[str, float], iteration: int, checkpoint_dir: Path) -> None:
        bad = [name for name, flag in self.bad.items() if bool(flag)]
        if not any_rank(bool(bad)):
            return
        last = latest_checkpoint(checkpoint_dir)
        where = (
            f"{', '.join(f'{k}={losses.get(k)}' for k in bad)} since iteration {int(self.first)}"
            if bad
            else "on another rank"
        )
        raise NonFiniteLossError(
            f"non-finite loss by iteration {iteration}: {where}. The last good checkpoint is "
            f"{last or 'none (no checkpoint written yet)'}; lower optim.base_lr, raise optim.warmup_epochs, or use "
            "compute_precision.dtype=bf16/fp32, then restart the same command to resume"
        )
