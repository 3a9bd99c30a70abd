"""Reference models and adapters for torchvision, timm and Hugging Face models."""

from neuralign.models.adapters import block_names, get_head_name, get_submodule, replace_head
from neuralign.models.reference import MLP, VGG, ResNet20, SmallCNN
from neuralign.models.registry import get_model, list_models, model_config, set_model_config

__all__ = [
    "MLP", "VGG", "ResNet20", "SmallCNN", "get_model", "list_models", "model_config",
    "set_model_config", "get_head_name", "replace_head", "block_names", "get_submodule",
]
