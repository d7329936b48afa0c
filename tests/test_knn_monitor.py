"""The trainer's periodic k-NN (franca.train.knn_monitor) and the shared vote (franca.utils.knn)."""

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port
from torch.utils.data import TensorDataset

from franca.models import build_vit
from franca.train import train as trainer
from franca.train.config import load_config
from franca.train.knn_monitor import KnnMonitor, build_knn_monitor, require_labels, shard_indices
from franca.utils.knn import knn_accuracies, knn_classify

KNN_DATASETS = [
    "evaluation.knn_train_dataset=FashionMNIST:root=bundled:split=train",
    "evaluation.knn_val_dataset=FashionMNIST:root=bundled:split=test",
]


def brute_force_votes(train, train_labels, test, k, temperature, num_classes) -> np.ndarray:
    """DINO's weighted vote written out sample by sample: the k most cosine-similar training rows vote exp(cos/T)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    votes = np.zeros((len(test), num_classes))
    for row, query in enumerate(test):
        similarities = train @ query
        for neighbour in np.argsort(-similarities)[:k]:
            votes[row, train_labels[neighbour]] += np.exp(similarities[neighbour] / temperature)
    return votes


def test_vote_and_accuracies_match_a_brute_force_numpy_reference():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    train_labels, test_labels = rng.integers(0, 4, size=60), rng.integers(0, 4, size=25)
    ks = (1, 5, 20, 100)  # 100 > 60 training rows: every row votes
    as_tensors = [torch.from_numpy(a) for a in (train, train_labels, test, test_labels)]
    votes = knn_classify(as_tensors[0], as_tensors[1], as_tensors[2], ks, 0.1, 4, device=torch.device("cpu"))
    accuracies = knn_accuracies(*as_tensors, ks=ks, temperature=0.1, device=torch.device("cpu"))
    for k in ks:
        expected = brute_force_votes(train, train_labels, test, k, 0.1, 4)
        np.testing.assert_allclose(votes[k].numpy(), expected, rtol=1e-5)
        assert accuracies[f"{k}"]["top1"] == pytest.approx(100.0 * np.mean(expected.argmax(axis=1) == test_labels))
        top5 = np.argsort(-expected, axis=1, kind="stable")[:, :5]
        assert accuracies[f"{k}"]["top5"] == pytest.approx(100.0 * np.mean((top5 == test_labels[:, None]).any(axis=1)))
    assert 0 < accuracies["5"]["top1"] < 100 and accuracies["5"]["top5"] == 100.0  # 4 classes: top-5 holds them all


def test_the_knn_command_and_the_monitor_share_one_vote():
    from franca.eval import knn
    from franca.train import knn_monitor

    assert knn.knn_accuracies is knn_monitor.knn_accuracies is knn_accuracies and knn.DEFAULT_KS == (10, 20, 100, 200)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [1, 5, 7, 8])
def test_shards_cover_every_index_once_with_equal_lengths(size, world_size):
    shards = [shard_indices(size, rank, world_size) for rank in range(world_size)]
    assert len({len(indices) for indices, _ in shards}) == 1
    real = sorted(i for indices, count in shards for i in indices[:count])
    assert real == list(range(size))


def test_due_every_period_and_at_the_end():
    monitor = _monitor(TensorDataset(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long)), period=6)
    assert [done for done in range(1, 16) if monitor.due(done, 15)] == [6, 12, 15]
    monitor.period = 0
    assert [done for done in range(1, 16) if monitor.due(done, 15)] == [15]


def _images(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    images[:, 0] += labels[:, None, None].float()  # make the classes separable, so the accuracies are not all 0
    return TensorDataset(images, labels)


def _monitor(dataset, period=0, rank=0, world_size=1) -> KnnMonitor:
    return KnnMonitor(
        dataset, _images(11, seed=2), (1, 5), 0.07, period, 4, 0, torch.device("cpu"), None, rank, world_size
    )


def _tiny_vit() -> torch.nn.Module:
    """A random ViT whose CLS tokens differ from image to image (at LayerScale 1e-5 they are nearly all the same, and
    the k-NN would rank near-ties)."""
    torch.manual_seed(0)
    return build_vit("vit_tiny", embed_dim=32, depth=2, num_heads=2, img_size=16, patch_size=4, layerscale=1.0)


@pytest.mark.slow
def test_evaluate_restores_each_module_mode():
    model = _tiny_vit().train()
    model.blocks[0].eval()
    results = _monitor(_images(23, seed=1)).evaluate(model)
    assert set(results) == {"knn_top1_k1", "knn_top1_k5"} and all(0 <= v <= 100 for v in results.values())
    assert model.training and not model.blocks[0].training and model.blocks[1].training


def _rank_worker(rank: int, world_size: int, port: int, shard_model: bool, out: str) -> None:
    """One rank of a gloo group: the k-NN of the same tiny ViT (sharded with FSDP2 when ``shard_model``)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _tiny_vit()
        if shard_model:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        monitor = _monitor(_images(23, seed=1), rank=rank, world_size=world_size)
        torch.save(monitor.features(model, monitor.train_set, "train"), Path(out, f"rank{rank}.pt"))
        Path(out, f"rank{rank}.json").write_text(json.dumps(monitor.evaluate(model)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world_size", "shard_model"), [(2, True), (3, False)], ids=["2-fsdp", "3-replicated"])
@pytest.mark.slow
def test_several_ranks_give_the_single_process_accuracies(tmp_path, world_size, shard_model):
    """23 and 11 images over 2 or 3 ranks: padded shares, FSDP forwards in step, gathered features."""
    monitor, model = _monitor(_images(23, seed=1)), _tiny_vit()
    features, labels = monitor.features(model, monitor.train_set, "train")
    single = monitor.evaluate(model)
    torch.multiprocessing.spawn(
        _rank_worker, args=(world_size, free_port(), shard_model, str(tmp_path)), nprocs=world_size
    )
    rank_major = [i for rank in range(world_size) for i in range(rank, 23, world_size)]
    for rank in range(world_size):
        gathered, gathered_labels = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(gathered_labels, labels[rank_major])
        torch.testing.assert_close(gathered, features[rank_major], atol=1e-5, rtol=1e-5)
        ranked = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ranked == pytest.approx(single, abs=1e-9), rank


def test_unlabelled_images_streams_and_missing_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"evaluation\.knn_val_dataset has 2 unlabelled images"):
        require_labels(torch.tensor([0, -1, 3, -1]), "knn_val_dataset")
    tarfile.open(tmp_path / "a.tar", "w").close()
    shards = f"WebDataset:urls={tmp_path / 'a.tar'}"
    cfg = load_config(None, [f"evaluation.knn_train_dataset={shards}", "evaluation.knn_val_dataset=X:root=/"])
    with pytest.raises(ValueError, match=r"evaluation\.knn_train_dataset='WebDataset:urls=.*' is a stream"):
        build_knn_monitor(cfg, torch.device("cpu"), None)
    cfg.evaluation.knn_train_dataset = f"ImageFolder:root={tmp_path / 'missing'}"
    with pytest.raises(FileNotFoundError, match=r"evaluation\.knn_train_dataset='ImageFolder:root=.*missing'"):
        build_knn_monitor(cfg, torch.device("cpu"), None)
    assert build_knn_monitor(load_config(), torch.device("cpu"), None) is None


@pytest.mark.slow
def test_tiny_run_logs_the_teacher_knn_every_period_and_at_the_end(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    # LayerScale 1 (Franca: 1e-5) gives distinct CLS tokens after 9 iterations, so the accuracies measure something.
    overrides = [*KNN_DATASETS, "student.layerscale=1.0"]
    last = trainer.main(["--config-file", str(tiny_config), "--output-dir", str(out), *overrides])
    records = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    keys = [f"knn_top1_k{k}" for k in (10, 20, 100, 200)]
    with_knn = [r["iteration"] for r in records if "knn_top1_k10" in r]
    assert with_knn == [-1, 5, 8]  # the floor at initialisation; eval_period_iterations=6: after 6 and at the end
    assert set(records[0]) == {"iteration", *(f"knn_top1_k{k}" for k in (10, 20, 100, 200))}
    assert (out / "eval" / "training_0" / "teacher_checkpoint.pth").is_file()  # the initial teacher, for floors
    for record in records:
        if record["iteration"] in with_knn[1:]:
            assert all(0.0 <= record[key] <= 100.0 for key in keys)
            assert record["knn_top1_k20"] > 30  # 10 classes: real photos give the teacher far more than chance
    assert all(last[key] == records[-1][key] for key in keys)
    console = capsys.readouterr().out
    assert console.count("k-NN [6/9] teacher CLS, 4000 train / 1000 val images") == 1
    assert "k-NN [9/9]" in console and "top-1 k=10 " in console and console.count("k-NN [0/9]") == 1
    assert console.count("k-NN note: images are resized to 16 and centre-cropped to 16") == 1
