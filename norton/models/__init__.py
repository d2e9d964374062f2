"""The model zoo: the paper's architectures at any rank and compress rate."""
from norton.models import densenet, detection, resnet_cifar, resnet_imagenet, vgg  # noqa: F401  (registers)
from norton.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
