"""Model registry: the paper's architectures as plain nn.Modules that auto_LiRPA can wrap."""
from . import cnn7, dm, fc, lenet, resnet, vgg  # noqa: F401  (registers the builders)
from .deployed import DeployedClassifier
from .registry import ACTIVATIONS, MODELS, count_parameters, create_model

__all__ = ["MODELS", "ACTIVATIONS", "create_model", "count_parameters", "DeployedClassifier"]
