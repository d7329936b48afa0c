"""SLURM submission of ``franca.train`` through submitit: one task per GPU, requeued until the run is done.

``python -m franca.run.train --nodes N --ngpus G [--partition P ...] --config-file F --output-dir D [key=value ...]``
validates the config, then submits one job of N nodes × G tasks (one per GPU). Each task runs
``franca.train.train.main`` with the same arguments; the trainer finds its rank, world size and rendezvous in the
SLURM_* variables (:mod:`franca.distributed`). Logs go to ``D/slurm/<job id>/``.

Requeue (the original only had plain ``srun`` scripts under ``scripts/``): submitit asks SLURM to send its preemption
signal (USR2) ``--signal-delay`` seconds before the time limit. :class:`TrainingJob` relays it to the trainer as
SIGUSR1, so the trainer finishes its iteration, writes a checkpoint and exits; then submitit's handler stores
:meth:`TrainingJob.checkpoint` (the same command, without ``--no-resume``) and requeues the job, which resumes from
that checkpoint. A job requeued by SLURM itself (preemption: SIGTERM, which the trainer also answers with a
checkpoint) drops ``--no-resume`` too, as SLURM_RESTART_COUNT tells.
"""

import argparse
import json
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUBMITIT_MISSING = "submitit is not installed; install it with: pip install 'franca[slurm]' (or pip install submitit)"
CLUSTERS = ("slurm", "local", "debug")


def import_submitit():
    try:
        import submitit
    except ImportError as error:
        raise ImportError(SUBMITIT_MISSING) from error
    return submitit


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "franca.run.train",
        description="Submit franca.train to SLURM with submitit. Arguments not listed here (--config-file, "
        "--output-dir, --no-resume, --allow-config-change, key=value overrides) are passed to franca.train.",
    )
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--ngpus", type=int, default=8, help="GPUs per node = training tasks per node")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--timeout", type=int, default=1200, help="time limit of each job in minutes")
    parser.add_argument("--account", default=None, help="SLURM account (-A)")
    parser.add_argument("--qos", default=None, help="SLURM quality of service")
    parser.add_argument("--constraint", default=None, help="SLURM node constraint (-C), e.g. h100")
    parser.add_argument("--exclude", default=None, help="nodes to avoid, e.g. node[01-03]")
    parser.add_argument("--comment", default=None, help="SLURM job comment")
    parser.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per GPU task (data workers + 1)")
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: the cluster's)")
    parser.add_argument("--job-name", default="franca", help="SLURM job name")
    parser.add_argument("--max-requeues", type=int, default=20, help="how many times a timed-out job is requeued")
    parser.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which the job checkpoints (must cover one iteration and a save)",
    )
    parser.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="slurm",
        help="slurm, or local / debug to try the submission on this machine (one process, waits for the end)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the job parameters and command; submit nothing")
    return parser


@dataclass
class LaunchPlan:
    """What :func:`submit` sends: submitit folder, cluster, executor parameters and the trainer's argv."""

    folder: Path
    cluster: str
    max_requeues: int
    parameters: dict[str, Any]
    trainer_argv: list[str]
    world_size: int
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)

    def command(self) -> str:
        return shlex.join([sys.executable, "-m", "franca.train", *self.trainer_argv])


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"--{name}={value} must be >= {minimum}")


