"""Object detection with a ResNet backbone (paper §4.3): torchvision's Faster R-CNN on a reslab trunk.

    from reslab.detection import create_detector, load_detector
    det = create_detector("resnet101", head="c4", num_classes=81, weights="r101.pt")   # paper's design
    det = create_detector("resnet50", head="fpn", num_classes=81)                      # feature pyramid
    det = load_detector("runs/det-r101")                                               # a trained run

Command line: `reslab detect train | eval | predict` (see docs/detection.md).
"""
# Names resolve on first use: `reslab --help` builds the detect parser from .cli and .config alone,
# without importing torchvision's detection models (about 2 s).
_EXPORTS = {"create_detector": "model", "load_detector": "model", "freeze_batchnorm": "model",
            "DetectorConfig": "config", "DetectRecipe": "config", "HEADS": "config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reslab.detection' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
