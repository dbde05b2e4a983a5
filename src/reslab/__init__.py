"""reslab: the networks, recipes and protocols of He et al., "Deep Residual Learning for Image Recognition"."""
from .resnet import ResNet, ResNetConfig
from .zoo import create_model, list_models, register_model, resolve_config

__version__ = "0.1.0"
__all__ = ["ResNet", "ResNetConfig", "create_model", "list_models", "register_model", "resolve_config"]
