"""Model registry: the paper's architectures as plain nn.Modules that auto_LiRPA can wrap."""
from .registry import MODELS, ACTIVATIONS, create_model, count_parameters
from . import fc, dm, cnn7, lenet, resnet, vgg  # noqa: F401  (registers the builders)
from .deployed import DeployedClassifier

__all__ = ["MODELS", "ACTIVATIONS", "create_model", "count_parameters", "DeployedClassifier"]
