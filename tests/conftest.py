"""Shared fixtures: the embedded digits data and tiny trained run directories."""
import pytest

from abscert_bench.data import load_dataset
from abscert_bench.training.loop import TrainConfig, run_training


@pytest.fixture
def one_thread():
    """Tiny networks: intra-op threads only add synchronisation overhead (modules opt in with usefixtures)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


def make_run(root, digits, method, options=None, epochs=2, model="fc3", eps=0.1):
    """Train a tiny model on digits into root/<method> and return the run directory."""
    run_dir = root / method
    run_dir.mkdir(parents=True)
    config = TrainConfig("digits", model, method, eps, epochs=epochs, warmup_epochs=0, ramp_epochs=1,
                         method_options=options or {})
    run_training(config, digits, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def runs(tmp_path_factory, digits):
    """One tiny run per training method (FC3 on digits, eps = 0.1)."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "natural": make_run(root, digits, "natural", epochs=5),
        "abscert": make_run(root, digits, "abscert", {"d": 0.2, "variant": "point"}, epochs=5),
        "ibp": make_run(root, digits, "ibp"),
        "crown-ibp": make_run(root, digits, "crown-ibp"),
    }
