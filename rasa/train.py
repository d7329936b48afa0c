"""Train a RASA head on a frozen backbone, one rank-2 regressor per round (docs/rasa.md; valeoai/Franca
``rasa/experiments/train_rasa.py``).

Round i has i frozen pre-layers (the regressors of rounds 0 … i−1, in order) and a fresh ``pos_pred``. Each round
reads the patch tokens ``x_norm_patchtokens`` of the augmented crops (no grad; bf16 autocast on CUDA) with the planes
of the pre-layers removed, and sets ``pos_pred`` by ``train.regressor``:

- ``trained`` (the original): PyTorch's default Linear init, then ``sigmoid(x · pos_predᵀ)`` → MSE against the
  (row, col)/(n−1) grid positions, AdamW with lr cosine-annealed per step to ``optim.final_lr``.
- ``cross_covariance`` (new): the rows are an orthonormal basis of the plane of Cov(x, row) and Cov(x, col) over the
  round's crops, accumulated in float64. Removing that plane leaves the tokens uncorrelated with (row, col), so no
  linear read-out predicts position on those crops any more (R² = 0): the least-squares concept-erasure result
  (Belrose et al. 2023, LEACE) for orthogonal projections. A fitted regressor's plane (the AdamW one, or least
  squares) is not the erasing one, and leaves part of the linear position information (docs/rasa.md).

Outputs in ``--output-dir D``: ``D/config.yaml``; after each round ``D/rounds/round_{i}.pth`` (the head so far: i
pre-layers + ``pos_pred``, original keys) and ``D/rounds/state.json``; per-epoch and per-round metrics in
``D/rasa_metrics.json`` (JSON lines); the result ``D/rasa_head.pth`` (= the last round's file), loadable with
``franca.hub.load_backbone(..., rasa_weights=D/rasa_head.pth)``. Restarting the same command skips finished rounds
(the data order, augmentations and initialisations are functions of (seed, round, epoch, index), so the result is the
one of an uninterrupted run).

``python -m rasa.train --config-file configs/rasa/voc_vitb14.yaml --output-dir D [--no-resume] [key=value ...]``
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from franca.data.seeded_transform import seeded_global_rngs
from franca.models.rasa_head import RASAHead
from franca.utils.atomic import atomic_write
from franca.utils.config_schema import ConfigError, save_config
from franca.utils.features import default_device
from franca.utils.logging import MetricsWriter, Progress
from franca.utils.weight_files import atomic_torch_save, load_torch_file
from rasa.config import DEFAULTS_FILE, load_rasa_config
from rasa.data import (
    SeededAugmentedImages,
    grid_positions,
    make_rasa_eval_transform,
    make_rasa_train_transform,
    round_batches,
    square_grid_side,
)
from rasa.eval import (
    device_patch_tokens,
    extract_patch_tokens,
    head_prediction_mse,
    position_readout,
    positional_variance_removed,
    remove_first_planes,
    split_images,
)

STATE_FILE = "state.json"
METRICS_FILE = "rasa_metrics.json"
RESULT_FILE = "rasa_head.pth"
# Keys that may change between a run and its resumption (they do not change the trained head).
_RESUMABLE_CHANGES = ("data.num_workers", "train.end_round", "train.log_every_s", "val.")


def round_file(output_dir: Path, round_index: int) -> Path:
    return output_dir / "rounds" / f"round_{round_index}.pth"


def load_frozen_backbone(weights: str, device: torch.device) -> nn.Module:
    """The backbone of ``model.weights`` in eval mode without gradients; errors name the config key."""
    from franca.hub import load_backbone

    try:
        backbone = load_backbone(weights)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as error:
        raise ValueError(f"model.weights={weights!r} cannot be loaded as a ViT backbone: {error}") from error
    backbone.requires_grad_(False)
    return backbone.to(device).eval()


def head_for_round(previous: RASAHead | None, round_index: int, embed_dim: int, seed: int) -> RASAHead:
    """A head with ``round_index`` frozen pre-layers = ``previous``'s pre-layers then its ``pos_pred``, and a fresh
    ``pos_pred`` (PyTorch default init, drawn under RNGs seeded by (seed, round))."""
    previous_weights = [] if previous is None else previous.weights(use_pos_pred=True)
    if len(previous_weights) != round_index:
        raise ValueError(
            f"round {round_index} needs {round_index} earlier regressors, but the previous head has "
            f"{len(previous_weights)} (pre-layers + pos_pred); give the file of round {round_index - 1}"
        )
    with seeded_global_rngs([seed, round_index]):
        head = RASAHead(embed_dim, n_pos_layers=round_index)
    with torch.no_grad():
        for layer, weight in zip(head.pre_pos_layers, previous_weights):
            layer.weight.copy_(weight)
    head.pre_pos_layers.requires_grad_(False)
    return head


def _lr_at(step: int, total: int, lr: float, final_lr: float) -> float:
    """Cosine annealing from ``lr`` at step 0 to ``final_lr`` at step ``total`` (CosineAnnealingLR, per step)."""
    return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * step / total))


def _round_loader(images, cfg: DictConfig, round_index: int, device: torch.device) -> DataLoader:
    """The round's augmented crops, in the (epoch, index) batches of ``round_batches``."""
    batches = round_batches(len(images), cfg.train.batch_size, cfg.train.epochs_per_round, cfg.train.seed, round_index)
    augmented = SeededAugmentedImages(
        images,
        make_rasa_train_transform(cfg.data.image_size, (cfg.data.min_scale, cfg.data.max_scale)),
        cfg.train.seed,
        round_index,
    )
    return DataLoader(
        augmented, batch_sampler=batches, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda"
    )


