import json
import math

import pytest
import torch
from eval_data import IMAGE_OPTIONS, make_photo_folders, save_tiny_checkpoint, separable_features

from franca.eval import linear
from franca.eval.linear import (
    ClassifierGrid,
    ProbeFeatures,
    ProbeSetting,
    make_optimizer,
    make_settings,
    precomputed_batches,
    probe_input,
    train_classifier_grid,
)
from franca.models.rasa_head import RASAHead
from franca.models.vision_transformer import build_vit


def manual_tokens(model, x: torch.Tensor, n: int, rasa: RASAHead | None = None) -> torch.Tensor:
    """Reference: run the blocks one by one, layer-norm the last n outputs, take CLS tokens and the mean patch."""
    tokens = model.prepare_tokens_with_masks(x)
    outputs = []
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(model.norm(tokens))
    patches = outputs[-1][:, 1:]
    if rasa is not None:
        patches = rasa(patches)
    return torch.stack([o[:, 0] for o in outputs[-n:]] + [patches.mean(1)], dim=1)


@pytest.mark.parametrize("n", [1, 3])
def test_probe_features_are_last_cls_tokens_and_mean_patch(n):
    torch.manual_seed(0)
    model = build_vit("vit_tiny", depth=3, patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(ProbeFeatures(model, n)(x), manual_tokens(model, x, n), rtol=1e-5, atol=1e-5)


def test_probe_features_use_the_rasa_head_on_patch_tokens():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", depth=2, patch_size=8, img_size=32).eval()
    head = RASAHead(192, n_pos_layers=2)
    model.attach_rasa_head(head)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = ProbeFeatures(model, 2, use_rasa_head=True)(x)
        torch.testing.assert_close(ours, manual_tokens(model, x, 2, head), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours[:, -1], ProbeFeatures(model, 2)(x)[:, -1])


def test_probe_features_errors():
    model = build_vit("vit_tiny", depth=2, patch_size=8, img_size=32)
    with pytest.raises(ValueError, match=r"n_last_blocks=4 must be in \[1, 2\]"):
        ProbeFeatures(model, 4)
    with pytest.raises(ValueError, match="needs a backbone with a RASA head: pass --rasa-weights"):
        ProbeFeatures(model, 1, use_rasa_head=True)


def test_probe_input_concatenates_in_block_order():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 4 CLS slots + mean patch
    for n in (1, 2, 4):
        for avgpool in (False, True):
            expected = [torch.cat([tokens[b, 4 - n + j] for j in range(n)]) for b in range(2)]
            if avgpool:
                expected = [torch.cat([e, tokens[b, 4]]) for b, e in enumerate(expected)]
            torch.testing.assert_close(probe_input(tokens, n, avgpool), torch.stack(expected))


def test_default_grid_and_classifier_init():
    settings = make_settings()
    assert len(settings) == 2 * 2 * 13
    assert {(s.n_blocks, s.avgpool) for s in settings} == {(1, False), (1, True), (4, False), (4, True)}
    assert sorted({s.lr for s in settings}) == [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2,
                                                5e-2, 0.1]  # fmt: skip
    torch.manual_seed(0)
    grid = ClassifierGrid([ProbeSetting(4, True, 0.1), ProbeSetting(1, False, 0.1)], embed_dim=256, num_classes=100)
    assert grid.classifiers[0].in_features == 5 * 256 and grid.classifiers[1].in_features == 256
    weight = grid.classifiers[0].weight
    assert weight.mean().item() == pytest.approx(0.0, abs=5e-4)
    assert weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert (grid.classifiers[0].bias == 0).all()


def test_learning_rates_are_scaled_and_cosine_decayed():
    grid = ClassifierGrid([ProbeSetting(1, False, 0.1), ProbeSetting(1, True, 1e-3)], embed_dim=4, num_classes=2)
    optimizer, scheduler = make_optimizer(grid, batch_size=64, total_iterations=10)
    base = [0.1 * 64 / 256, 1e-3 * 64 / 256]
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.9]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
    for t in range(11):
        for group, lr in zip(optimizer.param_groups, base):
            assert group["lr"] == pytest.approx(lr * (1 + math.cos(math.pi * t / 10)) / 2, abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_precomputed_batches_walk_permutations():
    tokens = torch.arange(12.0)[:, None, None]
    labels = torch.arange(12)
    batches = precomputed_batches(tokens, labels, batch_size=4, seed=0)
    first_pass = torch.cat([next(batches)[1] for _ in range(3)])
    second_pass = torch.cat([next(batches)[1] for _ in range(3)])
    assert sorted(first_pass.tolist()) == list(range(12)) and sorted(second_pass.tolist()) == list(range(12))
    assert not torch.equal(first_pass, second_pass)
    t, y = next(batches)
    assert torch.equal(t[:, 0, 0].long(), y)


def test_grid_recovers_separable_problem():
    def tokens_of(features: torch.Tensor, seed: int) -> torch.Tensor:
        # the informative feature sits in the last CLS slot; the other slots are noise
        noise = torch.randn(len(features), 3, features.shape[1], generator=torch.Generator().manual_seed(seed))
        return torch.cat([noise[:, :1], features[:, None], noise[:, 1:]], dim=1)

    train_x, train_y = separable_features(50, num_classes=4, dim=16, seed=0)
    val_x, val_y = separable_features(25, num_classes=4, dim=16, seed=1)
    torch.manual_seed(0)
    settings = make_settings((1, 2), (False, True), (1e-3, 0.1))
    grid = ClassifierGrid(settings, embed_dim=16, num_classes=4)
    batches = precomputed_batches(tokens_of(train_x, 0), train_y, batch_size=32, seed=0)
    results, history = train_classifier_grid(grid, batches, 32, 3, 20, tokens_of(val_x, 1), val_y)
    assert len(results) == 8 and len(history) == 3
    assert max(r["top1"] for r in results) >= 99.0
    assert history[-1]["top1"] == max(r["top1"] for r in results)


@pytest.mark.parametrize("precompute", [True, False])
def test_command_end_to_end(tmp_path, precompute):
    train, val = make_photo_folders(tmp_path / "photos")
    weights = save_tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "out"
    argv = ["--weights", weights, "--train-dataset", train, "--val-dataset", val, "--output-dir", str(out)]
    argv += IMAGE_OPTIONS + ["--n-last-blocks", "1", "2", "--learning-rates", "0.01", "0.1", "--epochs", "2"]
    argv += ["--iterations-per-epoch", "3", "--train-batch-size", "4"] + (
        ["--precompute-features"] if precompute else []
    )
    linear.main(argv)
    record = json.loads((out / "results_eval_linear.json").read_text())
    assert record["mode"] == ("precomputed" if precompute else "augmented")
    assert len(record["classifiers"]) == 8 and len(record["history"]) == 2
    best = record["best"]
    assert 0.0 <= best["top1"] <= 100.0
    assert best["top1"] == max(c["top1"] for c in record["classifiers"])
    saved = torch.load(out / "linear_probe_best.pth", weights_only=True)
    assert saved["setting"] == {k: best[k] for k in ("n_blocks", "avgpool", "lr")}
    assert saved["state_dict"]["weight"].shape == (3, 192 * (best["n_blocks"] + best["avgpool"]))
