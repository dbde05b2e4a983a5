"""reslab: the networks, recipes and protocols of He et al., "Deep Residual Learning for Image Recognition"."""
from .resnet import ResNet, ResNetConfig
from .zoo import create_model, list_models, register_model, resolve_config


def load(path):
    """A model from a reslab checkpoint, a converted file, or .safetensors + .json sidecar (eval mode);
    `model.reslab` holds its class names, normaliser and config."""
    from .interop import load as _load
    return _load(path)

__version__ = "0.1.0"
__all__ = ["ResNet", "ResNetConfig", "create_model", "list_models", "load", "register_model", "resolve_config"]
