"""The model zoo: the paper's architectures at any rank and compress rate, and
torchvision classifiers by name (``"torchvision/<name>"``)."""
from norton.models import densenet, resnet_cifar, resnet_imagenet, vgg  # noqa: F401  (registers)
from norton.models.registry import (
    create_model,
    get_model_builder,
    list_models,
    register_model,
)

__all__ = ["create_model", "get_model_builder", "list_models", "register_model"]
