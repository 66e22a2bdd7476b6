"""Device paths, exercised on the CPU (CI has no GPU): the same code runs with `--device cuda`."""
import torch
from torch import nn

from abscert_bench.devices import OnDevice, module_device
from abscert_bench.sound.bounds import HullBounder
from abscert_bench.training import create_method
from abscert_bench.training.config import TrainConfig
from abscert_bench.training.loop import train_model
from abscert_bench.verification import create_verifier


def test_module_device_and_on_device_wrapper_keep_gradients():
    net = nn.Linear(3, 2)
    assert module_device(net) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")
    x = torch.rand(4, 3, requires_grad=True)
    out = OnDevice(net)(x)
    assert out.device == x.device and torch.equal(out, net(x))
    out.sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, net.weight.sum(0).expand(4, 3))


def test_abscert_training_and_sound_verification_on_an_explicit_device(digits):
    config = TrainConfig("digits", "dm_small", "abscert", 0.05, epochs=1, method_options={"d": 0.2}, device="cpu")
    trained, _ = train_model(config, create_method("abscert", 0.05, d=0.2), digits.train_x[:200],
                             digits.train_y[:200], digits.test_x[:20], digits.test_y[:20], digits.num_classes)
    trained.to(torch.device("cpu"))
    assert HullBounder(trained).device == module_device(trained.network)
    x, y = digits.test_x[:8], digits.test_y[:8]
    results = create_verifier("abscert-sound", timeout=2.0).verify(trained, x, y, 0.05)
    assert len(results) == 8 and all(r.status in ("verified", "falsified", "unknown") for r in results)
    for ibp_name in ("ibp", "crown"):
        assert not create_verifier(ibp_name).applies_to(trained)
