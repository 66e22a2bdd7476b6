"""Published training recipes as TrainConfig settings (torch-free, like config.py).

A recipe holds the schedule, optimiser and batch settings; the method-side parts (initialisation, regularisers,
loss, loss fusion) are the defaults of the `ibp` / `crown-ibp` methods themselves (baselines/training.py).
"""
from __future__ import annotations

from typing import Any

#: Shi et al. 2021, "Fast certified robust training with short warmup" (NeurIPS), MNIST: their README command
#: `--scheduler_opts=start=1,length=20 --lr-decay-milestones=50,60 --num-epochs=70 --config=config/mnist.json`
#: with argparser defaults Adam lr 5e-4, decay factor 0.2, grad-norm 10, and batch 256 from config/mnist.json.
#: Their eps ramp is a SmoothedScheduler (exponential, then linear); ours is linear over the same epochs.
SHI2021_MNIST: dict[str, Any] = {
    "epochs": 70,
    "warmup_epochs": 1,
    "ramp_epochs": 20,
    "lr": 5e-4,
    "lr_schedule": "step",
    "lr_milestones": [50, 60],
    "lr_decay": 0.2,
    "grad_norm": 10.0,
    "batch_size": 256,
}

RECIPES: dict[str, dict[str, Any]] = {"shi2021-mnist": SHI2021_MNIST}
