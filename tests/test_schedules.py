"""Learning-rate schedules and the wall-clock budget mode of the one training loop."""
import math

import pytest

from abscert_bench.errors import UserError
from abscert_bench.harness.spec import TRAIN_DEFAULTS
from abscert_bench.training import create_method
from abscert_bench.training.config import TRAIN_FIELD_DEFAULTS, TrainConfig
from abscert_bench.training.loop import train_model


def test_step_schedule_decays_after_each_milestone():
    config = TrainConfig("digits", "fc3", "natural", 0.0, epochs=70, lr_schedule="step", lr_milestones=[50, 60],
                         lr_decay=0.2)
    assert config.lr_factor(0) == 1.0 and config.lr_factor(49.99) == 1.0
    assert config.lr_factor(50) == pytest.approx(0.2)
    assert config.lr_factor(65) == pytest.approx(0.04)


def test_cosine_schedule_with_warmup():
    config = TrainConfig("digits", "fc3", "natural", 0.0, epochs=10, lr_schedule="cosine", lr_warmup_epochs=2)
    assert config.lr_factor(0) == 0.0
    assert config.lr_factor(1) == pytest.approx(0.5)
    assert config.lr_factor(2) == pytest.approx(1.0)
    assert config.lr_factor(6) == pytest.approx(0.5)
    assert config.lr_factor(10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [{"lr_schedule": "linear"}, {"lr_milestones": [0]}, {"lr_decay": 0.0},
                                 {"budget_s": -1.0}, {"lr_warmup_epochs": 10}, {"budget_s": math.nan}])
def test_bad_schedule_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        TrainConfig("digits", "fc3", "natural", 0.0, epochs=10, **bad).validate()


def test_spec_defaults_are_the_train_config_defaults():
    assert {k: v for k, v in TRAIN_DEFAULTS.items() if k != "limit"} == TRAIN_FIELD_DEFAULTS
    assert TRAIN_FIELD_DEFAULTS["lr"] == TrainConfig("d", "m", "x", 0.0).lr


def test_lr_recorded_per_epoch_follows_the_schedule(digits):
    config = TrainConfig("digits", "fc3", "natural", 0.0, epochs=3, lr=1e-3, lr_schedule="step", lr_milestones=[2],
                         lr_decay=0.5)
    _, metrics = train_model(config, create_method("natural", 0.0), digits.train_x[:256], digits.train_y[:256],
                             digits.test_x[:64], digits.test_y[:64], digits.num_classes)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 1e-3, 5e-4])


def test_budget_mode_stops_on_time_and_completes_the_ramp(digits):
    budget = 1.5
    # the ramp is the first half of a 1,000-epoch schedule: with the step count as the clock eps would still be
    # near 0 when the budget ends; with the budget as the clock the ramp is done after half of the budget
    config = TrainConfig("digits", "fc3", "ibp", 0.1, epochs=1000, batch_size=64, warmup_epochs=0, ramp_epochs=500,
                         budget_s=budget)
    _, metrics = train_model(config, create_method("ibp", 0.1), digits.train_x, digits.train_y,
                             digits.test_x[:64], digits.test_y[:64], digits.num_classes)
    spent = sum(m["train_time_s"] for m in metrics)
    step_time = spent / sum(math.ceil(m["images"] / 64) for m in metrics)
    assert budget <= spent <= budget + 5 * step_time + 0.05  # stops within a few steps of the budget
    assert metrics[-1]["eps"] == pytest.approx(0.1)  # the eps ramp was stretched over the budget, and finished
    assert len(metrics) != config.epochs or spent >= budget  # epochs did not decide the end


def test_keep_best_epoch_returns_the_best_evaluated_epoch(digits):
    config = TrainConfig("digits", "fc3", "natural", 0.0, epochs=4, lr=0.05)  # a high lr: accuracy moves around
    trained, metrics = train_model(config, create_method("natural", 0.0), digits.train_x[:300], digits.train_y[:300],
                                   digits.test_x, digits.test_y, digits.num_classes, keep_best_epoch=True)
    from abscert_bench.training.loop import evaluate
    assert evaluate(trained.classifier(), digits.test_x, digits.test_y) == pytest.approx(
        max(m["test_acc"] for m in metrics))


def test_cosine_with_two_cycles_returns_to_the_peak():
    config = TrainConfig("digits", "fc3", "natural", 0.0, epochs=10, lr_schedule="cosine", lr_cycles=2.0)
    assert config.lr_factor(2.5) == pytest.approx(0.0, abs=1e-12)  # quarter of the way: first trough
    assert config.lr_factor(5) == pytest.approx(1.0)
    assert config.lr_factor(10) == pytest.approx(1.0)
