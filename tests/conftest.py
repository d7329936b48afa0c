import os
from pathlib import Path

import pytest
import torch
from helpers import LEARNING, TINY_RUN

# One intra-op thread pool per process sized to the cores: under ``pytest -n N`` each worker gets cores / N threads
# (2 workers on 2 cores: 1 each), since oversubscribed torch threads slow every worker down.
# The trainers that tests launch as subprocesses inherit the count through OMP_NUM_THREADS, so a resumed subprocess
# run computes as the in-process run it is compared with.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)
# Modules scheduled first: the learning runs are the suite's longest file, so under ``--dist loadfile`` it starts on
# one worker while the other takes the rest, instead of running alone at the end.
FIRST_MODULES = ("test_learning.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in FIRST_MODULES)
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RUN)
    return path


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> Path:
    """The output folder of the tiny Franca run that learns (helpers.LEARNING: 320 iterations on the bundled
    Fashion-MNIST subset, about half a minute on two cores), trained once per session: tests/test_learning.py checks
    that it learns, the distillation and adaptation learning tests start from its teacher."""
    from franca.train import train as trainer

    root = tmp_path_factory.mktemp("learned_run")
    config = root / "learning.yaml"
    config.write_text(LEARNING)
    trainer.main(["--config-file", str(config), "--output-dir", str(root / "run")])
    return root / "run"
