import json

import numpy as np
import pytest
import torch
from eval_data import IMAGE_OPTIONS, make_photo_folders, save_tiny_checkpoint
from PIL import Image

from franca.eval import matryoshka
from franca.eval.matryoshka import matryoshka_dims, matryoshka_knn


def brute_knn_top1(train, train_labels, test, test_labels, k, temperature, num_classes) -> float:
    """Weighted k-NN written with numpy loops: cosine similarity, exp(sim/T) votes of the k nearest."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    hits = 0
    for z, label in zip(test, test_labels):
        sims = train @ z
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[train_labels[j]] += np.exp(sims[j] / temperature)
        hits += int(np.argmax(votes) == label)
    return 100.0 * hits / len(test_labels)


def test_default_dims_halve_down_to_d_over_64():
    assert matryoshka_dims(768) == [768, 384, 192, 96, 48, 24, 12]
    assert matryoshka_dims(1536) == [1536, 768, 384, 192, 96, 48, 24]
    assert matryoshka_dims(40) == [40, 20, 10, 5, 2, 1]


def test_slices_are_renormalised_prefixes():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(30)
    # class information in the first 4 dims only; the other 28 dims are large noise
    feats = torch.cat([3 * torch.nn.functional.one_hot(labels, 4).float(), 4 * torch.randn(90, 28, generator=g)], 1)
    feats[:, :4] += 0.3 * torch.randn(90, 4, generator=g)
    train, test = feats[::2], feats[1::2]
    train_y, test_y = labels[::2], labels[1::2]
    results = matryoshka_knn(train, train_y, test, test_y, dims=[32, 8, 4, 2], ks=(5,), temperature=0.1)
    assert list(results) == [32, 8, 4, 2]
    for d, r in results.items():
        expected = brute_knn_top1(train[:, :d].numpy(), train_y.numpy(), test[:, :d].numpy(), test_y.numpy(), 5, 0.1, 3)
        assert r["5"]["top1"] == pytest.approx(expected)
    assert results[4]["5"]["top1"] == 100.0 and results[32]["5"]["top1"] < 90.0


def test_bad_dims_are_refused():
    feats, labels = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"Matryoshka dims \[16, 0\] must lie in \[1, 8\]"):
        matryoshka_knn(feats, labels, feats, labels, dims=[16, 0, 4])


@pytest.mark.slow
def test_command_writes_table_json_and_plot(tmp_path, capsys):
    train, val = make_photo_folders(tmp_path / "photos")
    weights = save_tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "out"
    argv = ["--weights", weights, "--train-dataset", train, "--val-dataset", val, "--output-dir", str(out)]
    argv += IMAGE_OPTIONS + ["--nb-knn", "1", "5", "--linear", "--backend", "sklearn", "--c-grid-size", "2"]
    matryoshka.main(argv)
    record = json.loads((out / "results_eval_matryoshka.json").read_text())
    assert record["embed_dim"] == 192 and record["dims"] == [192, 96, 48, 24, 12, 6, 3]
    assert list(record["knn"]) == [str(d) for d in record["dims"]]
    assert all(0.0 <= record["knn"][d][k]["top1"] <= 100.0 for d in record["knn"] for k in ("1", "5"))
    assert record["linear"]["backend"] == "sklearn" and set(record["linear"]) - {"backend"} == set(record["knn"])
    with Image.open(out / "matryoshka.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    start = rows.index(["d", "k=1", "k=5", "logreg"])
    table = rows[start + 1 : start + 8]
    assert [int(r[0]) for r in table] == record["dims"]
    assert [float(r[1]) for r in table] == pytest.approx(
        [record["knn"][str(d)]["1"]["top1"] for d in record["dims"]], abs=0.01
    )
