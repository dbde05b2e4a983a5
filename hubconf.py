"""torch.hub entry points: torch.hub.load(repo_or_dir, "resnet56", source="local", num_classes=100).

Every registered zoo name is an entry; keyword arguments are create_model overrides (shortcut="B",
stride_in_1x1=False, ...). No pretrained weights are published: load trained weights with reslab.load().
"""
import sys
from pathlib import Path

dependencies = ["torch", "torchvision"]

_src = Path(__file__).resolve().parent / "src"
if _src.is_dir() and str(_src) not in sys.path:
    sys.path.insert(0, str(_src))

from reslab import create_model, list_models  # noqa: E402


def _entry(name):
    def build(pretrained=False, **overrides):
        if pretrained:
            raise ValueError("reslab publishes no pretrained weights; train one (reslab train) or convert "
                             "(reslab convert) and load it with reslab.load(path)")
        return create_model(name, **overrides)
    build.__name__ = name
    build.__doc__ = f"reslab {name} (see docs/models.md); overrides go to reslab.create_model."
    return build


for _name in list_models():
    globals()[_name] = _entry(_name)