def _trainer_argv(trainer_args: argparse.Namespace) -> list[str]:
    argv = []
    if trainer_args.config_file is not None:
        config_file = Path(trainer_args.config_file).expanduser().resolve()
        if not config_file.is_file():
            raise FileNotFoundError(f"--config-file {trainer_args.config_file}: no such file")
        argv += ["--config-file", str(config_file)]
    argv += ["--output-dir", str(Path(trainer_args.output_dir).expanduser().resolve())]
    if trainer_args.no_resume:
        argv.append("--no-resume")
    if trainer_args.allow_config_change:
        argv.append("--allow-config-change")
    return argv + list(trainer_args.opts)


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords: one task per GPU on SLURM, one process for local / debug."""
    if args.cluster == "slurm":
        _check_positive("ngpus", args.ngpus)
        tasks_per_node = args.ngpus
    else:
        if args.nodes != 1 or args.ngpus > 1:
            raise ValueError(
                f"--cluster {args.cluster} runs one process on this machine: use --nodes 1 --ngpus 0 or 1 (got "
                f"--nodes {args.nodes} --ngpus {args.ngpus}); for several GPUs use torchrun (training.md)"
            )
        tasks_per_node = 1
    parameters: dict[str, Any] = {
        "name": args.job_name,
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node,
        "gpus_per_node": args.ngpus,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.timeout,
        "slurm_signal_delay_s": args.signal_delay,
    }
    if args.mem_gb is not None:
        parameters["mem_gb"] = args.mem_gb
    optional = {
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_exclude": args.exclude,
        "slurm_comment": args.comment,
    }
    parameters.update({key: value for key, value in optional.items() if value is not None})
    return parameters


def plan_launch(argv: list[str] | None = None) -> LaunchPlan:
    """Parse the launcher's and the trainer's arguments, validate the config, and return the launch plan."""
    from franca.train.config import apply_scaling_rules, load_config
    from franca.train.train import get_args_parser as get_trainer_args_parser

    args, rest = get_args_parser().parse_known_args(argv)
    trainer_args = get_trainer_args_parser().parse_args(rest)
    for name in ("nodes", "timeout", "cpus_per_task", "signal_delay"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    _check_positive("max-requeues", args.max_requeues, minimum=0)
    parameters = executor_parameters(args)
    world_size = parameters["nodes"] * parameters["tasks_per_node"]
    trainer_argv = _trainer_argv(trainer_args)
    cfg = apply_scaling_rules(load_config(trainer_args.config_file, list(trainer_args.opts)), world_size)
    notes = [
        f"{world_size} training processes, global batch {cfg.train.batch_size_per_gpu * world_size}, "
        f"lr {cfg.optim.lr:.3g} ({cfg.optim.scaling_rule} of base_lr {cfg.optim.base_lr:g}), "
        f"{cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH} iterations on {cfg.train.dataset_path}"
    ]
    output_dir = Path(trainer_argv[trainer_argv.index("--output-dir") + 1])
    return LaunchPlan(
        folder=output_dir / "slurm" / "%j",
        cluster=args.cluster,
        max_requeues=args.max_requeues,
        parameters=parameters,
        trainer_argv=trainer_argv,
        world_size=world_size,
        dry_run=args.dry_run,
        notes=notes,
    )


def without_no_resume(argv: list[str]) -> list[str]:
    return [arg for arg in argv if arg != "--no-resume"]


def preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (USR2 unless SUBMITIT_PREEMPT_SIGNAL says)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    if not hasattr(signal, name):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={os.environ['SUBMITIT_PREEMPT_SIGNAL']!r} is not a signal name")
    return getattr(signal, name)


class PreemptionRelay:
    """Turns submitit's preemption signal into the trainer's stop request (SIGUSR1) and, once the trainer has saved
    and exited, hands over to submitit's own handler (checkpoint + requeue). Inactive outside a submitit job."""

    def __init__(self):
        self.signum = preemption_signal()
        self.submitit_handler = signal.getsignal(self.signum)
        self.active = callable(self.submitit_handler)
        self.received = False
        if self.active:
            signal.signal(self.signum, self._relay)

    def _relay(self, signum: int, frame) -> None:
        self.received = True
        if callable(signal.getsignal(signal.SIGUSR1)):
            print(f"received {signal.Signals(signum).name}: asking the trainer to checkpoint and stop", flush=True)
            signal.raise_signal(signal.SIGUSR1)
        else:
            self.submitit_handler(signum, frame)

    def hand_over(self) -> None:
        """After the trainer stopped on a relayed signal: submitit checkpoints :class:`TrainingJob` and requeues."""
        if self.active and self.received:
            self.submitit_handler(self.signum, None)

    def uninstall(self) -> None:
        if self.active:
            signal.signal(self.signum, self.submitit_handler)


class TrainingJob:
    """The callable submitit runs in every task: ``franca.train.train.main(argv)``.

    It follows submitit's checkpointable protocol (submitit requeues a job whose callable has ``checkpoint``), without
    subclassing ``submitit.helpers.Checkpointable`` so that this module imports without submitit.
    """

    def __init__(self, trainer_argv: list[str]):
        self.trainer_argv = list(trainer_argv)

    def argv_for_this_start(self) -> list[str]:
        """A requeued job (SLURM_RESTART_COUNT > 0) resumes: ``--no-resume`` only applies to the first start."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        return without_no_resume(self.trainer_argv) if restarts > 0 else list(self.trainer_argv)

    def __call__(self) -> dict:
        from franca.train.train import main as train_main

        relay = PreemptionRelay()
        try:
            return train_main(self.argv_for_this_start())
        except SystemExit:
            relay.hand_over()
            raise
        finally:
            relay.uninstall()

    def checkpoint(self, *args, **kwargs):
        """The submission that continues this run: the same command, resuming from the trainer's last checkpoint."""
        submitit = import_submitit()
        return submitit.helpers.DelayedSubmission(TrainingJob(without_no_resume(self.trainer_argv)))


def describe(plan: LaunchPlan) -> str:
    lines = [
        f"cluster: {plan.cluster}",
        f"submitit folder (logs): {plan.folder}",
        f"requeues after timeout: at most {plan.max_requeues}",
        "executor parameters: " + json.dumps(plan.parameters, sort_keys=True),
        *plan.notes,
        f"each of the {plan.world_size} tasks runs: {plan.command()}",
    ]
    return "\n".join(lines)


def submit(plan: LaunchPlan):
    """Submit the plan; returns the submitit job. local / debug jobs are waited for."""
    submitit = import_submitit()
    executor = submitit.AutoExecutor(folder=plan.folder, cluster=plan.cluster, slurm_max_num_timeout=plan.max_requeues)
    executor.update_parameters(**plan.parameters)
    job = executor.submit(TrainingJob(plan.trainer_argv))
    log_folder = str(plan.folder).replace("%j", str(job.job_id))
    print(f"submitted job {job.job_id}; logs in {log_folder}", flush=True)
    if plan.cluster != "slurm":
        job.result()
        print(f"job {job.job_id} finished", flush=True)
    return job


def main(argv: list[str] | None = None) -> int:
    plan = plan_launch(argv)
    print(describe(plan), flush=True)
    if plan.dry_run:
        print("dry run: nothing submitted", flush=True)
        return 0
    submit(plan)
    return 0
