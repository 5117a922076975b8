"""retrofit: give a pretrained timm Vision Transformer register tokens after the fact.

The names below are imported on first use (PEP 562), so ``import retrofit`` - and ``retrofit --help`` -
load neither torch, timm nor Lightning; submodules (``retrofit.neurons``, ``retrofit.diagnose``, ...) are
imported the same way.
"""

from importlib import import_module
from importlib.metadata import version
from typing import Any

__version__ = version("retrofit")

_NAMES = {  # public name -> the module that defines it
    "DenoisedTargets": "targets",
    "RetrofitDataModule": "data",
    "RetrofitError": "errors",
    "RetrofitModule": "module",
    "TargetCache": "cache",
    "TargetSettings": "targets",
    "Targets": "targets",
    "add_registers": "surgery",
    "count_registers": "surgery",
    "crop_center": "targets",
    "export": "_export",
    "forward_tokens": "features",
    "load": "_export",
    "load_backbone": "backbones",
    "patch_features": "features",
    "plant_artifacts": "synthetic",
    "retrofit": "api",
    "synthetic_images": "synthetic",
    "teacher_fingerprint": "cache",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(import_module(f".{_NAMES[name]}", __name__), name)
    else:
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})

