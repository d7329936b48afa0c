"""Where to restart after a non-finite loss: the advice the NaN guard gives (training.md, "Recovery").

The checkpoint to name is the last one that is known to be sound: it passed its SHA-256 check in this process (it
was written here, or verified when resumed from) and the steps after it were finite (its iteration is before the
first non-finite one). When the run resumed and its very first step was already non-finite, the advice says whether
the checkpoint's own tensors hold NaN or infinity (it was saved after a divergence, or damaged in a way its digest
cannot show) or are finite (the step itself diverges from that state).
"""

from franca.checkpoint import TrainingCheckpointer
from franca.distributed import all_gather_object

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
