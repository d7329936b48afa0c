"""The trainer's guard against non-finite losses: which terms went non-finite and since when, read without a host
sync per step, and the error that stops the run before a bad checkpoint is written, with where to restart
(training.md, "Recovery").

The checkpoint to name is the last one that is known to be sound: it passed its SHA-256 check in this process (it
was written here, or verified when resumed from) and the steps after it were finite (its iteration is before the
first non-finite one). When the run resumed and its very first step was already non-finite, the advice says whether
the checkpoint's own tensors hold NaN or infinity (it was saved after a divergence, or damaged in a way its digest
cannot show) or are finite (the step itself diverges from that state).
"""

import torch

from franca.checkpoint import TrainingCheckpointer
from franca.distributed import all_gather_object, any_rank


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

    def check(self, losses: dict[str, float], iteration: int, checkpointer: TrainingCheckpointer) -> None:
        bad = [name for name, flag in self.bad.items() if bool(flag)]
        if not any_rank(bool(bad)):
            return
        where = (
            f"{', '.join(f'{k}={losses.get(k)}' for k in bad)} since iteration {int(self.first)}"
            if bad
            else "on another rank"
        )
        first = int(self.first) if bad else None
        raise NonFiniteLossError(
            f"non-finite loss by iteration {iteration}: {where}. {restart_advice(checkpointer, first, iteration)}"
        )


SHOWN_TENSORS = 3


def restart_advice(checkpointer: TrainingCheckpointer, first_bad: int | None, iteration: int) -> str:
    """The sentences after "non-finite loss by iteration ...". Every rank calls it (it gathers what each rank knows:
    its first non-finite iteration and the non-finite tensors of its shard of the resumed checkpoint)."""
    resumed = checkpointer.resumed
    gathered = all_gather_object((first_bad, list(resumed.nonfinite) if resumed else []))
    firsts = [first for first, _ in gathered if first is not None and first >= 0]
    first = min(firsts, default=iteration)
    sound = [(it, path) for it, path in checkpointer.verified if it < first and path.exists()]
    if sound:
        advice = [
            f"The last checkpoint that passed its integrity check and was followed by finite steps is {sound[-1][1]}"
        ]
    else:
        advice = ["No checkpoint of this run has yet passed its integrity check and been followed by finite steps"]
    if resumed is not None and first == resumed.iteration:
        names = sorted({name for _, found in gathered for name in found})
        if names:
            more = len(names) - SHOWN_TENSORS
            shown = ", ".join(names[:SHOWN_TENSORS]) + (f" and {more} more" if more > 0 else "")
            advice.append(
                f"This run resumed from {resumed.path}, whose own tensors hold non-finite values ({shown}): it was "
                "saved after a divergence or is damaged. Move it aside (with its .record.json) so that resume takes "
                "an older checkpoint"
            )
        else:
            advice.append(
                f"This run resumed from {resumed.path} and its first step was already non-finite, although that "
                "checkpoint's tensors are all finite: the step itself diverges from that state"
            )
    advice.append(
        "Lower optim.base_lr, raise optim.warmup_epochs, or use compute_precision.dtype=bf16/fp32, then rerun the same "
        "command with --allow-config-change (the change is recorded) to resume"
    )
    return ". ".join(advice)