def _reduced_tokens(backbone: nn.Module, crops: torch.Tensor, removal: torch.Tensor) -> torch.Tensor:
    """Patch tokens [B, N, D] (fp32, on the backbone's device) with the pre-layers' planes removed."""
    return device_patch_tokens(backbone, crops, removal.device) @ removal


def train_round(
    backbone: nn.Module, head: RASAHead, images, cfg: DictConfig, round_index: int, device: torch.device
) -> list[dict]:
    """Trains ``head.pos_pred`` for one round (``train.regressor=trained``); one metrics record per epoch.

    The loss and a finiteness flag stay on the device: they are read (a host sync) once per epoch and at the progress
    lines only, so a non-finite loss is reported by its epoch, and the round's head is then not saved.
    """
    loader = _round_loader(images, cfg, round_index, device)
    head = head.to(device)
    with torch.no_grad():
        removal = head.folded_matrix(use_pos_pred=False).T.contiguous()
    optimizer = torch.optim.AdamW(head.pos_pred.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    total_steps = len(loader)
    steps_per_epoch = total_steps // cfg.train.epochs_per_round
    progress = Progress(f"RASA round {round_index}", total_steps)
    records, last_log = [], time.perf_counter()
    epoch_loss, epoch_finite = torch.zeros((), device=device), torch.ones((), dtype=torch.bool, device=device)
    targets = None
    for step, crops in enumerate(loader):
        tokens = _reduced_tokens(backbone, crops, removal)
        if targets is None:
            side = square_grid_side(tokens.shape[1])
            targets = grid_positions(side, side).to(device)
        lr = _lr_at(step, total_steps, cfg.optim.lr, cfg.optim.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        prediction = torch.sigmoid(head.pos_pred(tokens))
        loss = nn.functional.mse_loss(prediction, targets.expand_as(prediction))
        epoch_finite &= torch.isfinite(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad > 0:
            nn.utils.clip_grad_norm_(head.pos_pred.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        epoch_loss += loss.detach()
        epoch = step // steps_per_epoch
        if (step + 1) % steps_per_epoch == 0:
            _check_finite(epoch_finite, round_index, epoch, cfg)
            records.append({"round": round_index, "epoch": epoch, "train_mse": (epoch_loss / steps_per_epoch).item()})
            epoch_loss.zero_()
        if time.perf_counter() - last_log > cfg.train.log_every_s or step + 1 == total_steps:
            _check_finite(epoch_finite, round_index, epoch, cfg)
            progress.print(step + 1, f"mse {loss.item():.5f} lr {lr:.2e}")
            last_log = time.perf_counter()
    return records


def _check_finite(finite: torch.Tensor, round_index: int, epoch: int, cfg: DictConfig) -> None:
    """Raise when a step of this epoch had a non-finite loss (read here, once per epoch or log line: one sync)."""
    if not bool(finite):
        raise FloatingPointError(
            f"RASA round {round_index} epoch {epoch}: a step's loss is not finite; lower optim.lr (now {cfg.optim.lr})"
        )


@torch.no_grad()
def cross_covariance_round(
    backbone: nn.Module, head: RASAHead, images, cfg: DictConfig, round_index: int, device: torch.device
) -> list[dict]:
    """Sets ``head.pos_pred`` to orthonormal rows spanning Cov(x, row) and Cov(x, col) (``train.regressor=
    cross_covariance``); one record with that covariance's norm, the correlation of the tokens' projection on each
    covariance direction with its coordinate, and the share of the token variance in the plane.

    One round leaves the round's crops with no covariance with (row, col). A later round estimates what is left,
    mostly sampling noise, which points along the directions of largest variance: a low correlation with a large
    variance share says its plane would take content rather than position (docs/rasa.md).
    As the targets are the same for every image, Cov(x, y) = mean over grid positions p of (m_p − m̄)(y_p − ȳ)ᵀ with
    m_p the mean token at position p; the token covariance Σ comes from a float64 Gram matrix of the same pass.
    """
    loader = _round_loader(images, cfg, round_index, device)
    head = head.to(device)
    removal = head.folded_matrix(use_pos_pred=False).T.contiguous()
    progress = Progress(f"RASA round {round_index} (cross-covariance)", len(loader))
    position_sums = gram = centred_targets = None
    count, last_log = 0, time.perf_counter()
    for step, crops in enumerate(loader):
        tokens = _reduced_tokens(backbone, crops, removal).double()
        if centred_targets is None:
            side = square_grid_side(tokens.shape[1])
            targets = grid_positions(side, side).to(device, torch.float64)
            centred_targets = targets - targets.mean(0)
        flat = tokens.flatten(0, 1)
        position_sums = tokens.sum(0) if position_sums is None else position_sums + tokens.sum(0)
        gram = flat.T @ flat if gram is None else gram.addmm_(flat.T, flat)
        count += len(tokens)
        if time.perf_counter() - last_log > cfg.train.log_every_s or step + 1 == len(loader):
            progress.print(step + 1)
            last_log = time.perf_counter()
    position_means = position_sums / count
    covariance = centred_targets.T @ (position_means - position_means.mean(0)) / len(centred_targets)
    token_mean = position_means.mean(0)
    token_covariance = gram / (count * len(targets)) - torch.outer(token_mean, token_mean)
    directions = covariance / covariance.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    direction_variance = ((directions @ token_covariance) * directions).sum(1)
    target_variance = (centred_targets**2).mean(0)
    correlation = covariance.norm(dim=1) / (direction_variance * target_variance).sqrt()
    rows = orthonormal_rows(covariance, round_index)
    head.pos_pred.weight.copy_(rows.to(head.pos_pred.weight.dtype))
    record = {
        "round": round_index,
        "epoch": cfg.train.epochs_per_round - 1,
        "position_covariance_norm": float(covariance.norm()),
        "position_correlation": [float(c) for c in correlation],
        "plane_variance_share": float((rows @ token_covariance @ rows.T).trace() / token_covariance.trace()),
    }
    return [record]


def orthonormal_rows(covariance: torch.Tensor, round_index: int, tolerance: float = 1e-6) -> torch.Tensor:
    """The plane of the two covariance rows [2, D] as orthonormal rows (Gram–Schmidt in ``plane_basis``'s order).

    Rows that span less than a plane (no signal, or the row and column signals along one direction) cannot be stored
    as a RASA plane: a clear error instead of a NaN head.
    """
    first = covariance[0] / covariance[0].norm()
    second = covariance[1] - (covariance[1] @ first) * first
    if not (covariance[0].norm() > 0 and second.norm() > tolerance * covariance[1].norm() > 0):
        raise ValueError(
            f"RASA round {round_index}: Cov(tokens, row) and Cov(tokens, col) (norms "
            f"{covariance.norm(dim=1).tolist()}) do not span a plane: the tokens carry no linear position signal "
            f"left, or carry row and column along one direction; stop before this round (train.end_round={round_index})"
        )
    return torch.stack((first, second / second.norm()))


REGRESSORS = {"trained": train_round, "cross_covariance": cross_covariance_round}


def validate_round(backbone: nn.Module, head: RASAHead, cfg: DictConfig, device: torch.device) -> dict:
    """Position MSE of the head's prediction, and the held-out R² of a fresh ridge read-out (``rasa.eval.
    position_readout``) before and after all removals with the share of it removed, or why there are too few images
    for a read-out."""
    from franca.data.loaders import make_dataset

    dataset = make_dataset(cfg.val.dataset, transform=make_rasa_eval_transform(cfg.val.image_size))
    dataset = Subset(dataset, range(min(cfg.val.max_images, len(dataset))))
    tokens, _, _ = extract_patch_tokens(
        backbone, dataset, cfg.train.batch_size, cfg.data.num_workers, device, name="val"
    )
    fit, held_out = split_images(len(tokens), 0.5, cfg.train.seed)
    before = position_readout(tokens[fit], tokens[held_out])
    debiased = remove_first_planes(tokens, head.weights(use_pos_pred=True))
    after = position_readout(debiased[fit], debiased[held_out])
    record = {
        "val_r2_before_removal": before["position_r2"],
        "val_r2_after_removal": after["position_r2"],
        "val_positional_variance_removed": positional_variance_removed(before["position_r2"], after["position_r2"]),
    }
    if "position_readout_note" in after:
        record["val_readout_note"] = after["position_readout_note"]
    if cfg.train.regressor == "trained":  # a cross-covariance pos_pred holds directions, not a calibrated regressor
        record["val_mse"] = head_prediction_mse(head, tokens)
    return record


def head_state(head: RASAHead) -> dict[str, torch.Tensor]:
    """The original's keys: ``pre_pos_layers.{j}.weight`` [2, D] and ``pos_pred.weight`` [2, D], on CPU."""
    return {key: value.detach().cpu().clone() for key, value in head.state_dict().items()}


class RoundState:
    """``D/rounds/state.json``: the finished rounds and the config they were trained with."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "rounds" / STATE_FILE

    def read(self) -> dict | None:
        if not self.path.is_file():
            return None
        return json.loads(self.path.read_text())

    def write(self, finished_round: int, cfg: DictConfig) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"last_finished_round": finished_round, "config": OmegaConf.to_container(cfg)}
        atomic_write(self.path, json.dumps(record, indent=2))


def _flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def check_resumable(saved: dict, cfg: DictConfig, output_dir: Path) -> None:
    """Refuse to resume when a key that shapes the trained head differs from the finished rounds' config.

    Keys the saved config lacks (added to the defaults since it was written) count as their defaults.
    """
    old = _flatten({**_flatten(OmegaConf.to_container(OmegaConf.load(DEFAULTS_FILE))), **_flatten(saved)})
    new = _flatten(OmegaConf.to_container(cfg))
    changed = [
        f"{key}: {old.get(key)!r} → {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not key.startswith(_RESUMABLE_CHANGES)
    ]
    if changed:
        raise ConfigError(
            f"{output_dir} holds RASA rounds trained with another config ({'; '.join(changed)}); use the same "
            "settings to resume, another --output-dir, or --no-resume to start over"
        )


def _metrics_writer(output_dir: Path, first_round: int):
    """Keeps the metric lines of rounds before ``first_round`` (a resumption rewrites the rest) and appends."""
    return MetricsWriter(output_dir / METRICS_FILE, resume_iteration=first_round, key="round").write


def _starting_head(cfg: DictConfig, output_dir: Path, resume: bool, embed_dim: int) -> tuple[RASAHead | None, int]:
    """(the head of the last finished round, or None, and the next round to train)."""
    from franca.hub import load_rasa_head

    state = RoundState(output_dir).read() if resume else None
    if state is not None:
        check_resumable(state["config"], cfg, output_dir)
        finished = state["last_finished_round"]
        print(f"resuming: rounds up to {finished} are finished in {output_dir / 'rounds'}", flush=True)
        return load_rasa_head(round_file(output_dir, finished), embed_dim), finished + 1
    if cfg.train.start_round == 0:
        return None, 0
    head = load_rasa_head(cfg.model.init_head, embed_dim)
    if head.n_pos_layers != cfg.train.start_round - 1:
        raise ValueError(
            f"model.init_head={cfg.model.init_head!r} has {head.n_pos_layers} pre-layers, but train.start_round="
            f"{cfg.train.start_round} continues from a head with {cfg.train.start_round - 1}"
        )
    return head, cfg.train.start_round


def train(cfg: DictConfig, output_dir: str | os.PathLike, resume: bool = True) -> Path:
    """Runs the remaining rounds of ``cfg`` in ``output_dir``; returns the path of ``rasa_head.pth``."""
    from franca.data.loaders import make_dataset

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output_dir / "config.yaml")
    device = default_device()
    backbone = load_frozen_backbone(cfg.model.weights, device)
    patch = backbone.patch_size
    if cfg.data.image_size % patch:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not a multiple of the backbone's patch size {patch}; use e.g. "
            f"data.image_size={patch * max(2, cfg.data.image_size // patch)}"
        )
    images = make_dataset(cfg.data.dataset)
    head, first_round = _starting_head(cfg, output_dir, resume, backbone.embed_dim)
    write_metrics = _metrics_writer(output_dir, first_round)
    state = RoundState(output_dir)
    for round_index in range(first_round, cfg.train.end_round):
        started = time.perf_counter()
        head = head_for_round(head, round_index, backbone.embed_dim, cfg.train.seed)
        records = REGRESSORS[cfg.train.regressor](backbone, head, images, cfg, round_index, device)
        for record in records:
            write_metrics(record)
        summary = {"round": round_index, "pre_layers": round_index, "regressor": cfg.train.regressor}
        summary.update({k: v for k, v in records[-1].items() if k not in ("round", "epoch")})
        summary["time_s"] = time.perf_counter() - started
        if cfg.val.dataset:
            summary.update(validate_round(backbone, head.cpu(), cfg, device))
        write_metrics(summary)
        atomic_torch_save(head_state(head), round_file(output_dir, round_index))
        state.write(round_index, cfg)
        print(f"RASA round {round_index} done: " + json.dumps(summary), flush=True)
    final = round_file(output_dir, cfg.train.end_round - 1)
    if not final.is_file():
        raise FileNotFoundError(f"{final} is missing: the rounds in {output_dir} were not completed; rerun the command")
    atomic_torch_save(load_torch_file(final), output_dir / RESULT_FILE)
    print(f"RASA head written to {output_dir / RESULT_FILE}", flush=True)
    return output_dir / RESULT_FILE


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
RASA_CONFIG_DIR = REPOSITORY_ROOT / "configs" / "rasa"


def resolve_config_file(config_file: str | None) -> str | None:
    """A relative ``--config-file`` from the current directory first, then from the repository root, then from
    ``configs/rasa`` (so ``voc_vitb14.yaml`` works too); a path found nowhere is returned as given, and loading it
    names it."""
    if config_file is None or Path(config_file).is_absolute() or Path(config_file).is_file():
        return config_file
    for folder in (REPOSITORY_ROOT, RASA_CONFIG_DIR):
        if (folder / config_file).is_file():
            return str(folder / config_file)
    return config_file


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("rasa.train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=None, help="YAML recipe, e.g. configs/rasa/voc_vitb14.yaml")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--no-resume", action="store_true", help="retrain every round even if some are finished")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.end_round=3")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = get_args_parser().parse_args(argv)
    cfg = load_rasa_config(resolve_config_file(args.config_file), args.overrides)
    return train(cfg, args.output_dir, resume=not args.no_resume)


if __name__ == "__main__":
    main()
